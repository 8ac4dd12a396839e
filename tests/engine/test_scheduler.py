"""Scheduler: FIFO admission, continuous batching, chunked prefill, preemption, abort.

A fake engine drives it: each step it appends a token to every sequence in
``sample_mask`` and finishes those that reached ``max_tokens`` (or
``max_model_len`` tokens), as ``LLMEngine.step`` does.
"""

from __future__ import annotations

import random

import pytest

from chitu_core.engine.kv_cache import BlockManager
from chitu_core.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from chitu_core.engine.sequence import Sequence, SequenceStatus


def make_scheduler(
    num_blocks: int = 64, block_size: int = 4, prefix_caching: bool = True, **limits: int
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(**limits), BlockManager(num_blocks, block_size, prefix_caching)
    )


def add(scheduler: Scheduler, seq_id: int, num_prompt_tokens: int, max_tokens: int) -> Sequence:
    seq = Sequence(seq_id, [seq_id % 100 + 1] * num_prompt_tokens, max_tokens)
    scheduler.add(seq)
    return seq


def step(scheduler: Scheduler, kv_cache: dict[int, tuple[int, int, int]] | None = None):
    """One engine step with a fake model; checks the invariants afterwards.

    With ``kv_cache`` (slot -> (seq_id, position, token)) it plays the cache
    too: every token a sequence counts as computed must still be in its
    slots, untouched by any other sequence, and the step writes its new ones.
    """
    batch = scheduler.schedule()
    manager = scheduler.block_manager
    for seq, start, count in zip(
        batch.seqs, batch.start_positions, batch.num_new_tokens, strict=True
    ):
        assert len(seq.block_ids) * manager.block_size >= start + count
        if kv_cache is not None:
            token_ids = seq.token_ids
            for position in range(start):
                expected = (seq.seq_id, position, token_ids[position])
                assert kv_cache[manager.slot(seq, position)] == expected
            for position in range(start, start + count):
                kv_cache[manager.slot(seq, position)] = (seq.seq_id, position, token_ids[position])
    scheduler.after_step(batch)
    for seq, is_sampled in zip(batch.seqs, batch.sample_mask, strict=True):
        if is_sampled and not seq.is_finished:
            seq.append_token(seq.num_tokens)
            if (
                seq.num_output_tokens == seq.max_tokens
                or seq.num_tokens >= scheduler.config.max_model_len
            ):
                scheduler.finish(seq, "length")
    scheduler.check_invariants()
    return batch


def run_to_completion(scheduler: Scheduler, max_steps: int = 10_000) -> list[ScheduledBatch]:
    batches = []
    while scheduler.has_unfinished():
        assert len(batches) < max_steps, "scheduler made no progress"
        batch = step(scheduler)
        assert batch.seqs, "empty batch while work is pending"
        batches.append(batch)
    return batches


def assert_no_leak(scheduler: Scheduler) -> None:
    manager = scheduler.block_manager
    manager.check_invariants([])
    assert manager.num_free_blocks == manager.num_usable_blocks


@pytest.mark.parametrize(
    "limits",
    [
        {"max_num_seqs": 0},
        {"max_num_batched_tokens": 0},
        {"max_model_len": -1},
        {"max_num_seqs": 2.5},
        {"max_model_len": True},
    ],
)
def test_config_validation(limits):
    with pytest.raises(ValueError):
        SchedulerConfig(**limits)


def test_add_validation():
    scheduler = make_scheduler(num_blocks=5, block_size=4, max_model_len=32)  # 16 cache tokens
    with pytest.raises(ValueError, match="empty"):
        scheduler.add(Sequence(0, [], 4))
    with pytest.raises(ValueError, match="max_tokens"):
        scheduler.add(Sequence(0, [1], 0))
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add(Sequence(0, [1] * 33, 1))
    with pytest.raises(ValueError, match="whole cache"):
        scheduler.add(Sequence(0, [1] * 10, 8))  # 17 tokens of K/V
    add(scheduler, 0, 10, 7)  # 16 tokens of K/V: exactly the cache
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add(Sequence(0, [1], 1))
    assert scheduler.num_waiting == 1


def test_fifo_admission_then_decode():
    scheduler = make_scheduler()
    seqs = [add(scheduler, i, n, 3) for i, n in enumerate([5, 3, 7])]
    batch = step(scheduler)
    assert batch.seqs == seqs
    assert batch.num_new_tokens == [5, 3, 7]
    assert batch.sample_mask == [True, True, True]
    assert not batch.is_decode and batch.num_tokens == 15
    assert [s.arrival_index for s in seqs] == [0, 1, 2]
    batch = step(scheduler)
    assert batch.is_decode and batch.num_new_tokens == [1, 1, 1]
    assert batch.start_positions == [5, 3, 7]
    run_to_completion(scheduler)
    assert all(s.num_output_tokens == 3 and s.finish_reason == "length" for s in seqs)
    assert_no_leak(scheduler)


