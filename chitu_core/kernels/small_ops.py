"""RMSNorm (alone or after a residual add), rotary embedding and SwiGLU as one Triton
launch each.

The generic ops (``chitu_core/ops/small.py``) upcast to fp32 and chain 5-10
small torch kernels per call; at batch-1 decode those launches, not the bytes,
dominate. Each kernel here reads its inputs once, computes in fp32 and writes
the output in the hook's dtype, with the same rounding points as the generic
op (``chitu_core.hookspecs``: ``chitu_rms_norm``, ``chitu_add_rms_norm``,
``chitu_rope``, ``chitu_silu_and_mul``).

The launchers raise ``ValueError`` before launching anything for calls they do
not take (dtypes, a non-contiguous last dimension, mismatched shapes), so a
caller can fall back to the generic op; empty inputs return empty outputs
without a launch. No host sync anywhere (CUDA-graph safe).

Bytes moved (elt = element size): rms_norm ``2 M D elt`` (+ the weight once
per program, L2-resident), add_rms_norm ``5 M D elt``; silu_and_mul ``3 M I elt``; rope ``2 T (Hq Dq + Hk Dk)
elt`` + ``T R 4`` of cache rows. FLOPs are negligible: all three are
memory/launch bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# rms_norm keeps a whole row in registers up to this width (one read of x);
# wider rows loop over chunks of _RMS_CHUNK and read x twice (the second pass
# mostly from L2).
_RMS_MAX_SINGLE = 16384
_RMS_CHUNK = 4096


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be bf16, fp16 or fp32, got {t.dtype}")


def _warps(elements: int, per_warp: int, cap: int) -> int:
    """A power-of-two warp count giving each warp about ``per_warp`` elements."""
    return min(max(triton.next_power_of_2(max(elements // per_warp, 1)), 1), cap)


# --------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------


@triton.jit
def rms_norm_kernel(
    x_ptr,  # [M, D] bf16/fp16/fp32, last dim contiguous
    w_ptr,  # [D] bf16/fp16/fp32
    out_ptr,  # [M, D] x.dtype, contiguous
    M,
    D,
    stride_xm,
    stride_om,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE: tl.constexpr,  # BLOCK_D >= D: the row stays in registers
    r_ptr=None,  # [M, D] residual (HAS_RESIDUAL), last dim contiguous
    sum_ptr=None,  # [M, D] x.dtype out: residual + x (HAS_RESIDUAL), contiguous
    stride_rm=0,
    stride_sm=0,
    HAS_RESIDUAL: tl.constexpr = False,
):
    """``BLOCK_M`` rows per program: ``(x * rsqrt(mean(x^2) + eps)).to(x.dtype) * w``.
    HAS_RESIDUAL: x is first replaced by ``(x + r).to(x.dtype)``, which is also stored
    (``sum_ptr``); the norm is that of the rounded sum, as the unfused pair computes it."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)  # M * D may pass 2^31
    x_rows = x_ptr + rows64[:, None] * stride_xm
    o_rows = out_ptr + rows64[:, None] * stride_om
    if HAS_RESIDUAL:
        r_rows = r_ptr + rows64[:, None] * stride_rm
        s_rows = sum_ptr + rows64[:, None] * stride_sm
    w_rows = w_ptr + tl.zeros([BLOCK_M, 1], dtype=tl.int32)
    cols = tl.arange(0, BLOCK_D)
    if SINGLE:
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(r_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(s_rows + cols[None, :], x, mask=mask)
            x = x.to(tl.float32)
        inv = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        # Round the normalised value to x.dtype before the weight multiply (HF Llama's
        # order, as the generic op); the product of two 16-bit values is exact in fp32,
        # so the single final rounding equals torch's 16-bit multiply.
        normed = (x * inv[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
        # The weight read as a full [BLOCK_M, BLOCK_D] tile (rows after the first hit L1)
        # gets x's layout: a [1, BLOCK_D] one would be converted through shared memory.
        w = tl.load(w_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(o_rows + cols[None, :], (normed * w).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            c = start + cols
            mask = row_mask[:, None] & (c < D)[None, :]
            x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                x += tl.load(r_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                x = x.to(sum_ptr.dtype.element_ty)
                tl.store(s_rows + c[None, :], x, mask=mask)
                x = x.to(tl.float32)
            acc += x * x
        inv = tl.math.rsqrt(tl.sum(acc, axis=1) / D + eps)
        for start in range(0, D, BLOCK_D):
            c = start + cols
            col_mask = c < D
            mask = row_mask[:, None] & col_mask[None, :]
            if HAS_RESIDUAL:  # the sum this program stored in the first pass
                x = tl.load(s_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            normed = (x * inv[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(w_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(o_rows + c[None, :], (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_geometry(d: int) -> tuple[int, int, bool, int]:
    """``(BLOCK_M, BLOCK_D, SINGLE, num_warps)`` for rows of width ``d``.

    Narrow rows (kv_a_norm R = 512, q_a_norm 1536) share a program so each one
    still moves ~2K elements; a row up to ``_RMS_MAX_SINGLE`` is read once.
    """
    block_d = triton.next_power_of_2(max(d, 1))
    single = block_d <= _RMS_MAX_SINGLE
    if not single:
        block_d = _RMS_CHUNK
    block_m = min(max(2048 // block_d, 1), 16)
    return block_m, block_d, single, _warps(block_m * block_d, 512, 16)


def _check_norm_args(x: torch.Tensor, weight: torch.Tensor) -> int:
    """The row width D of an RMSNorm's x ``[..., D]``; ValueError unless x and the weight
    ``[D]`` have kernel dtypes and share a device."""
    _check_dtype("x", x)
    _check_dtype("weight", weight)
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight must be [D={d}], got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"x is on {x.device}, weight on {weight.device}")
    return d


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """``t`` as ``[M, D]`` with a contiguous last dimension (a copy only for a transposed
    view: rare, and one copy beats the generic chain)."""
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rms_norm_kernel`` on x (after adding ``residual`` when given): ``(normed, summed)``,
    ``summed`` None without a residual. Arguments checked by the callers but for the norm's."""
    d = _check_norm_args(x, weight)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out, summed
    x2 = _rows(x, d)
    weight = weight if weight.stride(0) == 1 else weight.contiguous()
    o2 = out.view(-1, d)
    fused = {}
    if residual is not None:
        r2, s2 = _rows(residual, d), summed.view(-1, d)
        fused = dict(r_ptr=r2, sum_ptr=s2, stride_rm=r2.stride(0), stride_sm=s2.stride(0),
                     HAS_RESIDUAL=True)  # fmt: skip
    m = x2.shape[0]
    block_m, block_d, single, num_warps = rms_norm_geometry(d)
    rms_norm_kernel[(triton.cdiv(m, block_m),)](
        x2, weight, o2, m, d, x2.stride(0), o2.stride(0), float(eps),
        BLOCK_M=block_m, BLOCK_D=block_d, SINGLE=single, num_warps=num_warps, **fused,
    )  # fmt: skip
    return out, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (semantics of ``chitu_rms_norm``).

    Args:
        x: ``[M, D]`` bf16/fp16/fp32 (leading dims are flattened: ``[..., D]`` works).
        weight: ``[D]`` bf16/fp16/fp32.
        eps: added to the mean square.

    Returns ``x``-shaped, ``x.dtype``: ``x * rsqrt(mean(x^2) + eps)`` in fp32,
    rounded to ``x.dtype``, times the weight (fp32 product), rounded to
    ``x.dtype``. Raises ``ValueError`` for unsupported inputs.
    """
    if x.dim() < 1:
        raise ValueError("rms_norm needs x of at least one dimension")
    return _launch_rms_norm(x, weight, eps, None)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm in one launch (semantics of ``chitu_add_rms_norm``).

    Args:
        x, residual: ``[M, D]`` (or ``[..., D]``), same shape and dtype (bf16/fp16/fp32).
        weight: ``[D]`` bf16/fp16/fp32. eps: added to the mean square.

    Returns ``(normed, summed)``, both x-shaped in ``x.dtype``: ``summed = (x + residual)``
    rounded to ``x.dtype``, ``normed = rms_norm(summed)``. Bytes: 3 reads and 2 writes of
    ``M D`` elements (the unfused pair: 5 reads, 2 writes, two launches). Raises
    ``ValueError`` for unsupported inputs.
    """
    if x.dim() < 1:
        raise ValueError("add_rms_norm needs x of at least one dimension")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            f"residual must match x: x {tuple(x.shape)} {x.dtype} on {x.device}, residual "
            f"{tuple(residual.shape)} {residual.dtype} on {residual.device}"
        )
    return _launch_rms_norm(x, weight, eps, residual)


# --------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------


@triton.jit
def silu_and_mul_kernel(
    x_ptr,  # [M, 2I] bf16/fp16/fp32, last dim contiguous
    out_ptr,  # [M, I] x.dtype, contiguous
    inter,  # I
    stride_xm,
    stride_om,
    BLOCK: tl.constexpr,
):
    """Program (row, column tile): ``silu(x[:, :I]) * x[:, I:]`` in fp32, ``I = inter``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    x_row = x_ptr + row * stride_xm
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # silu as torch computes it in fp32: x / (1 + exp(-x)) (-0 for very negative x).
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_om + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_geometry(m: int, inter: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)``: small batches get narrower tiles, so a decode step's one
    row (I = 14336) still spreads over ~56 programs instead of 14."""
    block = min(triton.next_power_of_2(max(inter, 1)), 1024 if m >= 32 else 256)
    return block, _warps(block, 256, 4)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU (semantics of ``chitu_silu_and_mul``).

    Args:
        x: ``[M, 2I]`` bf16/fp16/fp32 (leading dims are flattened: ``[..., 2I]`` works).

    Returns ``[M, I]`` (``[..., I]``) in ``x.dtype``: ``silu(gate) * up`` in fp32.
    Raises ``ValueError`` for unsupported inputs (an odd last dimension included).
    """
    if x.dim() < 1:
        raise ValueError("silu_and_mul needs x of at least one dimension")
    _check_dtype("x", x)
    two_i = x.shape[-1]
    if two_i % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {two_i}")
    inter = two_i // 2
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = x if x.dim() == 2 else x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    o2 = out.view(-1, inter)
    m = x2.shape[0]
    block, num_warps = silu_and_mul_geometry(m, inter)
    # Rows on grid axis 0 (up to 2^31 - 1); axis 1 (<= 65535 tiles) covers I <= 16M.
    silu_and_mul_kernel[(m, triton.cdiv(inter, block))](
        x2, o2, inter, x2.stride(0), o2.stride(0), BLOCK=block, num_warps=num_warps
    )
    return out


# --------------------------------------------------------------------------------------
# Rotary embedding
# --------------------------------------------------------------------------------------


@triton.jit
def _rope_heads(
    x_ptr,
    o_ptr,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    token,  # int64
    h0,
    H,
    cos,  # [BLOCK_HALF] fp32
    sin,
    HALF: tl.constexpr,
    PASS: tl.constexpr,  # D - R channels copied unchanged
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    NEOX: tl.constexpr,
):
    """Rotate heads ``[h0, h0 + BLOCK_H)`` of one token of x into o."""
    heads = h0 + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    head_mask = heads < H
    mask = head_mask[:, None] & (i < HALF)[None, :]
    x_heads = x_ptr + token * stride_xt + heads[:, None].to(tl.int64) * stride_xh
    o_heads = o_ptr + token * stride_ot + heads[:, None].to(tl.int64) * stride_oh
    if NEOX:  # channel i pairs with i + R/2
        a = tl.load(x_heads + i[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(x_heads + HALF + i[None, :], mask=mask, other=0.0).to(tl.float32)
        ra = a * cos[None, :] - b * sin[None, :]
        rb = b * cos[None, :] + a * sin[None, :]
        tl.store(o_heads + i[None, :], ra.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(o_heads + HALF + i[None, :], rb.to(o_ptr.dtype.element_ty), mask=mask)
    else:
        # Channel 2i pairs with 2i + 1: read the R channels as one contiguous tile and
        # split the pairs in registers (two stride-2 reads would not vectorise).
        c = tl.arange(0, 2 * BLOCK_HALF)
        cmask = head_mask[:, None] & (c < 2 * HALF)[None, :]
        x = tl.load(x_heads + c[None, :], mask=cmask, other=0.0).to(tl.float32)
        a, b = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_HALF, 2]))
        ra = a * cos[None, :] - b * sin[None, :]
        rb = b * cos[None, :] + a * sin[None, :]
        y = tl.reshape(tl.join(ra, rb), [BLOCK_H, 2 * BLOCK_HALF])
        tl.store(o_heads + c[None, :], y.to(o_ptr.dtype.element_ty), mask=cmask)
    if PASS > 0:
        j = tl.arange(0, BLOCK_PASS)
        pmask = head_mask[:, None] & (j < PASS)[None, :]
        v = tl.load(x_heads + 2 * HALF + j[None, :], mask=pmask)
        tl.store(o_heads + 2 * HALF + j[None, :], v, mask=pmask)


@triton.jit
def rope_kernel(
    q_ptr,  # [T, Hq, Dq], last dim contiguous
    k_ptr,  # [T, Hk, Dk], last dim contiguous
    pos_ptr,  # [T] int64/int32
    cache_ptr,  # [max_position, R] fp32: cos | sin
    q_out_ptr,  # [T, Hq, Dq] q.dtype
    k_out_ptr,  # [T, Hk, Dk] k.dtype
    Hq,
    Hk,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cache,
    HALF: tl.constexpr,  # R / 2
    PASS_Q: tl.constexpr,  # Dq - R
    PASS_K: tl.constexpr,  # Dk - R
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS_Q: tl.constexpr,
    BLOCK_PASS_K: tl.constexpr,
    NEOX: tl.constexpr,
):
    """Program (token, head tile): q's tiles first, then k's; one cache row per program."""
    token = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    row = cache_ptr + pos * stride_cache
    cos = tl.load(row + i, mask=i < HALF, other=0.0).to(tl.float32)
    sin = tl.load(row + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    q_tiles = tl.cdiv(Hq, BLOCK_H)
    if tile < q_tiles:
        _rope_heads(q_ptr, q_out_ptr, stride_qt, stride_qh, stride_qot, stride_qoh, token,
                    tile * BLOCK_H, Hq, cos, sin, HALF, PASS_Q, BLOCK_H, BLOCK_HALF,
                    BLOCK_PASS_Q, NEOX)  # fmt: skip
    else:
        _rope_heads(k_ptr, k_out_ptr, stride_kt, stride_kh, stride_kot, stride_koh, token,
                    (tile - q_tiles) * BLOCK_H, Hk, cos, sin, HALF, PASS_K, BLOCK_H,
                    BLOCK_HALF, BLOCK_PASS_K, NEOX)  # fmt: skip


def rope_geometry(hq: int, hk: int, rot: int, dq: int, dk: int) -> tuple[int, int, int]:
    """``(BLOCK_H, BLOCK_HALF, num_warps)``: a head tile of ~1K elements, so a
    Llama-8B decode token (32 + 8 heads of 128) is 5 programs, DeepSeek's (128 + 1
    heads of 64) 9."""
    block_half = triton.next_power_of_2(max(rot // 2, 1))
    width = triton.next_power_of_2(max(dq, dk, 1))
    block_h = min(max(1024 // width, 1), triton.next_power_of_2(max(hq, hk, 1)), 64)
    return block_h, block_half, _warps(block_h * width, 256, 4)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding (semantics of ``chitu_rope``).

    Args:
        q: ``[T, Hq, Dq]`` bf16/fp16/fp32, last dim contiguous (any token/head strides,
            e.g. a view of a fused QKV projection).
        k: ``[T, Hk, Dk]`` bf16/fp16/fp32, last dim contiguous.
        positions: ``[T]`` int64 (or int32), each in ``[0, max_position)`` (not checked:
            that would cost a host sync).
        cos_sin_cache: ``[max_position, R]`` fp32 (bf16/fp16 are upcast as the
            generic op does); row ``p`` is ``cos(p f_0..)`` then ``sin(p f_0..)``.
            ``R`` even, ``R <= Dq, Dk``.
        is_neox_style: pair ``i`` with ``i + R/2`` (True) or ``2i`` with ``2i + 1``.

    Returns new contiguous ``(q_out, k_out)`` in q's and k's dtypes: the leading R
    channels rotated in fp32, the rest copied. Raises ``ValueError`` for
    unsupported inputs.
    """
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [T, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    tokens, hq, dq = q.shape
    _, hk, dk = k.shape
    if k.shape[0] != tokens or positions.shape != (tokens,):
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and positions {tuple(positions.shape)} "
            "must have the same token count"
        )
    _check_dtype("q", q)
    _check_dtype("k", k)
    _check_dtype("cos_sin_cache", cos_sin_cache)
    if positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"positions must be int64 or int32, got {positions.dtype}")
    if cos_sin_cache.dim() != 2:
        raise ValueError(f"cos_sin_cache must be [max_position, R], got {cos_sin_cache.shape}")
    rot = cos_sin_cache.shape[1]
    if rot % 2 or rot == 0 or rot > min(dq, dk):
        raise ValueError(f"rotary dim R={rot} must be even, positive and <= Dq={dq}, Dk={dk}")
    devices = {t.device for t in (q, k, positions, cos_sin_cache)}
    if len(devices) != 1:
        raise ValueError(f"q, k, positions and cos_sin_cache are on several devices: {devices}")
    for name, t in (("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if tokens == 0 or hq + hk == 0:
        return q_out, k_out
    if positions.stride(0) != 1:
        positions = positions.contiguous()
    half = rot // 2
    block_h, block_half, num_warps = rope_geometry(hq, hk, rot, dq, dk)
    pass_q, pass_k = dq - rot, dk - rot
    grid = (tokens, triton.cdiv(hq, block_h) + triton.cdiv(hk, block_h))
    rope_kernel[grid](
        q, k, positions, cos_sin_cache, q_out, k_out, hq, hk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos_sin_cache.stride(0),
        HALF=half, PASS_Q=pass_q, PASS_K=pass_k, BLOCK_H=block_h, BLOCK_HALF=block_half,
        BLOCK_PASS_Q=triton.next_power_of_2(max(pass_q, 1)),
        BLOCK_PASS_K=triton.next_power_of_2(max(pass_k, 1)),
        NEOX=bool(is_neox_style), num_warps=num_warps,
        # No FMA contraction: ``a cos - b sin`` rounds like torch's separate mul and sub
        # (a fused FMA differs in the last bits where the terms cancel).
        enable_fp_fusion=False,
    )  # fmt: skip
    return q_out, k_out
