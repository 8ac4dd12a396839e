"""Chitu backend for NVIDIA GPUs: Triton soft-FP8 kernels on Ampere, native FP8 on sm_89+."""

__version__ = "0.2.0"
