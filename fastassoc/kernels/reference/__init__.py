"""reference backend: one module per op family, functions named <op>_reference."""
