"""The block manager's invariants, checked after every step by the tests.

- every usable block is exactly one of free (no owner, no hash), cached (no
  owner, registered, evictable) or used (owned), so free + cached + used is
  the pool: nothing leaked, nothing double-freed;
- a block's reference count equals its number of owners, and no sequence
  holds a block twice; block 0 (scratch) is never owned, free or cached;
- the hash index and the blocks' hashes agree one to one;
- a registered or shared block lies wholly within each owner's computed
  tokens (shared K/V is never written) and its hash is the owner's own chained
  hash at that position (it holds that owner's tokens);
- each live sequence has room for its computed tokens and no block past its
  tokens.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chitu_core.engine.kv_cache import BlockManager
    from chitu_core.engine.sequence import Sequence


def check_block_manager(
    manager: BlockManager, live_seqs: list[Sequence], scratch_block_id: int
) -> None:
    """Raise ``RuntimeError`` naming the first broken invariant."""
    size, num_blocks = manager.block_size, manager.num_blocks
    refs, hash_of = manager._ref_counts, manager._hash_of_block
    free_ids = list(manager.free_block_ids)
    free_set = set(free_ids)
    cached_set = set(manager._evictable)
    if len(free_set) != len(free_ids):
        raise RuntimeError("a block is on the free list twice")
    if scratch_block_id in free_set or scratch_block_id in cached_set:
        raise RuntimeError("the scratch block 0 is on the free list")
    if not all(0 < b < num_blocks for b in free_set | cached_set):
        raise RuntimeError("the free list holds an unknown block id")
    if free_set & cached_set:
        raise RuntimeError(f"blocks {sorted(free_set & cached_set)} are both free and cached")
    for block_id in free_set:
        if refs[block_id] or hash_of[block_id] is not None:
            raise RuntimeError(f"free block {block_id} has owners or a hash")
    for block_id in cached_set:
        if refs[block_id] or hash_of[block_id] is None:
            raise RuntimeError(f"cached block {block_id} has owners or no hash")
    for digest, block_id in manager._block_of_hash.items():
        if hash_of[block_id] != digest:
            raise RuntimeError(f"the hash index points at block {block_id} of another hash")
    num_hashed = sum(digest is not None for digest in hash_of)
    if num_hashed != len(manager._block_of_hash):
        raise RuntimeError("a block's hash is missing from the hash index")

    owners: Counter[int] = Counter()
    owner_of: dict[int, int] = {}
    for seq in live_seqs:
        if len(set(seq.block_ids)) != len(seq.block_ids):
            raise RuntimeError(f"sequence {seq.seq_id} holds a block twice: {seq.block_ids}")
        for index, block_id in enumerate(seq.block_ids):
            if block_id == scratch_block_id:
                raise RuntimeError(f"sequence {seq.seq_id} owns the scratch block 0")
            if not 0 < block_id < num_blocks:
                raise RuntimeError(f"sequence {seq.seq_id} owns unknown block {block_id}")
            if block_id in free_set or block_id in cached_set:
                raise RuntimeError(
                    f"block {block_id} is owned by sequence {seq.seq_id} and also free"
                )
            if block_id in owner_of and not manager.enable_prefix_caching:
                raise RuntimeError(
                    f"block {block_id} owned by sequences {owner_of[block_id]} and {seq.seq_id}"
                )
            owners[block_id] += 1
            owner_of[block_id] = seq.seq_id
            is_shared = refs[block_id] > 1 or hash_of[block_id] is not None
            if is_shared and (index + 1) * size > seq.num_computed_tokens:
                raise RuntimeError(
                    f"shared or cached block {block_id} is not yet computed by "
                    f"sequence {seq.seq_id}: its K/V would be written while shared"
                )
            digest = hash_of[block_id]
            if digest is not None and manager._hashes(seq, index + 1)[index] != digest:
                raise RuntimeError(
                    f"block {block_id} of sequence {seq.seq_id} holds other tokens than its own"
                )
        num_held = len(seq.block_ids)
        if num_held * size < seq.num_computed_tokens:
            raise RuntimeError(
                f"sequence {seq.seq_id} has {seq.num_computed_tokens} computed tokens "
                f"but only {num_held} blocks"
            )
        if num_held > -(-seq.num_tokens // size):
            raise RuntimeError(
                f"sequence {seq.seq_id} holds {num_held} blocks for {seq.num_tokens} tokens"
            )
    for block_id, count in owners.items():
        if refs[block_id] != count:
            raise RuntimeError(
                f"block {block_id} has reference count {refs[block_id]} but {count} owners"
            )
    num_used = sum(1 for count in refs if count)
    if num_used != len(owners):
        raise RuntimeError(
            f"{num_used - len(owners)} blocks leaked: referenced but owned by no live sequence"
        )
    num_accounted = len(free_set) + len(cached_set) + num_used
    if num_accounted != manager.num_usable_blocks:
        raise RuntimeError(
            f"{manager.num_usable_blocks - num_accounted} blocks leaked: neither free, "
            "cached nor owned by a live sequence"
        )
