"""tiktoken BPE files (Kimi-K2's ``tiktoken.model``) as a ``tokenizers`` byte-level BPE.

A tiktoken rank file lists every token as ``base64(bytes) rank`` (rank = id);
there are no merges: tiktoken merges, inside each pre-tokenized piece, the
adjacent pair whose concatenation has the lowest rank, and takes a piece that
is itself a token whole. The same tokenization as a ``tokenizers`` BPE (what
the rest of ``chitu_core.tokenizer`` runs on, so decoding and streaming stay
one code path): the byte-level alphabet for the bytes, one merge ``(a, b)``
per way of splitting a token into two tokens, ordered by the merged token's
rank, and ``ignore_merges`` for whole-piece hits. This is transformers'
``TikTokenConverter``, without importing transformers.

Kimi-K2's special tokens are not in the rank file: its ``tokenization_kimi.py``
numbers the ``added_tokens_decoder`` entries of tokenizer_config.json (in id
order) from the first id after the ranks, and fills the rest of 256 reserved
ids with ``<|reserved_token_{i}|>``; this module does the same.
"""

from __future__ import annotations

import base64
import binascii
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from chitu_core.errors import TokenizerError

logger = logging.getLogger(__name__)

TIKTOKEN_FILE = "tiktoken.model"
NUM_RESERVED_SPECIAL_TOKENS = 256  # tokenization_kimi.py's num_reserved_special_tokens
# Kimi-K2's pre-tokenizer (tokenization_kimi.py's pat_str); ``&&`` is a character-class
# intersection, which Oniguruma (tokenizers' regex engine) and fancy-regex share.
KIMI_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the ByteLevel pre-tokenizer's alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def read_ranks(path: Path) -> dict[bytes, int]:
    """``token bytes -> rank`` of a tiktoken file (TokenizerError if malformed)."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(
                f"{path}:{number}: not a tiktoken rank line ('<base64 token> <rank>'): {e}"
            ) from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
    return ranks


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    alphabet = _byte_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    vocab = {text(token): rank for token, rank in ranks.items()}
    return vocab, [(text(left), text(right)) for *_, left, right in merges]


def special_tokens(config: dict[str, Any], num_base_tokens: int) -> list[str]:
    """Kimi-K2's special tokens in id order, ids ``num_base_tokens, num_base_tokens + 1...``:
    tokenizer_config.json's ``added_tokens_decoder`` contents by id, then reserved ones."""
    decoder = config.get("added_tokens_decoder") or {}
    used = [entry["content"] for _, entry in sorted(decoder.items(), key=lambda kv: int(kv[0]))]
    for token_id, entry in decoder.items():
        expected = num_base_tokens + used.index(entry["content"])
        if int(token_id) != expected:
            logger.warning(
                "tokenizer_config.json gives %r id %s; the tiktoken layout gives it %d",
                entry["content"],
                token_id,
                expected,
            )
    count = max(NUM_RESERVED_SPECIAL_TOKENS, len(used))
    return used + [f"<|reserved_token_{i}|>" for i in range(len(used), count)]


def tiktoken_tokenizer(
    path: Path, config: dict[str, Any], pattern: str = KIMI_PATTERN
) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to tiktoken's encoding of the rank file ``path``
    with pre-tokenizer regex ``pattern`` and the special tokens of ``config``
    (tokenizer_config.json, see ``special_tokens``)."""
    ranks = read_ranks(path)
    vocab, merges = _vocab_and_merges(ranks)
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in special_tokens(config, len(ranks))]
    )
    return tokenizer
