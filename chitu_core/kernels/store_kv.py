"""Paged KV-cache write (``chitu_store_kv``) as one Triton launch.

The generic op (``chitu_core/ops/attention.py``) computes ``slots // block_size``
and ``slots % block_size`` and runs one ``index_put`` per cache: at batch-1 decode
that is ~6 tiny kernels a layer, and the launches, not the bytes, dominate. Here
one program per (token, head tile) reads its slot, and writes that token's keys
and (same program) values straight into the cache rows.

The caches are contiguous ``[num_blocks, block_size, Hkv, D]`` (as
``chitu_allocate_kv_cache`` returns them), so slot ``s`` is row ``s`` of the
flattened ``[num_blocks * block_size, Hkv, D]`` cache: no division at all.

Values are cast to the cache dtype with round-to-nearest-even, as torch does,
so the result is bit-identical to the generic op (the hook's tolerance is
exact). Triton 3.9's interpreter truncates fp32 -> bf16 and flushes bf16
subnormals to zero when widening, so under the interpreter casts from or to
bf16 are done on the bits instead (``_cast_on_bits``); compiled kernels use the
hardware conversions (the same results).

The launcher raises ``ValueError`` before launching anything for calls it does
not take (dtypes, a non-contiguous cache, a strided last dimension, mismatched
shapes, value given without a value cache or the reverse), so a caller can fall
back to the generic op; ``T == 0`` returns without a launch. No host sync
(CUDA-graph safe); slots are not range-checked (that would need one).

Bytes moved: ``T Hkv (D + Dv)`` elements read and written, plus ``T`` slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from chitu_core.kernels import interpreting

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SLOT_DTYPES = (torch.int64, torch.int32)


@triton.jit
def _round_bf16(x):
    """fp32 -> bf16, round to nearest even on the bits (NaN -> 0x7FC0)."""
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lsb) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    out = tl.where(is_nan, 0x7FC0, rounded)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _widen_bf16(x):
    """bf16 -> fp32 on the bits (exact, subnormals included)."""
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _cast_on_bits(x, dst_ty: tl.constexpr):
    """``x.to(dst_ty)`` with every bf16 conversion done on the bits: Triton 3.9's
    interpreter truncates fp32 -> bf16 and flushes bf16 subnormals when widening."""
    if x.dtype == tl.bfloat16:
        xf = _widen_bf16(x)
    else:
        xf = x.to(tl.float32)
    if dst_ty == tl.bfloat16:
        y = _round_bf16(xf)
    else:
        y = xf.to(dst_ty)
    return y


@triton.jit
def _store_heads(
    src_ptr,  # [T, H, DIM], last dim contiguous
    cache_ptr,  # [num_slots, H, DIM] contiguous
    stride_t,
    stride_h,
    row,  # H * DIM: one slot of the cache
    token,  # int64
    slot,  # int64
    h0,
    H,
    DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    """Copy heads ``[h0, h0 + BLOCK_H)`` of one token into cache row ``slot``."""
    heads = h0 + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (heads < H)[:, None] & (d < DIM)[None, :]
    src = src_ptr + token * stride_t + heads[:, None].to(tl.int64) * stride_h + d[None, :]
    x = tl.load(src, mask=mask)
    if BF16_BITS:
        y = _cast_on_bits(x, cache_ptr.dtype.element_ty)
    else:
        y = x.to(cache_ptr.dtype.element_ty)
    dst = cache_ptr + slot * row + heads[:, None] * DIM + d[None, :]
    tl.store(dst, y, mask=mask)


@triton.jit
def store_kv_kernel(
    k_ptr,  # [T, H, D] bf16/fp16/fp32, last dim contiguous
    v_ptr,  # [T, H, DV] (unused without values)
    kc_ptr,  # [num_blocks * block_size, H, D] bf16/fp16/fp32, contiguous
    vc_ptr,  # [num_blocks * block_size, H, DV] (unused without values)
    slot_ptr,  # [T] int64/int32
    H,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_slot,
    row_k,  # H * D
    row_v,  # H * DV
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_VALUE: tl.constexpr,
    BF16_BITS_K: tl.constexpr,
    BF16_BITS_V: tl.constexpr,
):
    """Program (token, head tile): the tile's keys, then its values, into row ``slot``."""
    token = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1) * BLOCK_H
    slot = tl.load(slot_ptr + token * stride_slot).to(tl.int64)
    _store_heads(k_ptr, kc_ptr, stride_kt, stride_kh, row_k, token, slot, h0, H,
                 D, BLOCK_H, BLOCK_D, BF16_BITS_K)  # fmt: skip
    if HAS_VALUE:
        _store_heads(v_ptr, vc_ptr, stride_vt, stride_vh, row_v, token, slot, h0, H,
                     DV, BLOCK_H, BLOCK_DV, BF16_BITS_V)  # fmt: skip


