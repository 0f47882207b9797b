"""Triton kernels (CUDA; also run on CPU under TRITON_INTERPRET=1 in the tests)."""
