"""IncrementalDetokenizer: streamed text equals the full decode and never shows a half character."""

from __future__ import annotations

import random

import pytest

from chitu_core.demo_tokenizer import IM_END_TOKEN, write_demo_tokenizer
from chitu_core.detokenizer import MAX_WINDOW_TOKENS, IncrementalDetokenizer
from chitu_core.tokenizer import Tokenizer

TEXTS = [
    "plain ASCII text, nothing special.",
    "赤兔是一个推理引擎,中文三字节字符。",  # 3-byte characters
    "rockets 🚀🚀, faces 😀😂🥲, math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # 4-byte characters
    "family 👨‍👩‍👧‍👦 flag 🇨🇳 skin 👍🏽 café naïve Größe",  # ZWJ sequences, combining marks
    "mixed 我们 love 🚀 and 火箭\n\n  with   spaces\t",
    "literal replacement char \ufffd stays",
]


@pytest.fixture(scope="module", params=[260, 512])
def tokenizer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Tokenizer:
    # 260: bytes only, so every multi-byte character is split across tokens.
    path = tmp_path_factory.mktemp(f"demo_tokenizer_{request.param}")
    write_demo_tokenizer(path, vocab_size=request.param)
    return Tokenizer.from_dir(path)


def _stream(tokenizer: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, **kwargs)
    return [detokenizer.add(i) for i in ids] + [detokenizer.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    chunks = _stream(tokenizer, ids)
    assert "".join(chunks) == tokenizer.decode(ids) == text
    num_replacements = text.count("\ufffd")
    assert sum(chunk.count("\ufffd") for chunk in chunks) == num_replacements


def test_split_character_is_held_back(tokenizer: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer)
    ids = tokenizer.encode("a🚀", add_special_tokens=False)
    chunks = [detokenizer.add(i) for i in ids]
    assert "".join(chunks) == "a🚀" and detokenizer.flush() == ""
    if tokenizer.vocab_size == 260:  # one token per byte: 'a', then four bytes of the emoji
        assert chunks == ["a", "", "", "", "🚀"]


def test_incomplete_tail_flushes_like_decode(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 中", add_special_tokens=False)
    bytes_260 = tokenizer.vocab_size == 260
    truncated = ids[:-1] if bytes_260 else ids  # with merges 中 may be one token
    chunks = _stream(tokenizer, truncated)
    assert "".join(chunks) == tokenizer.decode(truncated)
    assert "\ufffd" not in "".join(chunks[:-1])


def test_special_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("你好" + IM_END_TOKEN + "🚀")
    assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids) == "你好🚀"
    kept = "".join(_stream(tokenizer, ids, skip_special_tokens=False))
    assert kept == tokenizer.decode(ids, skip_special_tokens=False)
    assert IM_END_TOKEN in kept


def test_random_ids_equal_full_decode(tokenizer: Tokenizer) -> None:
    # Random ids give invalid UTF-8 everywhere; the stream must still equal decode().
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_window_stays_bounded(tokenizer: Tokenizer) -> None:
    # Lone continuation bytes decode to U+FFFD every time, so the text never ends cleanly.
    continuation = tokenizer.encode("\u0080", add_special_tokens=False)[-1]
    lead = tokenizer.encode("中", add_special_tokens=False)[0]
    rng = random.Random(1)
    ids = [rng.choice([continuation, lead]) for _ in range(3000)]
    detokenizer = IncrementalDetokenizer(tokenizer)
    chunks = []
    for token_id in ids:
        chunks.append(detokenizer.add(token_id))
        assert len(detokenizer._window) <= MAX_WINDOW_TOKENS
    chunks.append(detokenizer.flush())
    assert "".join(chunks) == tokenizer.decode(ids)


def test_context_ids_are_not_emitted(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("User said: 你好")
    completion = tokenizer.encode(" 世界 🚀!", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)  # the engine passes it positionally
    chunks = [detokenizer.add(i) for i in completion] + [detokenizer.flush()]
    full = tokenizer.decode(prompt + completion)
    assert "".join(chunks) == full[len(tokenizer.decode(prompt)) :] == " 世界 🚀!"