def store_kv_geometry(heads: int, dim: int, dim_v: int) -> tuple[int, int, int, int]:
    """``(BLOCK_H, BLOCK_D, BLOCK_DV, num_warps)``: a head tile of ~1K elements per
    cache, so a Llama-3-8B token (8 kv heads of 128) is one program writing K and V,
    an MLA latent (1 x 576) one program."""
    block_d = triton.next_power_of_2(max(dim, 1))
    block_dv = triton.next_power_of_2(max(dim_v, 1))
    width = max(block_d, block_dv)
    block_h = min(max(1024 // width, 1), triton.next_power_of_2(max(heads, 1)), 64)
    elements = block_h * width
    num_warps = min(max(triton.next_power_of_2(max(elements // 256, 1)), 1), 4)
    return block_h, block_d, block_dv, num_warps


def _check(name: str, t: torch.Tensor, dims: int, dtypes=_DTYPES) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has unsupported dtype {t.dtype}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension")


def _bf16_on_bits(src: torch.Tensor, cache: torch.Tensor) -> bool:
    """Under the interpreter, a cast from or to bf16 goes through ``_cast_on_bits``."""
    return (
        interpreting() and src.dtype != cache.dtype and torch.bfloat16 in (src.dtype, cache.dtype)
    )


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new tokens' keys (and values) into the paged cache, in place (semantics of
    ``chitu_store_kv``).

    Args:
        key: ``[T, Hkv, D]`` bf16/fp16/fp32 (MLA: the latent ``[T, 1, R + P]``), last
            dim contiguous, any token/head strides (e.g. a view of a fused projection).
        value: ``[T, Hkv, Dv]`` likewise, or ``None`` (MLA).
        key_cache, value_cache: contiguous ``[num_blocks, block_size, Hkv, D]`` /
            ``[..., Dv]`` bf16/fp16/fp32; ``value_cache`` is ``None`` iff ``value`` is.
        slot_mapping: ``[T]`` int64 (or int32); token ``t`` goes to block
            ``slot // block_size``, offset ``slot % block_size``. Not range-checked.

    Values are cast to the cache dtype (round to nearest even). Raises
    ``ValueError`` before launching for calls it does not take.
    """
    if (value is None) != (value_cache is None):
        raise ValueError("value and value_cache must both be given or both be None")
    _check("key", key, 3)
    _check("key_cache", key_cache, 4)
    _check("slot_mapping", slot_mapping, 1, _SLOT_DTYPES)
    tokens, heads, dim = key.shape
    block_size = key_cache.shape[1]
    if tuple(key_cache.shape[2:]) != (heads, dim):
        raise ValueError(f"key {tuple(key.shape)} does not fit key_cache {tuple(key_cache.shape)}")
    if slot_mapping.shape[0] != tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {tokens} tokens")
    if not key_cache.is_contiguous():
        raise ValueError("key_cache must be contiguous")
    tensors = [key, key_cache, slot_mapping]
    dim_v = 0
    if value is not None:
        _check("value", value, 3)
        _check("value_cache", value_cache, 4)
        dim_v = value.shape[2]
        if tuple(value.shape[:2]) != (tokens, heads):
            raise ValueError(f"value {tuple(value.shape)} does not match key {tuple(key.shape)}")
        if tuple(value_cache.shape[1:]) != (block_size, heads, dim_v):
            raise ValueError(
                f"value {tuple(value.shape)} does not fit value_cache {tuple(value_cache.shape)} "
                f"(block size {block_size})"
            )
        if not value_cache.is_contiguous():
            raise ValueError("value_cache must be contiguous")
        tensors += [value, value_cache]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"store_kv's tensors are on several devices: {devices}")
    if tokens == 0 or heads == 0:
        return
    block_h, block_d, block_dv, num_warps = store_kv_geometry(heads, dim, dim_v)
    has_value = value is not None and dim_v > 0
    v, vc = (value, value_cache) if has_value else (key, key_cache)
    grid = (tokens, triton.cdiv(heads, block_h))
    store_kv_kernel[grid](
        key, v, key_cache, vc, slot_mapping, heads,
        key.stride(0), key.stride(1), v.stride(0), v.stride(1), slot_mapping.stride(0),
        heads * dim, heads * max(dim_v, 1),
        D=dim, DV=max(dim_v, 1), BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_DV=block_dv,
        HAS_VALUE=has_value,
        BF16_BITS_K=_bf16_on_bits(key, key_cache),
        BF16_BITS_V=has_value and _bf16_on_bits(value, value_cache),
        num_warps=num_warps,
    )  # fmt: skip
