"""AscendWeight: the handle ``chitu_prepare_weight`` returns and ``linear``/``fused_moe`` consume.

FP8 checkpoints on an NPU without FP8: ``torch_npu.npu_weight_quant_batchmatmul``
multiplies bf16/fp16 activations by an int8 weight dequantized on the fly with
per-group antiquant scales (A2/A3: per-group, ``antiquant_scale [ceil(K/G), N]``).
So at load time every FP8 weight (block-128 or per-channel) is dequantized to
its exact fp32 values and requantized symmetrically to int8 with one scale per
(output channel ``n``, group of ``GROUP_SIZE`` = 128 along ``K``):

    scale[g, n] = bf16_round_up(amax_k∈g |W[n, k]| / 127)
    q[n, k]     = round(W[n, k] / scale[k // 128, n])   (|q| <= 127)

The scale is rounded to bf16 (the dtype the operator takes with bf16
activations) *before* the division, so the only loss is the int8 rounding:
at most half a step, 1/254 of the group's largest magnitude. A block-128 scale
is shared by 128 rows, so the per-row groups are finer than the checkpoint's
blocks. Memory: 1 byte per element plus 2 bytes per 128 (1.6 % more than the
FP8 checkpoint, whose scales are per 128x128).

``CHITU_ASCEND_FP8_WEIGHTS=bf16`` (read at each ``prepare_weight``) keeps the
exact FP8 values widened to bf16 instead: no quantization loss, twice the
bytes of the checkpoint (it breaks the contract's "no more bytes than the
checkpoint" on purpose; an option for accuracy studies, not the default).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from chitu_core.quant import FORMAT_UNQUANTIZED, QuantizedWeight

GROUP_SIZE = 128  # antiquant_group_size: a multiple of 32 (documented), the FP8 block edge
INT8_MAX = 127
FP8_WEIGHTS_ENV = "CHITU_ASCEND_FP8_WEIGHTS"
FP8_AS_INT8, FP8_AS_BF16 = "int8", "bf16"
LAYOUT_DENSE, LAYOUT_INT8 = "dense", "int8_group"


@dataclass(frozen=True, eq=False)
class AscendWeight:
    """A weight repacked for the torch_npu GEMMs.

    weight: dense layout: ``[N, K]`` bf16/fp16/fp32 for a linear, ``[E, K, N]``
        (transposed, contiguous: ``npu_grouped_matmul``'s right matrix) for
        experts. int8 layout: ``[N, K]`` / ``[E, N, K]`` int8, K contiguous
        (``.t()`` is the transposed ``(K, N)`` view the operator recommends).
    antiquant_scale: int8 layout: ``[ceil(K/128), N]`` (``[E, ...]``) bf16; else None.
    fmt: the checkpoint format the weight was loaded in.
    layout: ``LAYOUT_DENSE`` or ``LAYOUT_INT8``.
    """

    weight: torch.Tensor
    antiquant_scale: torch.Tensor | None
    fmt: str
    layout: str
    out_features: int
    in_features: int

    @property
    def num_experts(self) -> int | None:
        return self.weight.shape[0] if self.weight.dim() == 3 else None

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """Dense ``[N, K]`` (or ``[E, N, K]``) in ``dtype``, computed in fp32 (fallbacks, tests)."""
        if self.layout == LAYOUT_DENSE:
            w = self.weight if self.weight.dim() == 2 else self.weight.transpose(1, 2)
            return w.to(dtype)
        scale = self.antiquant_scale.float().repeat_interleave(GROUP_SIZE, dim=-2)
        scale = scale[..., : self.in_features, :].transpose(-1, -2)  # [..., N, K]
        return (self.weight.float() * scale).to(dtype)


def fp8_weights_mode() -> str:
    """``int8`` (default) or ``bf16``, from ``$CHITU_ASCEND_FP8_WEIGHTS``."""
    mode = os.environ.get(FP8_WEIGHTS_ENV, FP8_AS_INT8).strip().lower() or FP8_AS_INT8
    if mode not in (FP8_AS_INT8, FP8_AS_BF16):
        raise ValueError(
            f"{FP8_WEIGHTS_ENV} must be '{FP8_AS_INT8}' or '{FP8_AS_BF16}', got {mode!r}"
        )
    return mode


def _bf16_round_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= x (x >= 0, finite): so |W| / scale never exceeds 127."""
    down = x.to(torch.bfloat16)
    return torch.where(
        down.float() < x, torch.nextafter(down, torch.full_like(down, torch.inf)), down
    )


def requantize_int8(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with a bf16 scale per (row, group of 128 along K).

    dense: ``[..., N, K]`` fp32 (the exact dequantized FP8 values). Returns
    ``(q [..., N, K] int8, antiquant_scale [..., ceil(K/128), N] bf16)`` with
    ``dense ~= q * scale`` (see the module docstring). An all-zero group gets
    scale 1 (exact zeros); a group holding NaN gets a NaN scale, so its row's
    outputs are NaN exactly where the reference's are.
    """
    *lead, n, k = dense.shape
    groups = -(-k // GROUP_SIZE)
    padded = torch.nn.functional.pad(dense, (0, groups * GROUP_SIZE - k))
    blocks = padded.view(*lead, n, groups, GROUP_SIZE)
    amax = blocks.abs().amax(dim=-1)  # [..., N, G]; NaN propagates
    scale = _bf16_round_up(amax / INT8_MAX)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    q = torch.round(blocks / scale.float()[..., None]).clamp(-INT8_MAX, INT8_MAX)
    q = torch.nan_to_num(q, nan=0.0)  # the NaN lives in the scale
    q = q.view(*lead, n, groups * GROUP_SIZE)[..., :k].to(torch.int8).contiguous()
    return q, scale.transpose(-1, -2).contiguous()


def prepare_weight(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> AscendWeight:
    """Validate (through ``QuantizedWeight``) and repack once at load time.

    Unquantized: ``[N, K]`` kept as is; experts ``[E, N, K]`` transposed to
    ``[E, K, N]``. FP8 (block-128 or channel): int8 per-group (default) or
    bf16 (``$CHITU_ASCEND_FP8_WEIGHTS=bf16``), see the module docstring.
    """
    q = QuantizedWeight(weight, scale, fmt)  # raises ValueError on a bad weight
    n, k = q.out_features, q.in_features
    if fmt == FORMAT_UNQUANTIZED or fp8_weights_mode() == FP8_AS_BF16:
        dense = q.weight if fmt == FORMAT_UNQUANTIZED else q.dequantize(torch.bfloat16)
        if dense.dim() == 3:
            dense = dense.transpose(1, 2)
        return AscendWeight(dense.contiguous(), None, fmt, LAYOUT_DENSE, n, k)
    qweight, antiquant_scale = requantize_int8(q.dequantize(torch.float32))
    return AscendWeight(qweight, antiquant_scale, fmt, LAYOUT_INT8, n, k)


def check_handle(weight: object, op: str) -> AscendWeight:
    """Raise TypeError unless ``weight`` came from this backend's ``prepare_weight``."""
    if not isinstance(weight, AscendWeight):
        raise TypeError(
            f"ascend {op} needs a handle from the ascend chitu_prepare_weight (AscendWeight), "
            f"got {type(weight).__name__}"
        )
    return weight
