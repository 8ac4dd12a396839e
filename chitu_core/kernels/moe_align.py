"""Sort MoE (token, expert) pairs by expert and pad each expert's rows to whole tiles.

The fused MoE kernels (``fused_moe.py``) work on tiles of ``block_m`` rows that
all belong to one expert, so each program streams one expert's weight tile.
This module builds that layout on the device, with no host sync: the number
of tiles actually used is data-dependent, so it stays a device tensor and the
kernels are launched over an upper bound that is known on the host.

Pair ``p`` is ``(token p // top_k, expert topk_ids.flatten()[p])``, ``P = T * top_k``.
Expert ``e`` receives ``count[e]`` pairs and ``ceil(count[e] / block_m)`` blocks;
the blocks follow one another in expert order, each expert's pairs in pair
order (a stable sort), and the rows past ``count[e]`` in its last block hold the
sentinel ``P``. Since every used block holds at least one pair and at most
``block_m - 1`` rows of padding per expert, the number of blocks is at most
``min(P, ceil(P / block_m) + E)`` (``max_blocks``).

Two implementations of the same function (identical outputs):

* ``moe_align_kernel``: one Triton program, one launch (decode: a few hundred
  pairs, where a dozen torch launches would cost more than the expert GEMMs'
  launch gaps). Work ~ P * E_pad compares, so it is used up to ``MAX_KERNEL_PAIRS``.
* ``_align_torch``: sort + scans in torch (prefill: thousands of pairs, where
  the sort's few launches are noise next to the GEMMs).

Bytes moved: 4*P read twice, 4*max_blocks*(block_m + 1) written. No FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# block_expert value of a block past the used ones: its program exits at once.
UNUSED_BLOCK = -1
# Largest P aligned by the single-program kernel; above it the torch sort is faster.
MAX_KERNEL_PAIRS = 4096


@dataclass(frozen=True, eq=False)
class MoeAlignment:
    """The expert-sorted, tile-padded layout of the (token, expert) pairs.

    sorted_pair_ids: ``[max_blocks * block_m]`` int32; row ``r`` of block ``b`` is
        entry ``b * block_m + r``: a pair index in ``[0, P)``, or ``P`` (padding).
    block_expert: ``[max_blocks]`` int32, the expert of each block, or
        ``UNUSED_BLOCK`` for blocks past ``num_blocks``.
    num_blocks: ``[1]`` int32 on the device, the number of used blocks.
    num_pairs: ``P`` (host int), also the padding sentinel.
    block_m: rows per block.
    """

    sorted_pair_ids: torch.Tensor
    block_expert: torch.Tensor
    num_blocks: torch.Tensor
    num_pairs: int
    block_m: int

    @property
    def max_blocks(self) -> int:
        """Host-known upper bound on the used blocks: the launch grid's M extent."""
        return self.block_expert.shape[0]


def max_num_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """``min(P, ceil(P / block_m) + E)``: no expert alignment can need more blocks."""
    return min(num_pairs, triton.cdiv(num_pairs, block_m) + num_experts)


@triton.jit
def moe_align_kernel(
    topk_ids_ptr,  # [P] int32 expert ids, in [0, num_experts)
    sorted_ptr,  # [max_blocks * BLOCK_M] int32 out: pair ids, num_pairs = padding
    block_expert_ptr,  # [max_blocks] int32 out: expert per block, -1 = unused
    num_blocks_ptr,  # [1] int32 out
    num_pairs,
    max_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,  # pairs per chunk
    BLOCK_E: tl.constexpr,  # experts, padded to a power of two
    BLOCK_B: tl.constexpr,  # blocks (and BLOCK_B * BLOCK_M slots) per chunk
):
    """One program: count pairs per expert, lay out the blocks, scatter pair ids.

    Per-expert vectors live in registers ([BLOCK_E]); a pair's expert selects its
    entry through a one-hot [BLOCK_P, BLOCK_E] product (no register gather in Triton).
    """
    offs_e = tl.arange(0, BLOCK_E)
    offs_c = tl.arange(0, BLOCK_P)

    # Pass 1: pairs per expert.
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        ids = tl.load(topk_ids_ptr + p0 + offs_c, mask=p0 + offs_c < num_pairs, other=-1)
        counts += tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, axis=0)  # inclusive: expert e owns [end - blocks, end)
    num_blocks = tl.sum(blocks, axis=0)
    tl.store(num_blocks_ptr, num_blocks)

    # Block b belongs to the first expert whose range ends after b: count the ones
    # ending at or before it (padded experts end at num_blocks > b: never counted).
    offs_b = tl.arange(0, BLOCK_B)
    offs_s = tl.arange(0, BLOCK_B * BLOCK_M)
    for b0 in range(0, max_blocks, BLOCK_B):
        b = b0 + offs_b
        owner = tl.sum((block_end[None, :] <= b[:, None]).to(tl.int32), axis=1)
        owner = tl.where(b < num_blocks, owner, -1)
        tl.store(block_expert_ptr + b, owner, mask=b < max_blocks)
        slot = b0 * BLOCK_M + offs_s
        tl.store(sorted_ptr + slot, num_pairs + 0 * slot, mask=slot < max_blocks * BLOCK_M)
    # The scatter below overwrites some of the padding just written, from other
    # threads: the barrier orders the two (bar.sync makes global writes visible).
    tl.debug_barrier()

    # Pass 2: destination = expert's first row + pairs of the expert seen so far
    # + same-expert pairs earlier in this chunk.
    row_begin = (block_end - blocks) * BLOCK_M
    seen = tl.zeros([BLOCK_E], dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        pair = p0 + offs_c
        ids = tl.load(topk_ids_ptr + pair, mask=pair < num_pairs, other=-1)
        onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)  # [BLOCK_P, BLOCK_E]
        base = tl.sum(onehot * (row_begin + seen)[None, :], axis=1)
        earlier = (ids[:, None] == ids[None, :]) & (offs_c[None, :] < offs_c[:, None])
        rank = tl.sum(earlier.to(tl.int32), axis=1)
        tl.store(sorted_ptr + base + rank, pair, mask=pair < num_pairs)
        seen += tl.sum(onehot, axis=0)


