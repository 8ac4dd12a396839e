"""Chitu reference backend ``cpu_ref``: the oracle the conformance suite trusts.

Every op is a straightforward formula that reads like its spec in
``chitu_core/hookspecs.py``: computed on the CPU in fp64 where that is cheap
(linear, attention scores and softmax, MoE sums, small ops), FP8 weights
dequantized from their exact e4m3 values, outputs rounded once to the input
activation dtype (fp32 in a reference run). Clarity wins over speed.

It shares no code with the generic fallback ``chitu_core/ops`` (which it is
used to check); only the e4m3 decoding of ``chitu_core.quant`` is common.

Not implemented, on purpose: the collectives (``chitu_new_group``,
``chitu_all_reduce``, ...) and ``chitu_capture_graph``. The generic
torch.distributed versions over gloo and eager execution serve the CPU.
"""

from __future__ import annotations

__version__ = "0.1.0"
