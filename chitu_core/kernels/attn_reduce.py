"""Split-K (flash-decoding) plumbing shared by the paged decode kernels.

A decode step has one query per sequence, so a grid of (batch, head tile)
programs alone leaves most SMs idle at small batch and wastes a tail wave at
large batch. The context is therefore cut into ``num_splits`` contiguous
ranges. The split count is chosen on the host from the table width
``max_blocks * block_size`` (which bounds every context) without reading
``context_lens``; on the device each sequence's OWN length is spread over the
splits in whole ``block_n`` tiles (``split_range``), so a 160-token context in a
decode graph captured for 8192 positions still keeps every split busy (ranges of
the table width put it all in split 0). A program whose range is empty (a context
shorter than ``num_splits`` tiles) exits at once and writes nothing.

Each split writes, per query head, its softmax-normalised partial output
``o_s`` (fp32) and its log-sum-exp ``lse_s`` (base 2, in the scaled-score
domain). ``attn_splitk_reduce_kernel`` recomputes from ``context_lens`` how many
splits hold data and combines them::

    out = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m),   m = max_s lse_s

Bytes of the reduce: ``4 * B * H * S * (Dv + 1)`` read, ``B * H * Dv`` outputs written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_BLOCK_SIZE = 256  # largest cache block size (tokens) the kernels accept


@dataclass(frozen=True)
class DecodeAttnConfig:
    """Tile shape, launch parameters and split policy of a paged decode kernel.

    block_h: query heads per program. GQA: the cap on the heads of one kv group
        handled together (the group is padded to at least 16 rows for ``tl.dot``);
        MLA: the head tile that shares one read of each latent tile.
    block_n: context positions per loop step (may span several cache blocks).
    num_warps, num_stages: Triton launch options (``num_stages`` pipelines the
        cache loads).
    target_ctas_per_sm: the split count aims at about this many programs per SM
        (fewer, larger programs when their partials cost more than the tail wave).
    min_tokens_per_split: the split count is at most the table width over this (on the
        device a short context may still get shorter ranges: see ``split_range``).
    max_splits: upper bound on the split count.
    """

    block_h: int = 16
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    target_ctas_per_sm: float = 16.0
    min_tokens_per_split: int = 256
    max_splits: int = 64

    def __post_init__(self) -> None:
        for name in ("block_h", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.target_ctas_per_sm <= 0:
            raise ValueError(f"target_ctas_per_sm must be > 0, got {self.target_ctas_per_sm}")
        if self.min_tokens_per_split < 1 or self.max_splits < 1:
            raise ValueError("min_tokens_per_split and max_splits must be >= 1")


def pick_num_splits(num_programs: int, max_len: int, num_sms: int, config: DecodeAttnConfig) -> int:
    """Splits of the context for a grid of ``num_programs`` (batch x head tiles) programs.

    Rounds ``target_ctas_per_sm * num_sms / num_programs`` to the nearest integer
    (a grid that already nearly fills its target is not split), bounded by
    ``max_splits`` and by ranges of at least ``min_tokens_per_split`` positions
    of the table width ``max_len``. Host-only arithmetic: no device reads.
    """
    if num_programs <= 0:
        return 1
    want = round(config.target_ctas_per_sm * num_sms / num_programs)
    by_len = max(1, max_len // config.min_tokens_per_split)
    return max(1, min(want, by_len, config.max_splits))


def usable_splits(max_len: int, num_splits: int, block_n: int) -> int:
    """``num_splits`` lowered so that cutting the ``max_len``-position table width into
    ranges of whole ``block_n`` tiles leaves no split empty (each sequence's own length is
    spread over the splits on the device, ``split_range``)."""
    tiles = max(1, triton.cdiv(max_len, block_n))
    return triton.cdiv(tiles, triton.cdiv(tiles, max(1, num_splits)))


def check_paged_args(block_tables: torch.Tensor, context_lens: torch.Tensor, batch: int) -> None:
    """Shape/dtype checks shared by the decode launchers (ValueError: callers fall back)."""
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [B={batch}, max_blocks], got {block_tables.shape}")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be [B={batch}], got {tuple(context_lens.shape)}")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 (or int64), got {t.dtype}")
    if block_tables.shape[1] and block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")


def check_block_size(block_size: int) -> None:
    if block_size < 1 or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(
            f"cache block_size {block_size} is not supported by the Triton decode kernels "
            f"(a power of two from 1 to {MAX_BLOCK_SIZE}); use the generic attention op"
        )


_NUM_SMS: dict[torch.device, int] = {}


def device_num_sms(device: torch.device) -> int:
    """Streaming multiprocessors (compute units) of ``device``; 8 for the CPU interpreter."""
    if device.type != "cuda":
        return 8
    n = _NUM_SMS.get(device)
    if n is None:
        n = torch.cuda.get_device_properties(device).multi_processor_count
        _NUM_SMS[device] = n
    return n


@triton.jit
def attn_dot(a, b, acc, FP32_DOT: tl.constexpr):
    """``acc + a @ b`` in fp32. FP32_DOT (fp32 caches, or the CPU interpreter): exact
    fp32 products (no TF32), operands upcast."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def online_softmax_step(qk, m_i, l_i):
    """One key tile of a base-2 online softmax: ``qk [ROWS, BLOCK_N]`` scaled scores
    (-inf where masked; every tile holds >= 1 valid key, so the new max is finite).
    Returns ``(p, alpha, m_new, l_new)``: the tile's unnormalised probabilities, the
    factor that rescales the running accumulator, the new row max and row sum."""
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def split_tokens(ctx_len, num_splits, BLOCK_N: tl.constexpr):
    """Positions per split of a sequence of ``ctx_len`` positions: its OWN length in whole
    ``BLOCK_N`` tiles, spread over the ``num_splits`` splits (at least one tile). Decode
    graphs launch with the table width of ``max_model_len``, far above most contexts;
    ranges of that width left a short context in split 0 alone, one program walking all
    of it. The decode kernels (``split_range``) and the reduce share this rule."""
    return tl.maximum(tl.cdiv(tl.cdiv(ctx_len, BLOCK_N), num_splits), 1) * BLOCK_N


