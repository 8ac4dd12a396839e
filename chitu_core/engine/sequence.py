"""One request's tokens and bookkeeping as the scheduler and the block manager see it.

Plain Python, no torch: the policy layer (this module, ``kv_cache.py`` and
``scheduler.py``) is tested on the CPU without a device.
"""

from __future__ import annotations

import enum

FINISH_REASONS = ("stop", "length", "abort")


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life: queued, holding KV blocks, or done."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """A prompt, the tokens generated so far and the KV blocks that hold them.

    ``num_computed_tokens`` counts the leading tokens whose K/V is in the cache;
    the rest (``num_uncomputed_tokens``) is what the next steps must compute.
    A preempted sequence drops to zero computed tokens and recomputes its
    prompt and outputs as one prefill when it is scheduled again.

    ``arrival_index`` is assigned by ``Scheduler.add`` and orders sequences
    for FIFO admission and youngest-first preemption. ``request`` is an opaque
    slot for the engine (sampling parameters, stream handle...); the policy
    layer never reads it.
    """

    def __init__(
        self,
        seq_id: int,
        prompt_token_ids: list[int],
        max_tokens: int,
        request: object = None,
    ) -> None:
        self.seq_id = seq_id
        # Copied so the caller's list can't change the prompt behind the scheduler's back.
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.max_tokens = max_tokens
        self.output_token_ids: list[int] = []
        self.status = SequenceStatus.WAITING
        self.block_ids: list[int] = []
        self.num_computed_tokens = 0
        self.arrival_index = 0
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        # Prefix-cache bookkeeping of the block manager: the chained hashes of the
        # full blocks of ``token_ids`` computed so far (they never change, so they
        # survive preemption), and how many leading ``block_ids`` it has offered
        # to the cache.
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0
        self.request = request

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, status={self.status.name}, "
            f"num_prompt_tokens={self.num_prompt_tokens}, "
            f"num_output_tokens={self.num_output_tokens}, "
            f"num_computed_tokens={self.num_computed_tokens}, blocks={self.block_ids})"
        )

    @property
    def token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """``token_ids[start:end]`` without copying the whole sequence (a decode step
        reads one token of a context that may be thousands long)."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    @property
    def last_token_id(self) -> int:
        """The newest token: the input of the next decode step."""
        if self.output_token_ids:
            return self.output_token_ids[-1]
        return self.prompt_token_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V is not yet cached (1 for a sequence ready to decode)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Record a sampled token; its K/V is computed by the next step."""
        self.output_token_ids.append(token_id)