def _align_torch(flat_ids: torch.Tensor, num_experts: int, block_m: int, max_blocks: int):
    """The same layout with torch ops (stable sort, scans, one scatter); no host sync."""
    num_pairs = flat_ids.numel()
    ids = flat_ids.long()
    device = ids.device
    # scatter_add, not bincount: CUDA bincount reads max() on the host.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)  # [E]
    row_begin = (block_end - blocks) * block_m
    pair_begin = torch.cumsum(counts, 0) - counts  # first sorted position of each expert

    order = torch.argsort(ids, stable=True)  # pair ids grouped by expert, pair order kept
    expert_of = ids[order]
    rank = torch.arange(num_pairs, device=device) - pair_begin[expert_of]
    sorted_pair_ids = torch.full(
        (max_blocks * block_m,), num_pairs, dtype=torch.int32, device=device
    )
    sorted_pair_ids[row_begin[expert_of] + rank] = order.to(torch.int32)

    num_blocks = block_end[-1:]  # a view: no host read
    b = torch.arange(max_blocks, device=device)
    owner = torch.searchsorted(block_end, b, right=True)
    block_expert = torch.where(b < num_blocks, owner, UNUSED_BLOCK).to(torch.int32)
    return sorted_pair_ids, block_expert, num_blocks.to(torch.int32)


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, *, use_kernel: bool | None = None
) -> MoeAlignment:
    """Sort the (token, expert) pairs by expert, padding each expert to ``block_m`` rows.

    Args:
        topk_ids: ``[T, top_k]`` int32 (or int64) expert ids in ``[0, num_experts)``.
        num_experts: ``E``.
        block_m: rows per tile of the MoE kernels, a power of two.
        use_kernel: True forces the Triton kernel, False the torch path; None
            picks the kernel up to ``MAX_KERNEL_PAIRS`` pairs.

    Returns a ``MoeAlignment`` on ``topk_ids.device``. No host sync.
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, top_k], got shape {tuple(topk_ids.shape)}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    flat = topk_ids.reshape(-1)
    num_pairs = flat.numel()
    max_blocks = max_num_blocks(num_pairs, num_experts, block_m)
    device = topk_ids.device
    if num_pairs == 0:
        empty = torch.empty(0, dtype=torch.int32, device=device)
        return MoeAlignment(
            empty, empty, torch.zeros(1, dtype=torch.int32, device=device), 0, block_m
        )
    if use_kernel is None:
        use_kernel = num_pairs <= MAX_KERNEL_PAIRS
    if not use_kernel:
        sorted_ids, block_expert, num_blocks = _align_torch(flat, num_experts, block_m, max_blocks)
        return MoeAlignment(sorted_ids, block_expert, num_blocks, num_pairs, block_m)

    flat = flat.to(torch.int32).contiguous()
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_blocks = torch.empty(1, dtype=torch.int32, device=device)
    block_e = max(16, triton.next_power_of_2(num_experts))
    # Chunks of up to 32K elements (128 registers a thread over 8 warps): the one-hot
    # [BLOCK_P, BLOCK_E], the pairwise rank [BLOCK_P, BLOCK_P], the owner search
    # [BLOCK_B, BLOCK_E] and the padding fill [BLOCK_B * BLOCK_M].
    block_p = max(16, min(triton.next_power_of_2(num_pairs), 32768 // block_e, 128))
    block_b = max(16, min(triton.next_power_of_2(max_blocks), 32768 // block_e))
    block_b = max(1, min(block_b, 32768 // block_m))
    moe_align_kernel[(1,)](
        flat, sorted_ids, block_expert, num_blocks, num_pairs, max_blocks,
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_E=block_e, BLOCK_B=block_b, num_warps=8,
    )  # fmt: skip
    return MoeAlignment(sorted_ids, block_expert, num_blocks, num_pairs, block_m)
