"""Tokenizers built from GGUF metadata vs transformers building them from the same file,
and the special-token rules (bos added or not, stop ids, chat template)."""

from __future__ import annotations

import pytest
from gguf import GGUFValueType, GGUFWriter

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")

from chitu_core.gguf.tokenizer import merges_from_scores, tokenizer_from_gguf  # noqa: E402
from chitu_core.tokenizer import load_tokenizer  # noqa: E402

WORDS = ("▁hello", "▁world", "▁the", "▁cat", "▁sat", "ing", "▁a", "▁on")
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEXTS = ("hello world", "the cat sat on a mat", " leading space", "café ñ 7", "hellothe", "")


def _sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s>, the 256 byte tokens, then every substring of WORDS (scored so
    longer pieces merge later): tokens, scores, token types."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # unknown, control, byte
    pieces: list[str] = []
    for word in WORDS:
        for size in range(1, len(word) + 1):
            for start in range(len(word) - size + 1):
                piece = word[start : start + size]
                if piece not in pieces:
                    pieces.append(piece)
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 259 + [-float(len(p)) - 0.001 * i for i, p in enumerate(pieces)]
    return tokens, scores, types


def _write(path, kind, tokens, types, scores=None, merges=None, **extra):
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("tokenizer.ggml.model", kind)
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", types)
    if scores is not None:
        writer.add_array("tokenizer.ggml.scores", scores)
    if merges:
        writer.add_array("tokenizer.ggml.merges", merges)
    for key, (value, vtype) in extra.items():
        writer.add_key_value(f"tokenizer.{key}", value, vtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    tokens, scores, types = _sentencepiece_vocab()
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    return _write(
        path,
        "llama",
        tokens,
        types,
        scores,
        **{
            "ggml.bos_token_id": (1, GGUFValueType.UINT32),
            "ggml.eos_token_id": (2, GGUFValueType.UINT32),
            "ggml.unknown_token_id": (0, GGUFValueType.UINT32),
            "chat_template": (TEMPLATE, GGUFValueType.STRING),
        },
    )


def test_sentencepiece_matches_transformers(sentencepiece_gguf):
    ours = tokenizer_from_gguf(sentencepiece_gguf)
    hf = transformers.AutoTokenizer.from_pretrained(
        sentencepiece_gguf.parent, gguf_file=sentencepiece_gguf.name
    )
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    # No add_bos_token key: a sentencepiece vocabulary gets bos, as llama.cpp and HF do.
    assert ours.encode("hello")[0] == ours.bos_token_id == 1
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat) == "<|user|>hi</s><|assistant|>"
    assert ours.apply_chat_template(chat) == hf.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )


def test_merges_from_scores_match_transformers():
    from transformers.tokenization_utils_base import generate_merges

    tokens, scores, _ = _sentencepiece_vocab()
    expected = generate_merges(
        {t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores, strict=True))
    )
    assert merges_from_scores(tokens, scores) == expected


def _byte_level_gguf(path, **extra):
    from chitu_core.gguf.tokenizer import _gpt2_bytes_to_unicode

    tokens = list(_gpt2_bytes_to_unicode()) + ["Ġt", "he", "Ġthe", "<|eot|>", "<|end|>", "<x>"]
    types = [1] * 259 + [3, 3, 4]  # ids 256-258 merged pieces, 259-260 control, 261 user
    merges = ["Ġ t", "h e", "Ġt he"]
    return _write(path, "gpt2", tokens, types, merges=merges, **extra)


def test_byte_level_special_tokens(tmp_path):
    path = _byte_level_gguf(
        tmp_path / "bpe.gguf",
        **{
            "ggml.pre": ("llama-bpe", GGUFValueType.STRING),
            "ggml.bos_token_id": (257, GGUFValueType.UINT32),  # "he", as a stand-in
            "ggml.eos_token_id": (260, GGUFValueType.UINT32),
            "ggml.eot_token_id": (259, GGUFValueType.UINT32),
            "ggml.add_bos_token": (True, GGUFValueType.BOOL),
        },
    )
    tok = load_tokenizer(path)
    assert tok.encode(" the") == [257, 258]  # bos (add_bos_token), then the merged " the"
    assert tok.encode(" the", add_special_tokens=False) == [258]
    # Control tokens stay whole; user-defined ones too, and survive decoding.
    assert tok.encode("<|eot|><x>", add_special_tokens=False) == [259, 261]
    assert tok.decode([258, 259, 261]) == " the<x>"
    assert tok.eos_token_ids == {260, 259}  # eos and llama.cpp's end-of-turn
    assert tok.chat_template is None


def test_byte_level_without_add_bos_adds_none(tmp_path):
    tok = load_tokenizer(_byte_level_gguf(tmp_path / "bpe.gguf"))
    assert tok.encode(" the") == [258]