@triton.jit
def split_range(ctx_len, pid_s, num_splits, BLOCK_N: tl.constexpr):
    """``(start, end)`` of split ``pid_s`` of ``num_splits`` over a sequence of ``ctx_len``
    positions (``split_tokens`` each; ``start >= end`` for a split with nothing to do)."""
    per = split_tokens(ctx_len, num_splits, BLOCK_N)
    start = pid_s * per
    return start, tl.minimum(start + per, ctx_len)


@triton.jit
def store_decode_output(acc, m_i, l_i, b, heads, row_mask, offs_v, v_mask, pid_s, num_heads,
                        out_ptr, stride_ob, stride_oh, o_ws_ptr, lse_ws_ptr,
                        DV: tl.constexpr, IS_SPLIT: tl.constexpr):  # fmt: skip
    """The epilogue of a decode program: ``acc [ROWS, BLOCK_V]`` normalised by ``l_i``,
    written to the output (one split) or, with its base-2 LSE, to the split workspaces."""
    # l_i == 0 only for an (out-of-contract) empty context: write zeros, not NaN.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_mask = row_mask[:, None] & v_mask[None, :]
    if IS_SPLIT:
        num_splits = tl.num_programs(1)
        ws_rows = (b * num_heads + heads).to(tl.int64) * num_splits + pid_s  # [ROWS]
        tl.store(o_ws_ptr + ws_rows[:, None] * DV + offs_v[None, :], out, mask=o_mask)
        tl.store(lse_ws_ptr + ws_rows, m_i + tl.log2(l_i), mask=row_mask)
    else:
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_v[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def attn_splitk_reduce_kernel(
    o_ws_ptr,  # [B, H, S, DV] fp32 normalised partial outputs
    lse_ws_ptr,  # [B, H, S] fp32 base-2 log-sum-exp of each partial
    context_lens_ptr,  # [B] int32
    out_ptr,  # [B, H, DV] output dtype
    num_heads,
    num_splits,
    max_len,
    stride_ob,
    stride_oh,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,  # the decode kernel's: splits hold whole tiles (split_tokens)
):
    """One program per (head, sequence): combine the splits that hold tokens."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    ctx_len = tl.minimum(tl.load(context_lens_ptr + b), max_len)
    per = split_tokens(ctx_len, num_splits, BLOCK_N)
    num_valid = tl.minimum(tl.cdiv(ctx_len, per), num_splits)
    row = b * num_heads + h
    offs_s = tl.arange(0, BLOCK_S)
    lse = tl.load(
        lse_ws_ptr + row * num_splits + offs_s, mask=offs_s < num_valid, other=float("-inf")
    )
    m = tl.max(lse, axis=0)
    m = tl.where(num_valid > 0, m, 0.0)  # no tokens: avoid -inf - -inf
    weights = tl.exp2(lse - m)
    denom = tl.sum(weights, axis=0)
    offs_d = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < DV
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    o_ptrs = o_ws_ptr + row.to(tl.int64) * num_splits * DV + offs_d
    for s in range(0, num_valid):
        w = tl.exp2(tl.load(lse_ws_ptr + row * num_splits + s) - m)
        acc += w * tl.load(o_ptrs + s * DV, mask=d_mask, other=0.0)
    acc = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, acc.to(out_ptr.dtype.element_ty),
             mask=d_mask)  # fmt: skip


def combine_splits(
    o_ws: torch.Tensor,
    lse_ws: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor,
    block_n: int,
    max_len: int,
) -> torch.Tensor:
    """Reduce ``o_ws [B, H, S, Dv]`` / ``lse_ws [B, H, S]`` (fp32) into ``out [B, H, Dv]``
    (``block_n``: the decode kernel's tile, which fixes each sequence's split ranges)."""
    batch, num_heads, num_splits, dv = o_ws.shape
    block_dv = triton.next_power_of_2(dv)
    attn_splitk_reduce_kernel[(num_heads, batch)](
        o_ws, lse_ws, context_lens, out, num_heads, num_splits, max_len,
        out.stride(0), out.stride(1),
        DV=dv, BLOCK_DV=block_dv, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_N=block_n,
        num_warps=4 if block_dv >= 512 else 2,
    )  # fmt: skip
    return out


@dataclass(frozen=True, eq=False)
class SplitPlan:
    """How a decode launch splits the context, with the fp32 workspaces of the splits.

    ``o_ws [B, H, S, Dv]`` / ``lse_ws [B, H, S]`` exist only when ``num_splits > 1``;
    otherwise both are the output itself (passed to the kernel, never written).
    """

    num_splits: int
    block_n: int  # each sequence's own length is spread over the splits in these tiles
    max_len: int
    o_ws: torch.Tensor
    lse_ws: torch.Tensor

    @property
    def is_split(self) -> bool:
        return self.num_splits > 1

    def finish(self, context_lens: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """After the decode kernel: combine the splits into ``out`` (a no-op unsplit)."""
        if self.is_split:
            combine_splits(self.o_ws, self.lse_ws, context_lens, out, self.block_n, self.max_len)
        return out


def plan_splits(
    out: torch.Tensor,
    max_len: int,
    num_programs: int,
    num_splits: int | None,
    config: DecodeAttnConfig,
    num_sms: int | None,
) -> SplitPlan:
    """The split plan of a decode kernel writing ``out [B, H, Dv]`` over a table of
    ``max_len`` positions with ``num_programs`` programs per split (host arithmetic only;
    ``num_splits`` None picks it from the SM count, see ``pick_num_splits``)."""
    if num_splits is None:
        sms = num_sms if num_sms is not None else device_num_sms(out.device)
        num_splits = pick_num_splits(num_programs, max_len, sms, config)
    num_splits = usable_splits(max_len, num_splits, config.block_n)
    o_ws = lse_ws = out
    if num_splits > 1:
        batch, num_heads, dv = out.shape
        o_ws = torch.empty(
            (batch, num_heads, num_splits, dv), dtype=torch.float32, device=out.device
        )
        lse_ws = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=out.device)
    return SplitPlan(num_splits, config.block_n, max_len, o_ws, lse_ws)
