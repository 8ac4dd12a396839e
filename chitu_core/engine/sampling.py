"""Sampling parameters and the batch sampler: penalties, min-p and logprobs around ``ops.sample``.

The draw itself (temperature, top-k, top-p, per-request generators) is the
``chitu_sample`` hook; everything here is backend-neutral torch math on the
logits of one decode step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from chitu_core.engine.host_copy import HostCopy, to_device_async

if TYPE_CHECKING:
    from chitu_core.backend import Ops

# OpenAI's limits, so a request the official API accepts is accepted here too.
MAX_TEMPERATURE = 2.0
MAX_ABS_PENALTY = 2.0  # presence_penalty, frequency_penalty
MAX_LOGPROBS = 20
MAX_NUM_STOP_STRINGS = 4
MAX_STOP_STRING_CHARS = 200
# torch.Generator.manual_seed accepts [-2**63, 2**64 - 1].
_MIN_SEED, _MAX_SEED = -(1 << 63), (1 << 64) - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_range(value: object, low: float, high: float) -> bool:
    """low <= value <= high for a real number; NaN and non-numbers fail."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _as_tuple(name: str, value: object) -> tuple:
    """A tuple from a list/tuple (a lone string for ``stop``); anything else is a ValueError."""
    if isinstance(value, str) and name == "stop":
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list or tuple, got {value!r}")
    return tuple(value)


def _valid_stop(stop: tuple) -> bool:
    return len(stop) <= MAX_NUM_STOP_STRINGS and all(
        isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS for s in stop
    )