def test_decode_grows_across_block_boundaries():
    scheduler = make_scheduler(block_size=4)
    seq = add(scheduler, 0, 3, 10)
    step(scheduler)
    assert len(seq.block_ids) == 1
    while not seq.is_finished:
        batch = step(scheduler)
        start = batch.start_positions[0]
        if not seq.is_finished:
            assert len(seq.block_ids) == (start + 1 + 3) // 4  # blocks for start + 1 tokens
    assert seq.num_output_tokens == 10
    assert_no_leak(scheduler)


def test_max_num_seqs():
    scheduler = make_scheduler(max_num_seqs=2)
    first, second, third = (add(scheduler, i, 4, 2 + i) for i in range(3))
    batch = step(scheduler)
    assert batch.seqs == [first, second]
    assert scheduler.num_running == 2 and scheduler.num_waiting == 1
    step(scheduler)  # first finishes
    assert first.is_finished
    batch = step(scheduler)
    assert batch.seqs == [second, third] and batch.num_new_tokens == [1, 4]
    run_to_completion(scheduler)
    assert_no_leak(scheduler)


def test_token_budget_does_not_chunk_later_arrivals():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    seqs = [add(scheduler, i, 4, 3) for i in range(3)]
    batch = step(scheduler)
    # The third would need 4 tokens with 2 left: it waits rather than being chunked.
    assert batch.seqs == seqs[:2] and batch.num_tokens == 8
    batch = step(scheduler)
    assert batch.seqs == seqs and batch.num_new_tokens == [1, 1, 4]
    run_to_completion(scheduler)
    assert_no_leak(scheduler)


def test_chunked_prefill_of_a_long_prompt():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    short = add(scheduler, 0, 2, 30)
    step(scheduler)  # short prefills and starts decoding
    long = add(scheduler, 1, 20, 2)
    batches = [step(scheduler) for _ in range(3)]
    assert [b.num_new_tokens for b in batches] == [[1, 7], [1, 7], [1, 6]]
    assert [b.sample_mask for b in batches] == [[True, False], [True, False], [True, True]]
    assert [b.start_positions[1] for b in batches] == [0, 7, 14]
    assert long.num_computed_tokens == 20 and long.num_output_tokens == 1
    assert all(b.seqs == [short, long] for b in batches)
    run_to_completion(scheduler)
    assert long.num_output_tokens == 2 and short.num_output_tokens == 30
    assert_no_leak(scheduler)


def test_long_prompt_is_chunked_alone():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    seq = add(scheduler, 0, 10, 1)
    counts = [step(scheduler).num_new_tokens for _ in range(3)]
    assert counts == [[4], [4], [2]]
    assert seq.is_finished and seq.num_output_tokens == 1
    assert_no_leak(scheduler)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preempts_youngest_and_brings_it_back_first(prefix_caching):
    # 4 usable blocks of 4 tokens; each sequence grows to 11 tokens of K/V (3 blocks).
    scheduler = make_scheduler(num_blocks=5, block_size=4, prefix_caching=prefix_caching)
    old = add(scheduler, 0, 4, 8)
    young = add(scheduler, 1, 4, 8)
    batches = []
    while not young.num_preemptions:
        batches.append(step(scheduler))
    assert old.num_preemptions == 0 and scheduler.num_preemptions == 1
    assert young.status is SequenceStatus.WAITING and young.num_computed_tokens == 0
    assert young.block_ids == [] and young.num_output_tokens > 0
    outputs_before = list(young.output_token_ids)
    latest = add(scheduler, 2, 4, 2)
    assert list(scheduler.waiting) == [young, latest]  # the preempted one is first in line
    while not old.is_finished:
        step(scheduler)
    batch = step(scheduler)
    # Recompute: the whole prompt plus outputs so far is one prefill, then it samples;
    # with prefix caching it starts after its own blocks that were not evicted meanwhile.
    assert batch.seqs[0] is young
    start = batch.start_positions[0]
    assert start + batch.num_new_tokens[0] == 4 + len(outputs_before)
    assert start == 0 if not prefix_caching else start % 4 == 0 and start > 0
    assert batch.sample_mask[0]
    assert young.output_token_ids[: len(outputs_before)] == outputs_before
    run_to_completion(scheduler)
    assert [s.num_output_tokens for s in (old, young, latest)] == [8, 8, 2]
    assert all(s.finish_reason == "length" for s in (old, young, latest))
    assert_no_leak(scheduler)


def test_oldest_sequence_preempts_itself_only_when_alone_is_impossible():
    # The oldest running sequence always wins blocks from younger ones.
    scheduler = make_scheduler(num_blocks=4, block_size=2)  # 6 cache tokens
    seqs = [add(scheduler, i, 2, 5) for i in range(3)]  # each needs 3 blocks at the end
    run_to_completion(scheduler)
    assert seqs[0].num_preemptions == 0
    assert all(s.num_output_tokens == 5 for s in seqs)
    assert_no_leak(scheduler)


