"""Prefix caching in the block manager and the scheduler, case by case (see also the fuzz)."""

from __future__ import annotations

from chitu_core.engine.kv_cache import BlockManager
from chitu_core.engine.scheduler import Scheduler, SchedulerConfig
from chitu_core.engine.sequence import Sequence

SIZE = 4


def computed(manager: BlockManager, seq: Sequence) -> Sequence:
    """Admit ``seq`` with its cached prefix and mark all its tokens computed."""
    manager.admit(seq, manager.cached_prefix(seq), seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    manager.register_computed_blocks(seq)
    return seq


def test_shared_prefix_is_reused_and_counted():
    manager = BlockManager(16, SIZE)
    first = computed(manager, Sequence(0, list(range(10)), 4))
    second = Sequence(1, list(range(9)) + [99, 5], 4)
    cached = manager.cached_prefix(second)
    assert cached == first.block_ids[:2]  # tokens 0..7; token 8 is in an unfinished block
    assert manager.blocks_to_admit(second, cached, 11) == 1  # held blocks cost nothing
    manager.admit(second, cached, 11)
    assert second.num_computed_tokens == 8
    assert [manager.ref_count(b) for b in second.block_ids] == [2, 2, 1]
    assert (manager.num_query_tokens, manager.num_hit_tokens) == (10 + 11, 8)
    assert manager.num_used_blocks == 4  # 3 + 3 blocks, 2 of them shared
    manager.check_invariants([first, second])


def test_fully_cached_prompt_recomputes_its_last_block_privately():
    manager = BlockManager(16, SIZE)
    first = computed(manager, Sequence(0, list(range(8)), 4))
    manager.free(first)
    again = Sequence(1, list(range(8)), 4)
    cached = manager.cached_prefix(again)
    assert len(cached) == 1  # the last block is left out: its last token gives the logits
    manager.admit(again, cached, 8)
    assert again.num_computed_tokens == 4 and again.num_uncomputed_tokens == 4
    assert manager.ref_count(again.block_ids[1]) == 1
    manager.check_invariants([again])


def test_freed_blocks_stay_cached_until_evicted_tail_first():
    manager = BlockManager(5, SIZE)  # 4 usable blocks
    first = computed(manager, Sequence(0, list(range(13)), 4))  # 3 full blocks + 1 partial
    head, middle, tail, partial = first.block_ids
    manager.free(first)
    assert manager.num_free_blocks == 4 and manager.num_cached_blocks == 3
    manager.check_invariants([])
    other = Sequence(1, [50] * 8, 4)
    manager.allocate(other, 8)  # the never-registered block first, then the chain's tail
    assert other.block_ids == [partial, tail]
    again = Sequence(2, list(range(13)), 4)
    assert manager.cached_prefix(again) == [head, middle]
    manager.check_invariants([other])


def test_reused_block_is_freshest_in_lru_order():
    manager = BlockManager(5, SIZE)  # 4 usable
    a = computed(manager, Sequence(0, [1] * 4 + [0], 1))
    b = computed(manager, Sequence(1, [2] * 4 + [0], 1))
    block_a, block_b = a.block_ids[0], b.block_ids[0]
    manager.free(a)
    manager.free(b)
    hit = Sequence(2, [1] * 4 + [5], 1)
    manager.admit(hit, manager.cached_prefix(hit), 5)  # reuses a's block
    manager.free(hit)
    # Evicted in order: plain free blocks, then b's (freed longest ago), then a's.
    filler = Sequence(3, [9] * 16, 1)
    manager.allocate(filler, 16)
    assert filler.block_ids.index(block_b) < filler.block_ids.index(block_a)
    assert manager.num_cached_blocks == 0
    manager.check_invariants([filler])


def test_block_computed_twice_stays_private():
    manager = BlockManager(16, SIZE)
    twins = [Sequence(i, list(range(6)), 4) for i in range(2)]
    for seq in twins:  # both admitted before either computed: no hit
        manager.admit(seq, manager.cached_prefix(seq), 6)
    for seq in twins:
        seq.num_computed_tokens = 6
        manager.register_computed_blocks(seq)
    manager.check_invariants(twins)
    for seq in twins:
        manager.free(seq)
    assert manager.num_cached_blocks == 1  # one copy registered, the other plain free
    manager.check_invariants([])


def test_disabled_manager_never_registers():
    manager = BlockManager(16, SIZE, enable_prefix_caching=False)
    first = computed(manager, Sequence(0, list(range(12)), 4))
    manager.free(first)
    assert manager.num_cached_blocks == 0
    assert manager.cached_prefix(Sequence(1, list(range(12)), 4)) == []


def test_scheduler_admits_a_cached_prompt_that_only_fits_because_blocks_are_shared():
    # 6 usable blocks; the first request holds 5 of them for 19 + 1 tokens.
    scheduler = Scheduler(SchedulerConfig(max_model_len=24), BlockManager(7, SIZE))
    first = Sequence(0, list(range(19)), 4)
    scheduler.add(first)
    batch = scheduler.schedule()
    scheduler.after_step(batch)
    first.append_token(1)
    # Same 16-token prefix: needs 2 new blocks without sharing, 1 with (1 free).
    second = Sequence(1, list(range(16)) + [77, 78], 4)
    scheduler.add(second)
    batch = scheduler.schedule()
    assert batch.seqs == [first, second]
    assert batch.start_positions == [19, 16] and batch.num_new_tokens == [1, 2]
    scheduler.check_invariants()


def test_preempted_sequence_resumes_from_its_own_cached_blocks():
    scheduler = Scheduler(SchedulerConfig(max_model_len=16), BlockManager(5, SIZE))
    seq = Sequence(0, list(range(9)), 6)
    scheduler.add(seq)
    scheduler.after_step(scheduler.schedule())
    seq.append_token(3)
    scheduler._preempt(seq)
    batch = scheduler.schedule()
    assert batch.start_positions == [8] and batch.num_new_tokens == [2]
    scheduler.check_invariants()