# (field, is valid, what a valid value is): checked in this order by SamplingParams.
_RULES = (
    ("max_tokens", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("temperature", lambda v: _in_range(v, 0, MAX_TEMPERATURE), f"in [0, {MAX_TEMPERATURE}]"),
    ("top_p", lambda v: _in_range(v, 0, 1) and v > 0, "in (0, 1]"),
    ("top_k", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 disables it)"),
    ("min_p", lambda v: _in_range(v, 0, 1), "in [0, 1]"),
    (
        "seed",
        lambda v: v is None or (_is_int(v) and _MIN_SEED <= v <= _MAX_SEED),
        "None or an integer in [-2**63, 2**64)",
    ),
    ("presence_penalty", lambda v: _in_range(v, -MAX_ABS_PENALTY, MAX_ABS_PENALTY), "in [-2, 2]"),
    ("frequency_penalty", lambda v: _in_range(v, -MAX_ABS_PENALTY, MAX_ABS_PENALTY), "in [-2, 2]"),
    (
        "repetition_penalty",
        lambda v: _in_range(v, 0, math.inf) and 0 < v < math.inf,
        "a finite number > 0",
    ),
    (
        "stop",
        _valid_stop,
        f"at most {MAX_NUM_STOP_STRINGS} non-empty strings of at most "
        f"{MAX_STOP_STRING_CHARS} characters",
    ),
    ("stop_token_ids", lambda v: all(_is_int(t) and t >= 0 for t in v), "integers >= 0"),
    (
        "logprobs",
        lambda v: v is None or (_is_int(v) and 0 <= v <= MAX_LOGPROBS),
        f"None or an integer in [0, {MAX_LOGPROBS}]",
    ),
)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. Invalid values raise ``ValueError`` naming the field.

    ``temperature=0`` is greedy. ``top_k=0`` and ``top_p=1`` and ``min_p=0``
    disable those filters. ``stop`` and ``stop_token_ids`` may be given as
    lists (or ``stop`` as one string); they are stored as tuples.
    ``logprobs=n`` returns the chosen token's logprob plus the ``n`` most
    likely tokens' (``0``: the chosen one only; ``None``: nothing).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # Frozen: normalise list inputs (JSON arrays) to tuples so params stay hashable.
        object.__setattr__(self, "stop", _as_tuple("stop", self.stop))
        object.__setattr__(self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids))

        for name, is_valid, expected in _RULES:
            value = getattr(self, name)
            if not is_valid(value):
                raise ValueError(f"{name} must be {expected}, got {value!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs of one step: the chosen token's, and the ``top`` most likely ``(id, logprob)`` best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class SampleResult:
    """One step's picks: ``token_ids[i]`` for row ``i``; ``logprobs[i]`` None unless row ``i`` asked."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``: one per seeded request, kept for its lifetime."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _token_index(
    rows: Sequence[int], token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) pairs, ``[N]`` int64 each on ``device``, for every token of ``token_ids[k]`` in row ``rows[k]``.

    Ids outside ``[0, vocab_size)`` (a tokenizer larger than the lm_head) are
    dropped: they have no logit to penalise, and an out-of-range index is a
    device-side assert on GPUs.
    """
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_ids)), dtype=torch.int64)
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.int64)
    row_index = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.int64), lengths)
    keep = (tokens >= 0) & (tokens < vocab_size)
    return row_index[keep].to(device), tokens[keep].to(device)


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_token_ids: Sequence[Sequence[int]],
    prompt_token_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Repetition, then frequency and presence penalties; returns ``logits`` itself when no row uses any.

    logits: ``[B, V]`` fp32, not modified. Repetition penalty (HF/CTRL): every
    token seen in the prompt or the output has a positive logit divided by the
    penalty and a negative one multiplied by it. Frequency/presence (OpenAI):
    over output tokens only, ``logit -= frequency * count + presence * (count > 0)``.
    """
    if not any(p.uses_penalties for p in params):
        return logits
    batch, vocab_size = logits.shape
    device = logits.device

    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1]
    if rep_rows:
        rows, tokens = _token_index(
            rep_rows * 2,
            [prompt_token_ids[i] for i in rep_rows] + [output_token_ids[i] for i in rep_rows],
            vocab_size,
            device,
        )
        is_seen = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
        is_seen[rows, tokens] = True
        penalty = to_device_async(torch.tensor([p.repetition_penalty for p in params]), device)
        penalty = penalty[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(is_seen, penalised, logits)

    count_rows = [
        i for i, p in enumerate(params) if p.presence_penalty != 0 or p.frequency_penalty != 0
    ]
    if count_rows:
        rows, tokens = _token_index(
            count_rows, [output_token_ids[i] for i in count_rows], vocab_size, device
        )
        counts = torch.zeros(batch, vocab_size, dtype=logits.dtype, device=device)
        counts.index_put_(
            (rows, tokens), torch.ones_like(tokens, dtype=logits.dtype), accumulate=True
        )
        frequency = to_device_async(torch.tensor([p.frequency_penalty for p in params]), device)
        presence = to_device_async(torch.tensor([p.presence_penalty for p in params]), device)
        frequency, presence = frequency[:, None], presence[:, None]
        logits = logits - frequency * counts - presence * (counts > 0).to(logits.dtype)
    return logits


def apply_min_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) tokens whose probability after temperature is below ``min_p`` times the top one's.

    logits: ``[B, V]`` fp32, not modified; returns ``logits`` itself when no
    sampled row uses min_p (greedy rows ignore it: the argmax always survives).
    ``p_i < min_p * p_max`` is tested as ``logit_i < logit_max + T * log(min_p)``,
    which needs no softmax.
    """
    is_active = [p.min_p > 0 and p.temperature > 0 for p in params]
    if not any(is_active):
        return logits
    device = logits.device
    active = to_device_async(torch.tensor(is_active), device)
    min_p = to_device_async(
        torch.tensor([p.min_p if a else 1.0 for p, a in zip(params, is_active, strict=True)]),
        device,
    )
    temperature = to_device_async(torch.tensor([p.temperature for p in params]), device)
    offset = torch.where(active, temperature * torch.log(min_p), -math.inf)  # [B]
    threshold = logits.max(dim=-1).values + offset
    return logits.masked_fill(logits < threshold[:, None], -math.inf)


class PendingSample:
    """A step's draw queued on the device; ``result()`` reads it back.

    ``token_ids``: ``[B]`` int64 on the device, usable before the read-back (the
    next decode step's inputs). The picks and the logprobs are copied to the host
    by copies queued at construction, right behind the draw: ``result()`` waits for
    them, not for a step queued after them, and a later step that overwrites the
    logits buffer (graph outputs) cannot change them.

    ``logprob_rows``: the rows that asked for logprobs; ``chosen_logprobs`` ``[W]``
    fp32, ``top_logprobs`` ``[W, num_top]`` fp32 descending and ``top_ids``
    ``[W, num_top]`` int64 are theirs.
    """

    def __init__(
        self,
        token_ids: torch.Tensor,
        params: tuple[SamplingParams, ...],
        logprob_rows: tuple[int, ...] = (),
        chosen_logprobs: torch.Tensor | None = None,
        top_logprobs: torch.Tensor | None = None,
        top_ids: torch.Tensor | None = None,
    ) -> None:
        self.token_ids, self.params, self.logprob_rows = token_ids, params, logprob_rows
        self._copies = [HostCopy(token_ids)]
        if logprob_rows:
            self._copies += [HostCopy(t) for t in (chosen_logprobs, top_logprobs, top_ids)]

    def result(self) -> SampleResult:
        """The picks on the host, with ``TokenLogprobs`` for the rows that asked."""
        token_ids = self._copies[0].get().tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(token_ids)
        if self.logprob_rows:
            chosen, top_values, top_ids = (c.get().tolist() for c in self._copies[1:])
            for k, i in enumerate(self.logprob_rows):
                n = self.params[i].logprobs
                top = list(zip(top_ids[k][:n], top_values[k][:n], strict=True))
                logprobs[i] = TokenLogprobs(token_id=token_ids[i], logprob=chosen[k], top=top)
        return SampleResult(token_ids=token_ids, logprobs=logprobs)


