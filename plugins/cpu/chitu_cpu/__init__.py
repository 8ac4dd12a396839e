"""Chitu's serving backend for hosts without an accelerator.

``--backend auto`` picks it on such a host (``cpu_ref``, the fp32/fp64 oracle, is
chosen only by name). It computes in bf16 by default (``--dtype float32`` for
fp32), keeps FP8 weights at 1 byte and widens them per GEMM (the generic
``linear``), and reads decode context lengths on the host, which costs nothing
when the host is the device: attention then touches only the blocks in use
instead of the block table's full width. Every op it does not implement is the
generic torch op of ``chitu_core.ops``.
"""