def test_abort_waiting_and_running():
    scheduler = make_scheduler(max_num_seqs=1)
    running = add(scheduler, 0, 6, 5)
    waiting = add(scheduler, 1, 3, 5)
    step(scheduler)
    assert running.block_ids and not waiting.block_ids
    assert scheduler.abort(1)
    assert waiting.is_finished and waiting.finish_reason == "abort"
    assert scheduler.abort(0)
    assert running.is_finished and running.finish_reason == "abort"
    assert running.block_ids == []
    assert not scheduler.abort(0) and not scheduler.abort(99)
    assert not scheduler.has_unfinished()
    assert_no_leak(scheduler)


def test_abort_between_schedule_and_after_step():
    scheduler = make_scheduler()
    seq = add(scheduler, 0, 4, 5)
    batch = scheduler.schedule()
    assert scheduler.abort(0)
    scheduler.after_step(batch)  # must not touch the aborted sequence
    assert seq.num_computed_tokens == 0
    assert_no_leak(scheduler)
    assert scheduler.schedule().seqs == []


def test_finish_validation():
    scheduler = make_scheduler()
    seq = add(scheduler, 0, 4, 5)
    with pytest.raises(ValueError, match="finish reason"):
        scheduler.finish(seq, "done")
    scheduler.finish(seq, "stop")
    assert seq.finish_reason == "stop"
    with pytest.raises(ValueError, match="already finished"):
        scheduler.finish(seq, "stop")


def test_sequence_past_max_model_len_is_an_engine_bug():
    scheduler = make_scheduler(max_model_len=6)
    seq = add(scheduler, 0, 6, 4)
    step(scheduler)  # the fake engine finishes it at max_model_len
    assert seq.is_finished and seq.num_output_tokens == 1
    seq = add(scheduler, 1, 6, 4)
    scheduler.after_step(scheduler.schedule())
    seq.append_token(7)  # and forgets to finish it
    with pytest.raises(RuntimeError, match="must finish"):
        scheduler.schedule()


def test_batch_validation():
    seq = Sequence(0, [1, 2, 3], 4)
    with pytest.raises(ValueError):
        ScheduledBatch([seq], [])
    with pytest.raises(ValueError):
        ScheduledBatch([seq], [4])
    with pytest.raises(ValueError):
        ScheduledBatch([seq], [0])
    empty = ScheduledBatch()
    assert not empty.is_decode and empty.num_tokens == 0 and empty.sample_mask == []


def test_random_simulation_keeps_invariants():
    """2000 steps of random arrivals, lengths, stops and aborts on a tiny pool."""
    rng = random.Random(1234)
    block_size, max_model_len = 4, 40
    scheduler = make_scheduler(
        num_blocks=13,  # 48 cache tokens: room for about two long sequences
        block_size=block_size,
        max_num_seqs=6,
        max_num_batched_tokens=12,
        max_model_len=max_model_len,
    )
    all_seqs: list[Sequence] = []
    stopped: set[int] = set()
    kv_cache: dict[int, tuple[int, int, int]] = {}
    num_chunked_steps = 0
    for step_index in range(2000):
        if step_index < 1800 and rng.random() < 0.3:
            num_prompt = rng.randint(1, 30)
            max_tokens = rng.randint(1, max_model_len - num_prompt + 5)
            all_seqs.append(add(scheduler, len(all_seqs), num_prompt, max_tokens))
        live = [s for s in all_seqs if not s.is_finished]
        if live and rng.random() < 0.02:
            assert scheduler.abort(rng.choice(live).seq_id)
        decoding = [s for s in scheduler.running if s.num_output_tokens]
        if decoding and rng.random() < 0.03:
            victim = rng.choice(decoding)
            scheduler.finish(victim, "stop")  # as on a stop token
            stopped.add(victim.seq_id)
        if not scheduler.has_unfinished():
            continue
        batch = step(scheduler, kv_cache)
        assert batch.seqs, "empty batch while work is pending"
        assert batch.num_tokens <= scheduler.config.max_num_batched_tokens
        assert scheduler.num_running <= scheduler.config.max_num_seqs
        assert len({id(s) for s in batch.seqs}) == len(batch.seqs)
        num_chunked_steps += not all(batch.sample_mask)
    run_to_completion(scheduler)
    assert_no_leak(scheduler)
    assert scheduler.num_preemptions > 10 and num_chunked_steps > 10  # both paths exercised
    for seq in all_seqs:
        assert seq.is_finished
        if seq.finish_reason == "length":
            expected = min(seq.max_tokens, max_model_len - seq.num_prompt_tokens)
            assert seq.num_output_tokens == expected
        elif seq.finish_reason == "stop":
            assert seq.seq_id in stopped
        else:
            assert seq.finish_reason == "abort"
    num_by_reason = {r: sum(s.finish_reason == r for s in all_seqs) for r in ("length", "stop")}
    assert num_by_reason["length"] > 300 and num_by_reason["stop"] > 20
