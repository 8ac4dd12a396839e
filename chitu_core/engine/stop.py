"""When a sequence stops, and which of its text to stream: stop strings, stop tokens, eos, max_tokens.

Plain Python over token ids and strings (no torch), one ``StopChecker`` per
sequence. The engine feeds every new token with the text it made final.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from chitu_core.engine.sampling import SamplingParams

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class StopResult:
    """Outcome of one token: ``text_to_emit`` may be streamed now; ``reason`` is set when ``finished``."""

    finished: bool
    reason: FinishReason | None
    text_to_emit: str


class StopChecker:
    """Decides, token by token, whether a sequence is done and what text it may emit.

    Stop strings can span tokens, so the checker holds back the longest suffix
    of the text that is still the start of some stop string and releases it as
    soon as it cannot be. Of the stop strings in the text, the first one to be
    complete reading left to right wins (the longest if several end at the
    same character), so the result does not depend on how the text was split
    into tokens. Priority on one token: stop token / eos, then stop string,
    then ``max_tokens``.

    On any finish the result carries all remaining text, so nothing is held
    afterwards; ``flush()`` is for ends the checker did not decide (context
    length exhausted, abort).
    """

    def __init__(self, params: SamplingParams, eos_token_ids: Iterable[int]) -> None:
        self.params = params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.num_tokens = 0
        self.is_finished = False
        self._held = ""  # text not emitted yet: a proper prefix of some stop string

    def check(self, token_id: int, new_text: str) -> StopResult:
        """Account for one generated token and the text it made final (``""`` is fine)."""
        if self.is_finished:
            raise RuntimeError("StopChecker.check called after the sequence finished")
        self.num_tokens += 1
        params = self.params

        is_eos = token_id in self.eos_token_ids and not params.ignore_eos
        if is_eos or token_id in self.stop_token_ids:
            # The stop token's own text (e.g. "</s>") is not part of the answer unless asked for.
            tail = new_text if params.include_stop_str_in_output else ""
            return self._finish("stop", self._take_held() + tail)

        text = self._held + new_text
        match = _first_stop(text, params.stop)
        if match is not None:
            start, stop = match
            end = start + len(stop) if params.include_stop_str_in_output else start
            self._held = ""
            return self._finish("stop", text[:end])

        if self.num_tokens >= params.max_tokens:
            self._held = ""
            return self._finish("length", text)

        num_held = _held_suffix_length(text, params.stop)
        self._held = text[len(text) - num_held :]
        return StopResult(finished=False, reason=None, text_to_emit=text[: len(text) - num_held])

    def flush(self) -> str:
        """Release and clear the held-back text (when the sequence ends for a reason outside the checker)."""
        return self._take_held()

    def _take_held(self) -> str:
        held, self._held = self._held, ""
        return held

    def _finish(self, reason: FinishReason, text: str) -> StopResult:
        self.is_finished = True
        return StopResult(finished=True, reason=reason, text_to_emit=text)


def _first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(start, stop string) of the stop string that ends first in ``text`` (longest on ties), or None."""
    best: tuple[int, int, str] | None = None  # (end, -length, stop)
    for stop in stops:
        start = text.find(stop)
        if start >= 0:
            candidate = (start + len(stop), -len(stop), stop)
            if best is None or candidate < best:
                best = candidate
    if best is None:
        return None
    end, _, stop = best
    return end - len(stop), stop


def _held_suffix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
