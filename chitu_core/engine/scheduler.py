"""Continuous batching: which sequences compute how many tokens in the next step.

Each step, running sequences go first (oldest first): a decoding sequence
gets one token, a sequence part-way through a chunked prefill gets the rest
of its prompt as far as the token budget allows. A sequence admitted from
the queue starts after the longest prefix of its tokens already in the KV
cache (the block manager's prefix cache). When the KV pool runs dry
the youngest running sequence is preempted: its blocks are freed and it is
recomputed from scratch later, so no request is ever dropped. Then waiting
sequences are admitted in arrival order while slots, budget and blocks last.

Engine loop::

    batch = scheduler.schedule()
    logits = runner.execute(batch.seqs, batch.num_new_tokens)  # before after_step
    scheduler.after_step(batch)
    for seq, is_sampled, token in zip(batch.seqs, batch.sample_mask, sample(logits)):
        if is_sampled:
            seq.append_token(token)
            if seq.num_output_tokens == seq.max_tokens:
                scheduler.finish(seq, "length")  # or "stop" on a stop token
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field

from chitu_core.engine.kv_cache import BlockManager
from chitu_core.engine.sequence import FINISH_REASONS, Sequence, SequenceStatus

logger = logging.getLogger(__name__)


def _arrival(seq: Sequence) -> int:
    return seq.arrival_index


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step and of one sequence.

    ``max_model_len`` bounds the tokens of a sequence: prompts longer are
    refused, and the engine finishes a sequence with reason "length" once it
    holds ``max_model_len`` tokens (so at most that many are ever cached).
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be an int >= 1, got {value!r}")


@dataclass
class ScheduledBatch:
    """Sequences to run this step and how many new tokens each computes.

    Sequence ``i`` computes tokens ``start_positions[i] ..
    start_positions[i] + num_new_tokens[i] - 1``. ``start_positions`` and
    ``sample_mask`` are snapshots taken at construction, so they stay right
    after ``Scheduler.after_step`` has advanced ``num_computed_tokens``.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    start_positions: list[int] = field(init=False)
    # True where this step computes a sequence's last uncached token, so its
    # logits give the next token; False for the non-final chunks of a prefill.
    sample_mask: list[bool] = field(init=False)
    is_decode: bool = field(init=False)

    def __post_init__(self) -> None:
        if len(self.seqs) != len(self.num_new_tokens):
            raise ValueError(
                f"{len(self.seqs)} sequences but {len(self.num_new_tokens)} token counts"
            )
        for seq, count in zip(self.seqs, self.num_new_tokens, strict=True):
            if not 1 <= count <= seq.num_uncomputed_tokens:
                raise ValueError(
                    f"sequence {seq.seq_id} has {seq.num_uncomputed_tokens} uncomputed "
                    f"tokens; cannot compute {count}"
                )
        self.start_positions = [seq.num_computed_tokens for seq in self.seqs]
        self.sample_mask = [
            start + count == seq.num_tokens
            for seq, start, count in zip(
                self.seqs, self.start_positions, self.num_new_tokens, strict=True
            )
        ]
        # A pure decode step (one token per sequence, all past their prompts) can
        # take the runner's graph-captured path.
        self.is_decode = bool(self.seqs) and all(
            count == 1 and start >= seq.num_prompt_tokens
            for seq, start, count in zip(
                self.seqs, self.start_positions, self.num_new_tokens, strict=True
            )
        )

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    """FIFO admission, continuous batching, chunked prefill and preemption by recompute."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        # Both queues are kept in arrival order: waiting is served from the
        # front, running is preempted from the back (youngest first).
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._seqs_by_id: dict[int, Sequence] = {}
        self._next_arrival_index = 0
        self.num_preemptions = 0
        if config.max_model_len > block_manager.max_num_tokens:
            logger.warning(
                "max_model_len %d exceeds the KV cache (%d tokens): longer requests are refused",
                config.max_model_len,
                block_manager.max_num_tokens,
            )

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new request; ``ValueError`` if it can never be served."""
        if seq.seq_id in self._seqs_by_id:
            raise ValueError(f"sequence id {seq.seq_id} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.block_ids or seq.output_token_ids:
            raise ValueError(f"sequence {seq.seq_id} is not a fresh request: {seq!r}")
        if seq.num_prompt_tokens == 0:
            raise ValueError(f"sequence {seq.seq_id} has an empty prompt")
        if seq.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {seq.max_tokens}")
        if seq.num_prompt_tokens > self.config.max_model_len:
            raise ValueError(
                f"the prompt has {seq.num_prompt_tokens} tokens but max_model_len is "
                f"{self.config.max_model_len}: shorten the prompt"
            )
        # The last sampled token is never fed back, so its K/V is never stored;
        # the engine finishes a sequence once it has max_model_len tokens. A
        # sequence that cannot fit the cache alone would preempt itself forever.
        num_kv_tokens = min(seq.num_prompt_tokens + seq.max_tokens - 1, self.config.max_model_len)
        if num_kv_tokens > self.block_manager.max_num_tokens:
            raise ValueError(
                f"sequence {seq.seq_id} may need K/V for {num_kv_tokens} tokens but the whole "
                f"cache holds {self.block_manager.max_num_tokens}: lower max_tokens or "
                "max_model_len, or enlarge the cache (--kv-cache-gb / --num-blocks)"
            )
        seq.arrival_index = self._next_arrival_index
        self._next_arrival_index += 1
        seq.num_computed_tokens = 0
        self.waiting.append(seq)
        self._seqs_by_id[seq.seq_id] = seq

    def abort(self, seq_id: int) -> bool:
        """Finish a waiting or running sequence with reason "abort"; False if unknown/done."""
        seq = self._seqs_by_id.get(seq_id)
        if seq is None:
            return False
        self.finish(seq, "abort")
        return True

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark ``seq`` finished, free its blocks and forget it."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        if self._seqs_by_id.get(seq.seq_id) is not seq:
            raise ValueError(f"sequence {seq.seq_id} is not scheduled here (already finished?)")
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self._seqs_by_id[seq.seq_id]

    def schedule(self) -> ScheduledBatch:
        """Pick this step's work; non-empty whenever ``has_unfinished()``."""
        seqs: list[Sequence] = []
        num_new_tokens: list[int] = []
        token_budget = self.config.max_num_batched_tokens
        is_preempted = False

        # Running first, oldest first. A victim is always taken from the back,
        # which has not been scheduled yet (or is the current sequence itself).
        index = 0
        while index < len(self.running) and token_budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_uncomputed_tokens, token_budget)
            if num_new == 0:
                index += 1
                continue
            num_needed = seq.num_computed_tokens + num_new
            if num_needed > self.config.max_model_len:
                # Growing past it could outgrow the cache and preempt itself forever.
                raise RuntimeError(
                    f"sequence {seq.seq_id} has {seq.num_tokens} tokens, more than "
                    f"max_model_len {self.config.max_model_len}: the engine must finish it "
                    'with reason "length"'
                )
            while not self.block_manager.can_allocate(seq, num_needed):
                victim = self.running[-1]
                self._preempt(victim)
                is_preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it preempted itself: everything after it is gone too
            self.block_manager.allocate(seq, num_needed)
            seqs.append(seq)
            num_new_tokens.append(num_new)
            token_budget -= num_new
            index += 1

        # Admitting right after a preemption would only thrash: memory is tight.
        if not is_preempted:
            is_first = True
            while self.waiting and token_budget > 0:
                if len(self.running) >= self.config.max_num_seqs:
                    break
                seq = self.waiting[0]
                # Its prefix already in the cache counts as computed (a shared
                # block costs a free block only if nobody holds it).
                cached = self.block_manager.cached_prefix(seq)
                num_cached = len(cached) * self.block_manager.block_size
                num_new = seq.num_tokens - num_cached
                if num_new > token_budget:
                    # Only the head may be chunked: a long prompt always makes
                    # progress, and later arrivals never overtake it.
                    if not is_first:
                        break
                    num_new = token_budget
                num_needed = num_cached + num_new
                blocks = self.block_manager
                if blocks.blocks_to_admit(seq, cached, num_needed) > blocks.num_free_blocks:
                    break
                blocks.admit(seq, cached, num_needed)
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                bisect.insort(self.running, seq, key=_arrival)
                seqs.append(seq)
                num_new_tokens.append(num_new)
                token_budget -= num_new
                is_first = False

        return ScheduledBatch(seqs, num_new_tokens)

    def after_step(self, batch: ScheduledBatch) -> None:
        """Record that the step's K/V is now cached (skips sequences aborted meanwhile)."""
        self.record_computed(batch.seqs, batch.num_new_tokens)

    def record_computed(self, seqs: list[Sequence], num_new_tokens: list[int]) -> None:
        """``after_step`` for a step given as its sequences and token counts."""
        for seq, num_new in zip(seqs, num_new_tokens, strict=True):
            if seq.is_finished:
                continue
            seq.num_computed_tokens += num_new
            self.block_manager.register_computed_blocks(seq)

    def reserve_next_decode(self, seqs: list[Sequence]) -> bool:
        """Room for the decode step after the one ``seqs`` just ran, before its tokens are
        known on the host.

        Call after ``after_step`` and before the sampled tokens are appended (each of
        ``seqs`` then has no uncomputed token). Returns True, with K/V blocks allocated for
        one more token of each sequence, when the next ``schedule()`` would run exactly
        that step: ``seqs`` are all the running sequences, no waiting sequence would be
        admitted, the token budget holds them and no sequence needs preempting. Then the
        engine can queue that step on the device at once; otherwise nothing changes.
        """
        running = self.running
        if not seqs or len(seqs) != len(running) or len(seqs) > self.config.max_num_batched_tokens:
            return False
        if self.waiting and len(running) < self.config.max_num_seqs:
            return False
        for seq in seqs:
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed_tokens != 0:
                return False
            if seq.num_computed_tokens + 1 > self.config.max_model_len:
                return False
        blocks = self.block_manager
        needed = sum(blocks.blocks_needed(seq, seq.num_computed_tokens + 1) for seq in seqs)
        if needed > blocks.num_free_blocks:
            return False
        for seq in seqs:
            blocks.allocate(seq, seq.num_computed_tokens + 1)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it for recompute ahead of newer arrivals."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=_arrival)
        logger.debug("preempted sequence %d (%d tokens)", seq.seq_id, seq.num_tokens)

    def check_invariants(self) -> None:
        """Raise ``RuntimeError`` on broken bookkeeping (tests and debug mode)."""
        for seq in self.waiting:
            if seq.status is not SequenceStatus.WAITING or seq.block_ids:
                raise RuntimeError(f"waiting sequence in a bad state: {seq!r}")
        for seq in self.running:
            if seq.status is not SequenceStatus.RUNNING:
                raise RuntimeError(f"running sequence in a bad state: {seq!r}")
        for queue in (list(self.waiting), self.running):
            arrivals = [seq.arrival_index for seq in queue]
            if arrivals != sorted(arrivals):
                raise RuntimeError(f"queue out of arrival order: {arrivals}")
        if len(self.waiting) + len(self.running) != len(self._seqs_by_id):
            raise RuntimeError("a sequence is lost or queued twice")
        self.block_manager.check_invariants([*self.waiting, *self.running])
