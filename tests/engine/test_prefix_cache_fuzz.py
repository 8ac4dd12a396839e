"""Prefix caching fuzzed with hypothesis: random requests sharing random prefixes, random
aborts, a pool small enough to force preemption and eviction.

A fake engine drives the real scheduler and block manager and plays the KV
cache: each slot holds the position and the whole token prefix its K/V was
computed from. After every step the block manager's invariants hold (no
leaked or double-freed block, reference counts equal owners, free + cached +
used is the pool, shared blocks fully computed), and every token a sequence
counts as computed, its own or reused, sits in its slot with exactly that
sequence's prefix: a cache hit that handed over other K/V would fail here.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chitu_core.engine.kv_cache import BlockManager
from chitu_core.engine.scheduler import Scheduler, SchedulerConfig
from chitu_core.engine.sequence import Sequence

BLOCK_SIZE = 4
# Prefixes the requests draw from, so many share whole blocks and some share part of one.
PREFIXES = [[], [7] * 9, [7] * 9 + [8, 9, 10], [3, 1, 4, 1, 5, 9, 2, 6]]

request = st.tuples(
    st.sampled_from(range(len(PREFIXES))),
    st.lists(st.integers(1, 6), min_size=0, max_size=12),  # own suffix
    st.integers(1, 14),  # max_tokens
)
action = st.one_of(
    st.tuples(st.just("add"), request),
    st.tuples(st.just("add"), request),
    st.tuples(st.just("step"), st.just(None)),
    st.tuples(st.just("abort"), st.integers(0, 1000)),
)


class FakeEngine:
    """Scheduler + block manager + a KV cache of (position, token prefix) per slot."""

    def __init__(self, num_blocks: int, max_num_batched_tokens: int, enabled: bool) -> None:
        config = SchedulerConfig(
            max_num_seqs=6, max_num_batched_tokens=max_num_batched_tokens, max_model_len=40
        )
        self.scheduler = Scheduler(config, BlockManager(num_blocks, BLOCK_SIZE, enabled))
        self.kv: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.next_id = 0
        self.live: list[Sequence] = []

    def add(self, prefix: int, suffix: list[int], max_tokens: int) -> None:
        prompt = PREFIXES[prefix] + suffix
        if not prompt:
            prompt = [1]
        seq = Sequence(self.next_id, prompt, max_tokens)
        self.next_id += 1
        self.scheduler.add(seq)
        self.live.append(seq)

    def abort(self, pick: int) -> None:
        if self.live:
            seq = self.live.pop(pick % len(self.live))
            assert self.scheduler.abort(seq.seq_id)

    def step(self) -> None:
        scheduler, manager = self.scheduler, self.scheduler.block_manager
        batch = scheduler.schedule()
        assert batch.seqs or not scheduler.has_unfinished()
        for seq, start, count in zip(
            batch.seqs, batch.start_positions, batch.num_new_tokens, strict=True
        ):
            tokens = tuple(seq.token_ids)
            for position in range(start):  # reused or earlier K/V: the right prefix
                assert self.kv[manager.slot(seq, position)] == (position, tokens[: position + 1])
            for position in range(start, start + count):
                block_id = seq.block_ids[position // BLOCK_SIZE]
                assert manager.ref_count(block_id) == 1, "a shared block is being written"
                self.kv[manager.slot(seq, position)] = (position, tokens[: position + 1])
        scheduler.after_step(batch)
        for seq, is_sampled in zip(batch.seqs, batch.sample_mask, strict=True):
            if is_sampled and not seq.is_finished:
                seq.append_token(sum(seq.token_ids) % 5 + 1)  # a few tokens: shared suffixes
                if seq.num_output_tokens == seq.max_tokens or seq.num_tokens >= 40:
                    scheduler.finish(seq, "length")
                    self.live.remove(seq)
        scheduler.check_invariants()


def _run(actions, num_blocks, budget, enabled) -> FakeEngine:
    engine = FakeEngine(num_blocks, budget, enabled)
    for kind, arg in actions:
        if kind == "add":
            engine.add(*arg)
        elif kind == "abort":
            engine.abort(arg)
        else:
            engine.step()
    for _ in range(2000):
        if not engine.scheduler.has_unfinished():
            break
        engine.step()
    manager = engine.scheduler.block_manager
    assert not engine.scheduler.has_unfinished(), "no progress"
    manager.check_invariants([])
    assert manager.num_free_blocks == manager.num_usable_blocks
    return engine


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    actions=st.lists(action, min_size=8, max_size=60),
    num_blocks=st.integers(11, 18),
    budget=st.sampled_from([3, 8, 64]),
)
def test_random_requests_keep_invariants_and_reuse_only_matching_kv(actions, num_blocks, budget):
    # 11 blocks = 10 usable x 4 tokens = 40 = max_model_len: one sequence always fits.
    _run(actions, num_blocks, budget, enabled=True)


@settings(max_examples=15, deadline=None)
@given(actions=st.lists(action, min_size=1, max_size=40))
def test_disabled_cache_never_shares(actions):
    engine = _run(actions, 14, 8, enabled=False)
    manager = engine.scheduler.block_manager
    assert manager.num_hit_tokens == manager.num_query_tokens == manager.num_cached_blocks == 0
