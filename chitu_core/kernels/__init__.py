"""Portable Triton kernels shared by GPU plugins (NVIDIA, Hygon): no vendor specifics here.

Importing this package imports nothing heavy; each kernel module imports
triton itself, so a machine without triton can still import chitu_core.
"""

import os


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``. Triton 3.9's interpreter multiplies bf16
    ``tl.dot`` operands as raw uint16 bits, so kernels then upcast their (bf16-valued)
    dot operands to fp32 through a constexpr: same values, a dot it gets right."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