class Sampler:
    """Picks one token per sequence from a step's logits, through the bound ``ops.sample``.

    ``ops`` is the backend's ``Ops`` table; ``device`` the device the logits
    live on (the small per-row parameter tensors are built there).
    """

    def __init__(self, ops: Ops, device: torch.device | str) -> None:
        self.ops = ops
        self.device = torch.device(device)

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        output_token_ids: Sequence[Sequence[int]],
        prompt_token_ids: Sequence[Sequence[int]],
    ) -> SampleResult:
        """``launch(...).result()``: sample and read the picks back at once."""
        return self.launch(logits, params, generators, output_token_ids, prompt_token_ids).result()

    def launch(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        output_token_ids: Sequence[Sequence[int]],
        prompt_token_ids: Sequence[Sequence[int]],
    ) -> PendingSample:
        """Queue the draw of row ``i`` of ``logits`` (``[B, V]`` fp32) with ``params[i]``
        on the device, without waiting for it.

        ``generators[i]`` is the request's generator (``make_generator(seed)``)
        or None for the default RNG; ``output_token_ids[i]``/``prompt_token_ids[i]``
        feed the penalties. Order: penalties, min-p (after temperature), then
        temperature/top-k/top-p and the draw in ``ops.sample``.

        Logprobs are those of the raw model distribution, ``log_softmax(logits)``
        before penalties, temperature and any filter (what OpenAI and vLLM
        report by default), so they do not depend on sampling settings. The
        ``top`` list is sorted by logprob; ties come in no stated order.
        """
        batch = logits.shape[0]
        for name, values in (
            ("params", params),
            ("generators", generators),
            ("output_token_ids", output_token_ids),
            ("prompt_token_ids", prompt_token_ids),
        ):
            if len(values) != batch:
                raise ValueError(f"Sampler: {len(values)} {name} for {batch} rows of logits")
        params = tuple(params)
        if batch == 0:
            return PendingSample(torch.zeros(0, dtype=torch.int64), params)
        raw_logits = logits.float()
        logits = apply_penalties(raw_logits, params, output_token_ids, prompt_token_ids)
        logits = apply_min_p(logits, params)
        if all(p.is_greedy for p in params):
            # What ops.sample does for temperature-0 rows (first maximum), without its
            # sort over the vocabulary and three parameter uploads: the common decode case.
            sampled = logits.argmax(dim=-1)
        else:
            # One upload for the three per-row parameters; top_k is capped at 2**24 (exact
            # in fp32, and larger than any vocabulary, so it filters the same).
            values = [[p.temperature, p.top_p, float(min(p.top_k, 1 << 24))] for p in params]
            table = to_device_async(torch.tensor(values, dtype=torch.float32), self.device)
            temperatures, top_ps = table[:, 0], table[:, 1]
            top_ks = table[:, 2].to(torch.int32)
            sampled = self.ops.sample(
                logits, temperatures, top_ps, top_ks, list(generators)
            )  # [B] int64
        return _with_logprobs(sampled, params, raw_logits)


def _with_logprobs(
    sampled: torch.Tensor, params: tuple[SamplingParams, ...], raw_logits: torch.Tensor
) -> PendingSample:
    """The draw ``sampled`` ``[B]`` plus the logprob tensors of the rows that ask; one
    log-softmax and one top-k over those rows only."""
    wanted = tuple(i for i, p in enumerate(params) if p.logprobs is not None)
    if not wanted:
        return PendingSample(sampled, params)
    rows = to_device_async(torch.tensor(wanted), raw_logits.device)
    logprobs = torch.log_softmax(raw_logits[rows], dim=-1)  # [W, V]
    chosen = logprobs.gather(1, sampled[rows][:, None]).squeeze(1)
    num_top = min(max(params[i].logprobs for i in wanted), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(num_top, dim=-1)  # [W, num_top], descending
    return PendingSample(sampled, params, wanted, chosen, top_values, top_ids)
