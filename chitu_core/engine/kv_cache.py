"""Paged KV-cache bookkeeping: a free list of fixed-size blocks and per-sequence block tables.

Only block ids live here; the cache tensors belong to the model runner. Token
``p`` of a sequence is stored at slot ``block_ids[p // block_size] *
block_size + p % block_size`` of the flat ``[num_blocks * block_size]`` cache.
No prefix caching: every block has exactly one owner.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterable

from chitu_core.engine.sequence import Sequence

# Padding tokens of static (graph-captured) batches write their K/V here, so it
# is never handed to a sequence.
SCRATCH_BLOCK_ID = 0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_int(name: str, value: object, minimum: int, why: str = "") -> int:
    """``value`` as an int (numpy ints welcome), or ``ValueError`` if it isn't one >= minimum."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{why}, got {value!r}")
    return number


class BlockManager:
    """Hands out KV blocks ``1 .. num_blocks - 1`` (block 0 is the scratch block)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = _check_int(
            "num_blocks", num_blocks, 2, f" (block {SCRATCH_BLOCK_ID} is reserved as scratch)"
        )
        self.block_size = _check_int("block_size", block_size, 1)
        self.free_block_ids: deque[int] = deque(range(SCRATCH_BLOCK_ID + 1, num_blocks))

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def max_num_tokens(self) -> int:
        """Tokens the whole cache holds: the most one sequence can ever have cached."""
        return self.num_usable_blocks * self.block_size

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold ``num_tokens`` tokens in total (0 if it has them)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return max(0, _ceil_div(num_tokens, self.block_size) - len(seq.block_ids))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq.block_ids`` to hold ``num_tokens`` tokens; the caller checks first."""
        num_needed = self.blocks_needed(seq, num_tokens)
        if num_needed > self.num_free_blocks:
            raise RuntimeError(
                f"out of KV blocks: sequence {seq.seq_id} needs {num_needed} more for "
                f"{num_tokens} tokens but {self.num_free_blocks} are free "
                "(call can_allocate first and preempt when it is False)"
            )
        for _ in range(num_needed):
            seq.block_ids.append(self.free_block_ids.popleft())

    def free(self, seq: Sequence) -> None:
        """Return all of ``seq``'s blocks to the pool and empty its block table."""
        self.free_block_ids.extend(seq.block_ids)
        seq.block_ids.clear()

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat cache slot of token ``position`` of ``seq`` (its block must be allocated)."""
        if not 0 <= position < len(seq.block_ids) * self.block_size:
            raise IndexError(
                f"position {position} of sequence {seq.seq_id} is outside its "
                f"{len(seq.block_ids)} allocated blocks of {self.block_size} tokens"
            )
        block_id = seq.block_ids[position // self.block_size]
        return block_id * self.block_size + position % self.block_size

    def check_invariants(self, live_seqs: Iterable[Sequence]) -> None:
        """Raise ``RuntimeError`` unless every usable block is free or owned by one live sequence.

        Also checks that block 0 is never owned or free-listed, that each live
        sequence has enough blocks for its computed tokens and none beyond its
        tokens. Used by tests and the engine's debug mode.
        """
        free_ids = list(self.free_block_ids)
        free_set = set(free_ids)
        if len(free_set) != len(free_ids):
            raise RuntimeError("a block is on the free list twice")
        owner: dict[int, int] = {}
        for seq in live_seqs:
            for block_id in seq.block_ids:
                if block_id == SCRATCH_BLOCK_ID:
                    raise RuntimeError(f"sequence {seq.seq_id} owns the scratch block 0")
                if not 0 < block_id < self.num_blocks:
                    raise RuntimeError(f"sequence {seq.seq_id} owns unknown block {block_id}")
                if block_id in owner:
                    raise RuntimeError(
                        f"block {block_id} owned by sequences {owner[block_id]} and {seq.seq_id}"
                    )
                if block_id in free_set:
                    raise RuntimeError(
                        f"block {block_id} is owned by sequence {seq.seq_id} and also free"
                    )
                owner[block_id] = seq.seq_id
            num_blocks_held = len(seq.block_ids)
            if num_blocks_held * self.block_size < seq.num_computed_tokens:
                raise RuntimeError(
                    f"sequence {seq.seq_id} has {seq.num_computed_tokens} computed tokens "
                    f"but only {num_blocks_held} blocks"
                )
            if num_blocks_held > _ceil_div(seq.num_tokens, self.block_size):
                raise RuntimeError(
                    f"sequence {seq.seq_id} holds {num_blocks_held} blocks for "
                    f"{seq.num_tokens} tokens"
                )
        if SCRATCH_BLOCK_ID in free_set:
            raise RuntimeError("the scratch block 0 is on the free list")
        if not all(0 < block_id < self.num_blocks for block_id in free_set):
            raise RuntimeError("the free list holds an unknown block id")
        num_accounted = len(free_set) + len(owner)
        if num_accounted != self.num_usable_blocks:
            raise RuntimeError(
                f"{self.num_usable_blocks - num_accounted} blocks leaked: neither free nor "
                "owned by a live sequence"
            )
