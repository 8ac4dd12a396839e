"""Chitu backend for Hygon DCUs on a ROCm/HIP build of torch."""

__version__ = "0.2.0"
