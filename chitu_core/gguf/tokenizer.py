"""The tokenizer a GGUF file describes, built as a ``tokenizers.Tokenizer``.

A GGUF has no tokenizer.json: it stores the vocabulary, merges, token types, special ids
and the chat template as ``tokenizer.*`` metadata. ``tokenizer.ggml.model`` picks the kind
(``gpt2``: byte-level BPE, split as ``tokenizer.ggml.pre`` says, as llama.cpp does;
``llama``: sentencepiece BPE with byte fallback), and the result is wrapped in the same
``chitu_core.tokenizer.Tokenizer`` an HF directory gets, so bos/eos handling and chat
rendering are shared.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from chitu_core.errors import TokenizerError
from chitu_core.gguf.file import GGUFFile, open_gguf
from chitu_core.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# llama.cpp's token types (llama_token_type in its vocab code).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

# tokenizer.ggml.pre -> the regexes llama.cpp splits text with before byte-level BPE, in
# order (its llama-vocab.cpp). Unknown names get GPT-2's split, with a warning.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt-2": (_GPT2_SPLIT,),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "smaug-bpe": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "deepseek-r1-qwen": (_QWEN2_SPLIT,),
    # SmolLM, StarCoder: each digit alone, then GPT-2's split.
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
}


@cache
def _gpt2_bytes_to_unicode() -> tuple[str, ...]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE tokens)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return tuple(chars[byte] for byte in range(256))


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        logger.warning(
            "GGUF pre-tokenizer %r is not in Chitu's table; splitting text as GPT-2 does", pre
        )
        splits = PRE_TOKENIZER_SPLITS["default"]
    steps = [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
    return pre_tokenizers.Sequence(
        [*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> _HFTokenizer:
    """GPT-2-style BPE; tokens spelled outside the byte alphabet (mislabelled raw text in
    some files) are respelled byte by byte, as transformers does."""
    alphabet = _gpt2_bytes_to_unicode()
    allowed = set(alphabet)
    vocab = {
        (t if set(t) <= allowed else "".join(alphabet[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = _HFTokenizer(
        models.BPE(
            vocab, pairs, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
        )
    )
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The BPE merges a sentencepiece vocabulary implies: every split of a token into two
    tokens, best-scored merged token first (ties: shorter left, then right piece), as
    transformers derives them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores, strict=True):
        local = [
            (token[:k], token[k:], score)
            for k in range(1, len(token))
            if token[:k] in vocab and token[k:] in vocab
        ]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece_bpe(gguf: GGUFFile, tokens: list[str], unk: str | None) -> _HFTokenizer:
    """Llama/Mistral-style sentencepiece BPE with byte fallback (transformers' LlamaTokenizer)."""
    merges = gguf.metadata("tokenizer.ggml.merges", None)
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = merges_from_scores(tokens, gguf.metadata("tokenizer.ggml.scores"))
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = _HFTokenizer(
        models.BPE(vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    add_prefix = bool(gguf.metadata("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _token(tokens: list[str], gguf: GGUFFile, key: str) -> str | None:
    token_id = gguf.metadata(f"tokenizer.ggml.{key}", None)
    return None if token_id is None or not 0 <= token_id < len(tokens) else tokens[token_id]


def tokenizer_from_gguf(path: str | Path | GGUFFile) -> Tokenizer:
    """The tokenizer of a GGUF file, with its special tokens and chat template.

    bos is added to a text when ``tokenizer.ggml.add_bos_token`` says so (absent: yes for a
    sentencepiece vocabulary, no for byte-level BPE, as transformers reads GGUF files);
    generation stops at eos and at llama.cpp's end-of-turn ids (eot, eom) when present.

    Raises:
        TokenizerError: the file has no vocabulary or a tokenizer kind Chitu cannot build.
    """
    gguf = path if isinstance(path, GGUFFile) else open_gguf(path)
    kind = gguf.metadata("tokenizer.ggml.model", None)
    tokens = gguf.metadata("tokenizer.ggml.tokens", None)
    if kind is None or tokens is None:
        raise TokenizerError(f"{gguf.path}: no tokenizer in the GGUF metadata (tokenizer.ggml.*)")
    special = {
        "bos_token": _token(tokens, gguf, "bos_token_id"),
        "eos_token": _token(tokens, gguf, "eos_token_id"),
        "unk_token": _token(tokens, gguf, "unknown_token_id"),
        "pad_token": _token(tokens, gguf, "padding_token_id"),
    }
    if kind == "gpt2":
        backend = _byte_level_bpe(
            tokens,
            gguf.metadata("tokenizer.ggml.merges", []),
            gguf.metadata("tokenizer.ggml.pre", "default"),
        )
    elif kind == "llama":
        backend = _sentencepiece_bpe(gguf, tokens, special["unk_token"])
    else:
        raise TokenizerError(
            f"{gguf.path}: tokenizer.ggml.model {kind!r} is not supported; supported: gpt2, llama"
        )
    types = gguf.metadata("tokenizer.ggml.token_type", None) or []
    alphabet = set(_gpt2_bytes_to_unicode())
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, kind_of in zip(tokens, types, strict=False)
        if kind_of == TOKEN_TYPE_CONTROL and (kind != "gpt2" or set(t) <= alphabet)
    ]
    backend.add_special_tokens(control)
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind_of in zip(tokens, types, strict=False)
            if kind_of == TOKEN_TYPE_USER_DEFINED
        ]
    )
    config: dict[str, Any] = {k: v for k, v in special.items() if v is not None}
    config["add_bos_token"] = bool(gguf.metadata("tokenizer.ggml.add_bos_token", kind == "llama"))
    config["add_eos_token"] = bool(gguf.metadata("tokenizer.ggml.add_eos_token", False))
    stop_ids = tuple(
        int(i)
        for key in ("eos_token_id", "eot_token_id", "eom_token_id")
        if (i := gguf.metadata(f"tokenizer.ggml.{key}", None)) is not None
    )
    return Tokenizer(backend, config, gguf.metadata("tokenizer.chat_template", None), stop_ids)
