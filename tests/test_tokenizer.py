"""chitu_core.tokenizer against transformers.AutoTokenizer on the locally trained demo tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chitu_core.demo_tokenizer import (
    BOS_TOKEN,
    IM_END_TOKEN,
    SPECIAL_TOKENS,
    special_token_ids,
    write_demo_tokenizer,
)
from chitu_core.errors import TokenizerError
from chitu_core.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world! The quick brown fox.",
    "赤兔是一个推理引擎,今天天气很好。",
    "rockets 🚀🚀 family 👨‍👩‍👧‍👦 flag 🇨🇳 thumbs 👍🏽 math 𝔘𝔫𝔦",
    "mixed 我们 love 🚀 and café",
    "",
    " ",
    "   leading and trailing   ",
    "\n\n\ttabs\tand\r\nnewlines\n",
    "a  b   c    d",
    "\u00a0non-breaking\u3000ideographic space",
    f"{BOS_TOKEN}user text with <|im_start|> specials {IM_END_TOKEN} inside",
]

CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "You are a helpful assistant. 你好 🤖"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  And 🚀 ×3?\n"},
    ],
    [
        {
            "role": "user",
            "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}],
        }
    ],
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo_tokenizer")
    write_demo_tokenizer(path, vocab_size=512)
    return path


@pytest.fixture(scope="module")
def ours(demo_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(demo_dir)


@pytest.fixture(scope="module")
def hf(demo_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(demo_dir))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_decode_match_transformers(ours, hf, text: str, add_special_tokens: bool) -> None:
    ids = ours.encode(text, add_special_tokens=add_special_tokens)
    assert ids == hf(text, add_special_tokens=add_special_tokens)["input_ids"]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )
    round_trip = ours.decode(ids, skip_special_tokens=False)
    assert round_trip == (BOS_TOKEN + text if add_special_tokens else text)


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, hf, chat, add_generation_prompt: bool) -> None:
    text = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    expected = hf.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == expected
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ids = ours.encode_chat(chat, add_generation_prompt=add_generation_prompt)
    hf_ids = hf.apply_chat_template(
        chat, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert ids == list(hf_ids)
    assert ids.count(ours.bos_token_id) == 1 and ids[0] == ours.bos_token_id


def test_special_tokens_and_vocab(ours, hf) -> None:
    ids = special_token_ids(512)
    assert ours.vocab_size == len(hf) == 512
    assert [ids[t] for t in SPECIAL_TOKENS] == [508, 509, 510, 511]
    assert ours.bos_token_id == hf.bos_token_id == ids[BOS_TOKEN]
    assert ours.eos_token_ids == {hf.eos_token_id} == {ids[IM_END_TOKEN]}
    assert ours.special_ids == frozenset(ids.values())


@pytest.mark.parametrize("vocab_size", [260, 1000, 3000])
def test_demo_tokenizer_sizes_and_determinism(tmp_path: Path, vocab_size: int) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    write_demo_tokenizer(first, vocab_size)
    write_demo_tokenizer(second, vocab_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    tokenizer = Tokenizer.from_dir(first)
    assert tokenizer.vocab_size == vocab_size
    assert tokenizer.bos_token_id == vocab_size - 4
    with pytest.raises(ValueError, match="at least 260"):
        write_demo_tokenizer(tmp_path / "c", 259)


def _copy_demo(demo_dir: Path, dest: Path, **config_changes) -> Path:
    dest.mkdir()
    (dest / "tokenizer.json").write_bytes((demo_dir / "tokenizer.json").read_bytes())
    config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    config.update(config_changes)
    config = {k: v for k, v in config.items() if v is not None}
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


# Every feature transformers' template environment adds, in one template.
FEATURE_TEMPLATE = """{%- set ns = namespace(count=0) -%}
{%- for m in messages -%}
  {%- if m['role'] not in ['system', 'user', 'assistant'] -%}
    {{ raise_exception('unknown role ' + m['role']) }}
  {%- endif -%}
  {%- if m['role'] == 'system' %}{% continue %}{% endif -%}
  {%- set ns.count = ns.count + 1 -%}
  [{{ ns.count }}:{{ m['role'] }}] {{ m['content'] | tojson }}
{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endif %}
{% endfor -%}
{{ strftime_now('%Y') | length }}{{ pad_token }}{{ tools is none }}
{%- if add_generation_prompt %}>>{{ eos_token }}{% endif %}"""


def test_template_features_match_transformers(demo_dir: Path, tmp_path: Path) -> None:
    named = [{"name": "default", "template": FEATURE_TEMPLATE}, {"name": "rag", "template": "x"}]
    path = _copy_demo(demo_dir, tmp_path / "features", chat_template=named)
    chat = CHATS[1] + [{"role": "assistant", "content": "<b>&'\"</b> 中", "tool_calls": None}]
    ours = Tokenizer.from_dir(path)
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    for gen in (True, False):
        expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(chat, add_generation_prompt=gen) == expected
    with pytest.raises(TokenizerError, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_file_and_generation_config(demo_dir: Path, tmp_path: Path) -> None:
    path = _copy_demo(demo_dir, tmp_path / "file")
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [509, 511]}))
    ours = Tokenizer.from_dir(path)
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    assert ours.apply_chat_template(CHATS[0]) == hf.apply_chat_template(CHATS[0], tokenize=False)
    assert ours.apply_chat_template(CHATS[0]) == "Hi!"
    assert ours.eos_token_ids == {509, 511}


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_bos_from_config_without_post_processor(demo_dir, tmp_path: Path, add_bos_token) -> None:
    # tokenizer.json's post-processor wins when present (transformers v5); without one the
    # config's add_bos_token decides.
    path = _copy_demo(demo_dir, tmp_path / "no_post", add_bos_token=add_bos_token)
    data = json.loads((path / "tokenizer.json").read_text())
    data["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(data))
    ours = Tokenizer.from_dir(path)
    assert (ours.encode("Hi")[0] == ours.bos_token_id) == add_bos_token
    assert ours.encode("Hi", add_special_tokens=False) == ours.encode("Hi")[int(add_bos_token) :]
    with_post = Tokenizer.from_dir(_copy_demo(demo_dir, tmp_path / "post", add_bos_token=False))
    assert with_post.encode("Hi")[0] == with_post.bos_token_id


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_invalid_json(demo_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad_tokenizer"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot be loaded"):
        Tokenizer.from_dir(bad)
    bad_config = _copy_demo(demo_dir, tmp_path / "bad_config")
    (bad_config / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(TokenizerError, match="not valid JSON"):
        Tokenizer.from_dir(bad_config)


def test_no_chat_template(demo_dir: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_dir(_copy_demo(demo_dir, tmp_path / "plain", chat_template=None))
    assert tokenizer.encode("Hi")[0] == tokenizer.bos_token_id
    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer.encode_chat(CHATS[0])


def test_template_syntax_error(demo_dir: Path, tmp_path: Path) -> None:
    path = _copy_demo(demo_dir, tmp_path / "syntax", chat_template="{% for m in messages %}")
    with pytest.raises(TokenizerError, match="does not compile"):
        Tokenizer.from_dir(path).apply_chat_template(CHATS[0])


def test_every_id_of_a_large_vocabulary_renders_as_text(tmp_path: Path) -> None:
    """Past the trained merges a large vocabulary is filled with plain tokens: a random
    model that picks them streams visible text (only the four special tokens are skipped),
    and transformers decodes them the same way."""
    vocab = 4096
    write_demo_tokenizer(tmp_path, vocab_size=vocab)
    tok = Tokenizer.from_dir(tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    specials = set(special_token_ids(vocab).values())
    empty = [i for i in range(vocab) if i not in specials and not tok.decode([i])]
    assert not empty, f"ids that decode to no text: {empty[:10]}"
    fillers = [i for i in range(vocab) if tok.decode([i]).startswith("<|filler_")]
    assert len(fillers) > vocab // 2  # the corpus trains far fewer merges than 4096
    sample = fillers[::97] + sorted(specials)
    assert tok.decode(sample) == hf_tok.decode(sample, skip_special_tokens=True)
    assert tok.encode(tok.decode(fillers[:3]), add_special_tokens=False) == fillers[:3]
