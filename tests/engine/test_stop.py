"""StopChecker: stop strings across token boundaries, held-back text, stop tokens, eos, max_tokens."""

from __future__ import annotations

import pytest

from chitu_core.engine.sampling import SamplingParams
from chitu_core.engine.stop import StopChecker, StopResult

EOS = 2


def _feed(checker: StopChecker, pieces: list[tuple[int, str]]) -> tuple[str, StopResult]:
    """Feed (token, text) pairs until finished; returns the emitted text and the last result."""
    emitted = ""
    for token_id, text in pieces:
        result = checker.check(token_id, text)
        emitted += result.text_to_emit
        if result.finished:
            break
    return emitted, result


def test_stop_string_across_token_boundary():
    checker = StopChecker(SamplingParams(max_tokens=10, stop=("world",)), {EOS})
    first = checker.check(10, "Hello wor")
    assert first == StopResult(False, None, "Hello ")  # "wor" could start "world": held
    second = checker.check(11, "ld and more")
    assert second == StopResult(True, "stop", "")
    assert checker.is_finished


def test_partial_match_is_released_when_it_cannot_match():
    checker = StopChecker(SamplingParams(max_tokens=10, stop=("world",)), {EOS})
    assert checker.check(10, "Hi wo").text_to_emit == "Hi "
    assert checker.check(11, "x").text_to_emit == "wox"
    assert checker.check(12, " w").text_to_emit == " "
    assert checker.flush() == "w" and checker.flush() == ""


def test_include_stop_str_in_output_and_text_after_stop_dropped():
    params = SamplingParams(max_tokens=10, stop=("world",), include_stop_str_in_output=True)
    emitted, result = _feed(StopChecker(params, {EOS}), [(1, "Hello wor"), (3, "ld!"), (4, "x")])
    assert emitted == "Hello world" and result.reason == "stop"


def test_first_completed_stop_string_wins_regardless_of_tokenization():
    params = SamplingParams(max_tokens=10, stop=("abcd", "bc"))
    whole, _ = _feed(StopChecker(params, set()), [(1, "xabcd")])
    split, _ = _feed(StopChecker(params, set()), [(1, "xa"), (1, "b"), (1, "cd")])
    assert whole == split == "xa"


def test_eos_stops_without_its_text_but_releases_held_text():
    checker = StopChecker(SamplingParams(max_tokens=10, stop=("world",)), {EOS})
    assert checker.check(10, "say wo").text_to_emit == "say "
    assert checker.check(EOS, "</s>") == StopResult(True, "stop", "wo")
    with pytest.raises(RuntimeError):
        checker.check(10, "x")


def test_ignore_eos_and_stop_token_ids():
    params = SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=(7,))
    emitted, result = _feed(
        StopChecker(params, {EOS}), [(5, "a"), (EOS, "<eos>"), (7, "<end>"), (5, "b")]
    )
    assert emitted == "a<eos>" and result.reason == "stop"
    params = SamplingParams(max_tokens=10, stop_token_ids=(7,), include_stop_str_in_output=True)
    emitted, _ = _feed(StopChecker(params, {EOS}), [(5, "a"), (7, "<end>")])
    assert emitted == "a<end>"


def test_max_tokens_gives_length_and_releases_everything():
    checker = StopChecker(SamplingParams(max_tokens=3, stop=("world",)), {EOS})
    emitted, result = _feed(checker, [(5, "a"), (5, "b"), (5, " wor"), (5, "never")])
    assert result == StopResult(True, "length", " wor") and emitted == "ab wor"
    assert checker.num_tokens == 3 and checker.flush() == ""


def test_stop_beats_length_on_the_same_token():
    checker = StopChecker(SamplingParams(max_tokens=1, stop_token_ids=(9,)), set())
    assert checker.check(9, "z").reason == "stop"
    checker = StopChecker(SamplingParams(max_tokens=1, stop=("z",)), set())
    assert checker.check(1, "xz") == StopResult(True, "stop", "x")
