"""NvidiaWeight: the handle ``chitu_prepare_weight`` returns and ``chitu_linear`` consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chitu_core.quant import (
    FORMAT_FP8_BLOCK128,
    FORMAT_FP8_CHANNEL,
    FORMAT_UNQUANTIZED,
    QuantizedWeight,
)


# eq=False: tensors do not compare with ==; a handle is equal only to itself.
@dataclass(frozen=True, eq=False)
class NvidiaWeight:
    """A weight repacked for the NVIDIA kernels.

    weight: ``[N, K]`` (or ``[E, N, K]`` experts). Unquantized: the dense tensor
        (bf16/fp16/fp32). FP8: the e4m3 codes as ``uint8``, K contiguous: 1 byte
        per element, what the soft kernels read.
    scale: FP8 block ``[ceil(N/128), ceil(K/128)]`` (``[E, ...]``) or channel
        ``[N]`` (``[E, N]``) fp32, contiguous; ``None`` when unquantized.
    fmt: the checkpoint format (``chitu_core.quant.WEIGHT_FORMATS``).
    """

    weight: torch.Tensor
    scale: torch.Tensor | None
    fmt: str

    @property
    def out_features(self) -> int:
        return self.weight.shape[-2]

    @property
    def in_features(self) -> int:
        return self.weight.shape[-1]

    @property
    def num_experts(self) -> int | None:
        return self.weight.shape[0] if self.weight.dim() == 3 else None

    @property
    def is_fp8(self) -> bool:
        return self.fmt in (FORMAT_FP8_BLOCK128, FORMAT_FP8_CHANNEL)

    def fp8_view(self) -> torch.Tensor:
        """The codes as ``float8_e4m3fn`` (a view, no copy) for native FP8 kernels."""
        return self.weight.view(torch.float8_e4m3fn)

    def as_quantized(self) -> QuantizedWeight:
        """Back to the core's ``QuantizedWeight`` (generic fallbacks, tests)."""
        return QuantizedWeight(self.weight, self.scale, self.fmt)


def prepare_weight(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> NvidiaWeight:
    """Validate (through ``QuantizedWeight``) and repack: FP8 codes to contiguous uint8.

    Keeps FP8 at 1 byte per element. Works for ``[N, K]`` and ``[E, N, K]``.
    """
    q = QuantizedWeight(weight, scale, fmt)  # raises ValueError on a bad weight
    if fmt == FORMAT_UNQUANTIZED:
        return NvidiaWeight(q.weight.contiguous(), None, fmt)
    bits = q.weight.contiguous()
    if bits.dtype != torch.uint8:
        bits = bits.view(torch.uint8)
    return NvidiaWeight(bits, q.scale.float().contiguous(), fmt)
