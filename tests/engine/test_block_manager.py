"""BlockManager: free list, reserved scratch block, slots and the ownership invariants
(prefix caching: test_prefix_cache.py and test_prefix_cache_fuzz.py)."""

from __future__ import annotations

import pytest

from chitu_core.engine.kv_cache import SCRATCH_BLOCK_ID, BlockManager
from chitu_core.engine.sequence import Sequence, SequenceStatus


def make_seq(seq_id: int, num_prompt_tokens: int = 4, max_tokens: int = 4) -> Sequence:
    return Sequence(seq_id, list(range(num_prompt_tokens)), max_tokens)


@pytest.mark.parametrize(
    ("num_blocks", "block_size"), [(1, 4), (0, 4), (-3, 4), (4, 0), (4, -1), (4.0, 4), ("4", 4)]
)
def test_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_sequence_properties():
    seq = Sequence(7, [1, 2, 3], max_tokens=5, request={"temperature": 0.0})
    assert seq.status is SequenceStatus.WAITING and not seq.is_finished
    assert (seq.num_tokens, seq.num_prompt_tokens, seq.num_output_tokens) == (3, 3, 0)
    assert seq.last_token_id == 3
    seq.append_token(9)
    seq.num_computed_tokens = 3
    assert seq.token_ids == [1, 2, 3, 9]
    assert seq.last_token_id == 9
    assert seq.num_uncomputed_tokens == 1
    assert seq.request == {"temperature": 0.0}


def test_block_zero_is_reserved():
    manager = BlockManager(num_blocks=5, block_size=4)
    assert manager.num_usable_blocks == 4
    assert manager.num_free_blocks == 4
    assert manager.max_num_tokens == 16
    seq = make_seq(0, num_prompt_tokens=16)
    manager.allocate(seq, 16)
    assert sorted(seq.block_ids) == [1, 2, 3, 4]
    assert SCRATCH_BLOCK_ID not in seq.block_ids
    assert manager.num_free_blocks == 0
    manager.check_invariants([seq])


def test_blocks_needed_and_incremental_allocate():
    manager = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(0)
    assert [manager.blocks_needed(seq, n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    manager.allocate(seq, 5)
    assert len(seq.block_ids) == 2
    assert manager.blocks_needed(seq, 8) == 0
    assert manager.blocks_needed(seq, 3) == 0  # never negative
    assert manager.blocks_needed(seq, 9) == 1
    manager.allocate(seq, 8)  # already held: no-op
    assert len(seq.block_ids) == 2
    manager.allocate(seq, 9)
    assert len(seq.block_ids) == 3
    assert manager.num_free_blocks == 9 - 3
    with pytest.raises(ValueError):
        manager.blocks_needed(seq, -1)


def test_allocate_beyond_pool_raises_and_changes_nothing():
    manager = BlockManager(num_blocks=3, block_size=2)
    seq = make_seq(0)
    assert manager.can_allocate(seq, 4)
    assert not manager.can_allocate(seq, 5)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        manager.allocate(seq, 5)
    assert seq.block_ids == [] and manager.num_free_blocks == 2


def test_free_returns_blocks_for_reuse():
    manager = BlockManager(num_blocks=4, block_size=2)
    first, second = make_seq(0), make_seq(1, num_prompt_tokens=6)
    manager.allocate(first, 4)
    assert not manager.can_allocate(second, 4)
    held = list(first.block_ids)
    manager.free(first)
    assert first.block_ids == [] and manager.num_free_blocks == 3
    manager.allocate(second, 6)
    assert set(held) <= set(second.block_ids)
    manager.check_invariants([first, second])


def test_slot_mapping():
    manager = BlockManager(num_blocks=8, block_size=4)
    filler, seq = make_seq(0), make_seq(1)
    manager.allocate(filler, 4)  # so seq's blocks are not 1, 2
    manager.allocate(seq, 6)
    first_block, second_block = seq.block_ids
    assert manager.slot(seq, 0) == first_block * 4
    assert manager.slot(seq, 3) == first_block * 4 + 3
    assert manager.slot(seq, 4) == second_block * 4
    assert manager.slot(seq, 7) == second_block * 4 + 3
    slots = [manager.slot(s, p) for s in (filler, seq) for p in range(len(s.block_ids) * 4)]
    assert len(set(slots)) == len(slots)
    assert min(slots) >= 4  # slots 0..3 are the scratch block
    with pytest.raises(IndexError):
        manager.slot(seq, 8)
    with pytest.raises(IndexError):
        manager.slot(seq, -1)


def test_check_invariants_detects_leak():
    manager = BlockManager(num_blocks=6, block_size=4)
    seq = make_seq(0)
    manager.allocate(seq, 4)
    with pytest.raises(RuntimeError, match="leaked"):
        manager.check_invariants([])


def test_check_invariants_detects_double_ownership():
    manager = BlockManager(num_blocks=6, block_size=4)
    first, second = make_seq(0), make_seq(1)
    manager.allocate(first, 4)
    second.block_ids = list(first.block_ids)
    # Shared without a reference: the count disagrees with the owners.
    with pytest.raises(RuntimeError, match="reference count 1 but 2 owners"):
        manager.check_invariants([first, second])
    # Without prefix caching no block may have two owners at all.
    manager = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    first.block_ids, second.block_ids = [], []
    manager.allocate(first, 4)
    second.block_ids = list(first.block_ids)
    with pytest.raises(RuntimeError, match="owned by sequences"):
        manager.check_invariants([first, second])


def test_check_invariants_detects_owned_and_free():
    manager = BlockManager(num_blocks=6, block_size=4)
    seq = make_seq(0)
    seq.block_ids = [manager.free_block_ids[0]]
    with pytest.raises(RuntimeError, match="also free"):
        manager.check_invariants([seq])


def test_check_invariants_detects_scratch_block_use():
    manager = BlockManager(num_blocks=6, block_size=4)
    seq = make_seq(0)
    seq.block_ids = [SCRATCH_BLOCK_ID]
    with pytest.raises(RuntimeError, match="scratch"):
        manager.check_invariants([seq])
    seq.block_ids = []
    manager.free_block_ids.append(SCRATCH_BLOCK_ID)
    with pytest.raises(RuntimeError, match="scratch"):
        manager.check_invariants([seq])


def test_check_invariants_detects_too_few_and_too_many_blocks():
    manager = BlockManager(num_blocks=6, block_size=4)
    seq = make_seq(0, num_prompt_tokens=6)
    manager.allocate(seq, 4)
    seq.num_computed_tokens = 6  # claims K/V it has no room for
    with pytest.raises(RuntimeError, match="computed tokens"):
        manager.check_invariants([seq])
    seq.num_computed_tokens = 0
    manager.allocate(seq, 12)  # 3 blocks for a 6-token sequence
    with pytest.raises(RuntimeError, match="holds 3 blocks"):
        manager.check_invariants([seq])


def test_check_invariants_detects_duplicate_free_entry():
    manager = BlockManager(num_blocks=6, block_size=4)
    manager.free_block_ids.append(manager.free_block_ids[0])
    with pytest.raises(RuntimeError, match="twice"):
        manager.check_invariants([])
