"""PackedWeight: the weight handle of the portable Triton kernels (NVIDIA and Hygon plugins).

``chitu_prepare_weight`` of a GPU plugin returns one; its ``chitu_linear`` and
``chitu_fused_moe`` consume it. FP8 codes are kept as contiguous ``uint8`` (1 byte
per element), which is what the soft-FP8 kernels read on every GPU, whether or
not torch has a float8 dtype there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chitu_core.kernels.fp8_gemm import K_PERM_GROUP, permute_k, scales_foldable, unpermute_k
from chitu_core.quant import (
    FORMAT_FP8_BLOCK128,
    FORMAT_FP8_CHANNEL,
    FORMAT_UNQUANTIZED,
    QuantizedWeight,
)

NEVER_NATIVE = 1 << 62  # native_from_m of a weight the native path never serves


# eq=False: tensors do not compare with ==; a handle is equal only to itself.
@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight repacked for the Triton kernels.

    weight: ``[N, K]`` (or ``[E, N, K]`` experts). Unquantized: the dense tensor
        (bf16/fp16/fp32). FP8: the e4m3 codes as ``uint8``, K contiguous.
    scale: FP8 block ``[ceil(N/128), ceil(K/128)]`` (``[E, ...]``) or channel ``[N]``
        (``[E, N]``) fp32, contiguous; ``None`` when unquantized.
    fmt: the checkpoint format (``chitu_core.quant.WEIGHT_FORMATS``).
    has_nan_codes: FP8 only: whether any code is NaN (0x7F/0xFF). Checked once at
        pack time; False lets the kernels widen without the NaN fix (real
        checkpoints hold none), True keeps NaN -> NaN. Defaults to the safe True.
    scales_fold: FP8 block only: every scale is in the range that the ``wide`` kernel
        can fold into the widened weight (``fp8_gemm.scales_foldable``, checked once at
        pack time). Defaults to the safe False (scales applied to the partial sums).
    k_perm: FP8 ``[N, K]`` only: the codes are K-permuted (``fp8_gemm.permute_k``), the
        layout in which the ``wide`` kernel loads 4 codes per word straight into its MMA
        operand; every soft-FP8 kernel reads it (``fp8_gemm(k_perm=True)``); native FP8
        kernels read it with the activations permuted alike (``stored_fp8``).
    native_from_m: FP8 only: the token count from which the plugin's native FP8
        (W8A8) path serves this weight, decided once when it is prepared (the
        ``--fp8-compute`` mode, the GPU, the shape); the default never (soft only).
    """

    weight: torch.Tensor
    scale: torch.Tensor | None
    fmt: str
    has_nan_codes: bool = True
    scales_fold: bool = False
    k_perm: bool = False
    native_from_m: int = NEVER_NATIVE

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

    def _k_order(self) -> torch.Tensor:
        """``weight`` in K order: itself, or an un-permuted copy when K-permuted."""
        return unpermute_k(self.weight) if self.k_perm else self.weight

    def fp8_view(self) -> torch.Tensor:
        """The codes as ``float8_e4m3fn`` in K order for native FP8 kernels (a view, no
        copy, unless K-permuted)."""
        return self._k_order().view(torch.float8_e4m3fn)

    def stored_fp8(self) -> torch.Tensor:
        """The codes as ``float8_e4m3fn`` in their stored layout (K-permuted when
        ``k_perm``): a view, never a copy, for native kernels that permute x alike."""
        return self.weight.view(torch.float8_e4m3fn)

    def as_quantized(self) -> QuantizedWeight:
        """Back to the core's ``QuantizedWeight`` for the generic ops (a view, no copy,
        unless K-permuted)."""
        return QuantizedWeight(self._k_order(), self.scale, self.fmt)


def pack_weight(
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    fmt: str,
    k_perm: bool = False,
    native_from_m: int = NEVER_NATIVE,
) -> PackedWeight:
    """Validate (through ``QuantizedWeight``) and repack: FP8 codes to contiguous uint8.

    weight: ``[N, K]`` or ``[E, N, K]``; scale and fmt as in
    ``chitu_core.hookspecs.chitu_prepare_weight``. Keeps FP8 at 1 byte per element.
    k_perm: K-permute the codes of an FP8 ``[N, K]`` weight with K % 16 == 0 (others
    are kept in K order). native_from_m: see ``PackedWeight``. Raises ValueError on a
    weight that does not match its format.
    """
    q = QuantizedWeight(weight, scale, fmt)
    if fmt == FORMAT_UNQUANTIZED:
        return PackedWeight(q.weight.contiguous(), None, fmt)
    bits = q.weight.contiguous()
    if bits.dtype != torch.uint8:
        bits = bits.view(torch.uint8)
    scale = q.scale.float().contiguous()
    fold = fmt == FORMAT_FP8_BLOCK128 and scales_foldable(scale)
    nan = has_nan_codes(bits)
    k_perm = k_perm and bits.dim() == 2 and bits.shape[1] % K_PERM_GROUP == 0
    if k_perm:
        bits = permute_k(bits)
    return PackedWeight(bits, scale, fmt, nan, fold, k_perm, native_from_m)


def has_nan_codes(bits: torch.Tensor) -> bool:
    """Whether a uint8 tensor of e4m3fn codes holds a NaN code (0x7F or 0xFF).

    One pass over the weight (a device sync): for load time, never per token.
    """
    if bits.numel() == 0:
        return False
    return bool(((bits & 0x7F) == 0x7F).any())


def as_packed(weight: PackedWeight | QuantizedWeight) -> PackedWeight:
    """``weight`` itself, or a generic ``QuantizedWeight`` (tests, callers that skipped
    ``prepare_weight``) repacked once."""
    if isinstance(weight, PackedWeight):
        return weight
    return pack_weight(weight.weight, weight.scale, weight.fmt)
