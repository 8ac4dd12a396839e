"""Paged KV-cache bookkeeping: block tables, reference counts and the prefix cache.

Only block ids live here; the cache tensors belong to the model runner. Token
``p`` of a sequence is stored at slot ``block_ids[p // block_size] *
block_size + p % block_size`` of the flat ``[num_blocks * block_size]`` cache.

Automatic prefix caching: once a block is full and its K/V computed, it is
registered under its chained hash (``block_hash.py``). A new (or preempted)
sequence starts from the longest chain of registered blocks matching its
tokens, shares them (reference counts) and computes only the rest. A block is
only ever written while it is its one owner's partly computed tail, so shared
blocks are read-only. A block whose last owner frees it keeps its K/V and its
hash, reusable, until allocation evicts it, least recently freed first.

Every usable block is in exactly one of three states:

- free: no owner, no hash (``free_block_ids``);
- cached: no owner, registered, evictable (LRU order);
- used: one or more owners (its reference count).
"""

from __future__ import annotations

import operator
from collections import OrderedDict, deque
from collections.abc import Iterable

from chitu_core.engine.block_hash import block_hash, root_hash
from chitu_core.engine.kv_invariants import check_block_manager
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
    """Hands out KV blocks ``1 .. num_blocks - 1`` (block 0 is the scratch block).

    ``enable_prefix_caching=False`` never registers a block, so every block has
    one owner and a freed block is plain free. ``extra_key`` seeds the hash
    chain (see ``block_hash.py``).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        extra_key: bytes = b"",
    ) -> None:
        self.num_blocks = _check_int(
            "num_blocks", num_blocks, 2, f" (block {SCRATCH_BLOCK_ID} is reserved as scratch)"
        )
        self.block_size = _check_int("block_size", block_size, 1)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.free_block_ids: deque[int] = deque(range(SCRATCH_BLOCK_ID + 1, num_blocks))
        self._ref_counts = [0] * num_blocks
        self._hash_of_block: list[bytes | None] = [None] * num_blocks
        self._block_of_hash: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self._root_hash = root_hash(extra_key)
        # Prometheus-style totals: tokens of admitted sequences looked up, and found.
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocation can hand out: free ones plus cached ones it may evict."""
        return len(self.free_block_ids) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks with no owner that still hold reusable K/V."""
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks owned by at least one sequence (a shared block counts once)."""
        return self.num_usable_blocks - self.num_free_blocks

    @property
    def max_num_tokens(self) -> int:
        """Tokens the whole cache holds: the most one sequence can ever have cached."""
        return self.num_usable_blocks * self.block_size

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

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
            block_id = self._take_free_block()
            self._ref_counts[block_id] = 1
            seq.block_ids.append(block_id)

    def _take_free_block(self) -> int:
        if self.free_block_ids:
            return self.free_block_ids.popleft()
        block_id, _ = self._evictable.popitem(last=False)
        del self._block_of_hash[self._hash_of_block[block_id]]
        self._hash_of_block[block_id] = None
        return block_id

    # -- prefix cache ------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chained hashes of ``seq``'s first ``num_blocks`` full blocks (memoized on it)."""
        hashes, size = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            index = len(hashes)
            parent = hashes[-1] if hashes else self._root_hash
            hashes.append(block_hash(parent, seq.token_slice(index * size, (index + 1) * size)))
        return hashes

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest registered chain matching ``seq``'s leading full blocks.

        At least the last token is left out, so the step that computes the rest
        yields logits: a prompt cached to its end recomputes its last block into
        a block of its own (shared blocks are never written). Changes no state
        but ``seq``'s memoized hashes. Empty when prefix caching is off.
        """
        if not self.enable_prefix_caching:
            return []
        num_candidates = (seq.num_tokens - 1) // self.block_size
        block_ids = []
        for digest in self._hashes(seq, num_candidates):
            block_id = self._block_of_hash.get(digest)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def blocks_to_admit(self, seq: Sequence, cached: list[int], num_tokens: int) -> int:
        """Free blocks ``admit(seq, cached, num_tokens)`` takes from the pool: the new blocks
        plus the cached blocks nobody owns (a block already in use costs nothing)."""
        num_new = max(0, _ceil_div(num_tokens, self.block_size) - len(cached))
        return num_new + sum(1 for block_id in cached if self._ref_counts[block_id] == 0)

    def admit(self, seq: Sequence, cached: list[int], num_tokens: int) -> None:
        """Give a sequence without blocks the ``cached`` prefix (from ``cached_prefix``) as
        computed tokens, and new blocks up to ``num_tokens``; the caller checks
        ``blocks_to_admit`` against ``num_free_blocks`` first."""
        if seq.block_ids:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks {seq.block_ids}")
        if self.blocks_to_admit(seq, cached, num_tokens) > self.num_free_blocks:
            raise RuntimeError(
                f"out of KV blocks admitting sequence {seq.seq_id} (check blocks_to_admit first)"
            )
        for block_id in cached:
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self._ref_counts[block_id] += 1
        seq.block_ids = list(cached)
        seq.num_computed_tokens = len(cached) * self.block_size
        seq.num_registered_blocks = len(cached)
        if self.enable_prefix_caching:
            self.num_query_tokens += seq.num_tokens
            self.num_hit_tokens += seq.num_computed_tokens
        self.allocate(seq, num_tokens)

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Offer ``seq``'s full blocks whose K/V is computed (queued on the device: later
        steps read it after) to the prefix cache. A block whose hash is already
        cached (computed twice concurrently) stays private and unregistered."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        hashes = self._hashes(seq, num_full)
        for index in range(seq.num_registered_blocks, num_full):
            block_id, digest = seq.block_ids[index], hashes[index]
            if self._hash_of_block[block_id] is None and digest not in self._block_of_hash:
                self._hash_of_block[block_id] = digest
                self._block_of_hash[digest] = block_id
        seq.num_registered_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s ownership of its blocks and empty its block table; blocks left with
        no owner stay cached if registered, else become free."""
        self.register_computed_blocks(seq)
        # Tail first, so a chain's later blocks are evicted before its head.
        for block_id in reversed(seq.block_ids):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if self._hash_of_block[block_id] is None:
                    self.free_block_ids.append(block_id)
                else:
                    self._evictable[block_id] = None
        seq.block_ids.clear()
        seq.num_registered_blocks = 0

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
        """Raise ``RuntimeError`` unless the pool, the prefix cache and the owners agree
        (tests and debug mode; the list is in ``kv_invariants.py``)."""
        check_block_manager(self, list(live_seqs), SCRATCH_BLOCK_ID)
