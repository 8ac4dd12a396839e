"""HygonWeight: the handle ``chitu_prepare_weight`` returns and ``chitu_linear`` consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chitu_core.quant import FORMAT_UNQUANTIZED, QuantizedWeight


# eq=False: tensors do not compare with ==; a handle is equal only to itself.
@dataclass(frozen=True, eq=False)
class HygonWeight:
    """A weight repacked for the DCU kernels.

    weight: ``[N, K]`` (or ``[E, N, K]`` experts). Unquantized: the dense tensor
        (bf16/fp16/fp32). FP8: the e4m3 codes as ``uint8``, K contiguous, 1 byte per
        element: what the soft-FP8 kernels read (HIP torch has no use for a float8
        dtype here: the DCU multiplies in bf16 after widening).
    scale: FP8 block ``[ceil(N/128), ceil(K/128)]`` (``[E, ...]``) or channel ``[N]``
        (``[E, N]``) fp32, contiguous; ``None`` when unquantized.
    fmt: the checkpoint format (``chitu_core.quant.WEIGHT_FORMATS``).
    """

    weight: torch.Tensor
    scale: torch.Tensor | None
    fmt: str

    def as_quantized(self) -> QuantizedWeight:
        """Back to the core's ``QuantizedWeight`` (a view, no copy) for the generic ops."""
        return QuantizedWeight(self.weight, self.scale, self.fmt)


def prepare_weight(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> HygonWeight:
    """Validate (through ``QuantizedWeight``) and repack: FP8 codes to contiguous uint8.

    weight: ``[N, K]`` or ``[E, N, K]``; scale and fmt as in
    ``chitu_core.hookspecs.chitu_prepare_weight``. Keeps FP8 at 1 byte per element.
    """
    q = QuantizedWeight(weight, scale, fmt)  # raises ValueError on a bad weight
    if fmt == FORMAT_UNQUANTIZED:
        return HygonWeight(q.weight.contiguous(), None, fmt)
    bits = q.weight.contiguous()
    if bits.dtype != torch.uint8:
        bits = bits.view(torch.uint8)
    return HygonWeight(bits, q.scale.float().contiguous(), fmt)


def as_handle(weight: HygonWeight | QuantizedWeight) -> HygonWeight:
    """``weight`` itself, or a generic ``QuantizedWeight`` (tests, callers that skipped
    ``prepare_weight``) repacked once."""
    if isinstance(weight, HygonWeight):
        return weight
    return prepare_weight(weight.weight, weight.scale, weight.fmt)
