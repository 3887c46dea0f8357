"""triton backend: one module per op family, functions named <op>_triton."""
