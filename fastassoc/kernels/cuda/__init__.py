"""cuda backend: one module per op family, functions named <op>_cuda."""
