"""Triton kernels, installed as `physkern.kernels` (never as a top-level `kernels`: Hugging Face
publishes a package of that name). Each kernel module has a torch reference beside it."""
