"""Kimi-K2's tiktoken tokenizer (``tiktoken.model`` + tokenizer_config.json) vs tiktoken itself.

The rank file is a tiny BPE trained here on a mixed English/Chinese/code text;
the oracle is the ``tiktoken`` package's ``Encoding`` built the way Kimi-K2's
``tokenization_kimi.py`` builds it (its regex, its special-token numbering).
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import pytest

from chitu_core.errors import TokenizerError
from chitu_core.tiktoken_bpe import KIMI_PATTERN
from chitu_core.tokenizer import Tokenizer

tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is the test oracle")

TRAIN = (
    "The quick brown fox jumps over the lazy dog. THE DOG'S BARK isn't loud; they'll see.\n"
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
    "人工智能正在改变世界。我们的模型使用中文和英文。 12345 678 9\n\n\n"
    "Hello, world! Hello again, World!! Ünïcödé façade naïve café."
) * 3
SPECIALS = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>"]
TEXTS = [
    "The quick brown fox, THE DOG'S bark; they'll jump isn't it",
    "def fibonacci(n):\n    return fibonacci(n - 1)\n\n\n\t  x",
    "人工智能模型 and 中文 mixed: 1234567 dogs   \n  ",
    "Ünïcödé café — emoji 🦊 and ‘quotes’ ok",
    "<|im_user|>user<|im_middle|>What is 2+2?<|im_end|><|im_assistant|>",
    "",
]


def _train_ranks(text: str, num_merges: int) -> dict[bytes, int]:
    """A byte-level BPE: 256 byte tokens, then the most frequent adjacent pair, repeatedly
    (within each pre-tokenized piece, as tiktoken's training does)."""
    import regex  # tokenizers' and tiktoken's pattern needs \\p classes; regex ships with tiktoken

    pieces = [list(bytes([b]) for b in p.encode()) for p in regex.findall(_python_pattern(), text)]
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(num_merges):
        pairs = Counter((a, b) for piece in pieces for a, b in zip(piece, piece[1:], strict=False))
        if not pairs:
            break
        (a, b), _count = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        merged_pieces = []
        for piece in pieces:
            out, i = [], 0
            while i < len(piece):
                if i + 1 < len(piece) and piece[i] == a and piece[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(piece[i])
                    i += 1
            merged_pieces.append(out)
        pieces = merged_pieces
    return ranks


def _python_pattern() -> str:
    """KIMI_PATTERN for the ``regex`` module (V1 syntax spells intersection the same way)."""
    return "(?V1)" + KIMI_PATTERN


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[bytes, int]]:
    path = tmp_path_factory.mktemp("kimi_tok")
    ranks = _train_ranks(TRAIN, 200)
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items()]
    (path / "tiktoken.model").write_text("\n".join(lines) + "\n")
    base = len(ranks)
    config = {
        "added_tokens_decoder": {
            str(base + i): {"content": t, "special": True} for i, t in enumerate(SPECIALS)
        },
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "chat_template": "{% for m in messages %}<|im_user|>{{ m.content }}<|im_end|>{% endfor %}",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path, ranks


def _oracle(ranks: dict[bytes, int]):
    base = len(ranks)
    specials = SPECIALS + [f"<|reserved_token_{i}|>" for i in range(len(SPECIALS), 256)]
    return tiktoken.Encoding(
        name="kimi-test",
        pat_str=KIMI_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={t: base + i for i, t in enumerate(specials)},
    )


def test_encode_and_decode_match_tiktoken(kimi_dir) -> None:
    path, ranks = kimi_dir
    tok, oracle = Tokenizer.from_dir(path), _oracle(ranks)
    assert len(ranks) > 256 + 150  # the merges are real
    for text in TEXTS:
        expected = oracle.encode(text, allowed_special="all")
        assert tok.encode(text) == expected, text
        assert tok.decode(expected, skip_special_tokens=False) == oracle.decode(expected)
    long_text = TRAIN * 4
    assert tok.encode(long_text) == oracle.encode(long_text, allowed_special="all")


def test_special_tokens_follow_kimi_numbering(kimi_dir) -> None:
    path, ranks = kimi_dir
    tok = Tokenizer.from_dir(path)
    base = len(ranks)
    assert tok.vocab_size == base + 256  # Kimi-K2: 163584 ranks + 256 reserved = 163840
    assert tok.bos_token_id == base and tok.eos_token_ids == {base + 1}
    assert tok.encode("<|im_end|>") == [base + 2]
    assert tok.id_to_token(base + 255) == "<|reserved_token_255|>"
    assert base + 2 in tok.special_ids
    assert tok.decode([base + 3, *tok.encode("hi"), base + 2]) == "hi"  # specials skipped
    assert tok.encode_chat([{"role": "user", "content": "hi"}]) == [
        base + 3,
        *tok.encode("hi"),
        base + 2,
    ]


def test_malformed_rank_file_is_a_named_error(tmp_path: Path) -> None:
    (tmp_path / "tiktoken.model").write_text("not-base64!! 0\n")
    with pytest.raises(TokenizerError, match="tiktoken rank line"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nYg== 5\n")
    with pytest.raises(TokenizerError, match="ranks must be"):
        Tokenizer.from_dir(tmp_path)
