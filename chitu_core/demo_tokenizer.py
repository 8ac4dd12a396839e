"""A small byte-level BPE tokenizer trained locally, for the random demo model.

Nothing is downloaded: the merges are learnt from the short English + Chinese +
emoji corpus below. The files written are the ones an HF checkpoint carries
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``), so
both ``chitu_core.tokenizer.Tokenizer`` and ``transformers.AutoTokenizer`` load them.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Order fixes the ids: the last four ids of the vocabulary, in this order.
SPECIAL_TOKENS = (BOS_TOKEN, END_OF_TEXT_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
# Like Qwen2-Instruct: a chat turn ends with <|im_end|>, so that is the eos the engine stops on.
EOS_TOKEN = IM_END_TOKEN
PAD_TOKEN = END_OF_TEXT_TOKEN
NUM_BYTE_TOKENS = 256
MIN_VOCAB_SIZE = NUM_BYTE_TOKENS + len(SPECIAL_TOKENS)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Small on purpose (training must take well under a second) yet varied enough that
# merges cover common English words, CJK characters and multi-byte emoji sequences.
CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog did not mind; it was asleep in the sun.
Chitu is an inference engine for large language models. It runs on many kinds of chips.
A model reads a prompt, one token at a time, and writes an answer, one token at a time.
The weights of this demo model are random, so what it says means nothing at all.
Hello, world! How are you today? I am fine, thank you. What would you like to know?
Please write a short poem about the sea, the sky and the mountains in the morning light.
In 2024 there were 365 days, 52 weeks and 12 months; 3.14159 is close to pi, and 2.71828 is e.
def main() -> None:\n    print("hello")\n    return\nfor i in range(10):\n    total += i * 2
Streaming text must never show a broken character, even when one character spans two tokens.
Questions and answers: what is the capital of France? Paris. Of Japan? Tokyo. Of China? Beijing.
赤兔是一个大语言模型推理引擎,可以在多种芯片上运行。
今天天气很好,我们一起去公园散步吧。你好,世界!欢迎使用这个演示模型。
模型的权重是随机的,所以它生成的文字没有任何意义。请不要把它当作真正的模型。
我喜欢读书、写字和听音乐。春天来了,花开了,鸟儿在树上唱歌。
中文、英文和表情符号都应该能被正确地切分和还原。数字一二三四五六七八九十。
Emoji: 😀 😃 😄 😁 😆 😅 😂 🤣 🥲 😊 😇 🙂 🙃 😉 😍 🥰 😘 🤔 🤖 🚀 🌍 🌏 🎉 🔥 ✨ ❤️ 👍 👋 🙏
Families and flags: 👨‍👩‍👧‍👦 👩‍💻 🧑‍🚀 🏳️‍🌈 🇨🇳 🇺🇸 🇫🇷 🇯🇵 and skin tones 👍🏻 👍🏽 👍🏿.
Mixed text: 我们 love 🚀 rockets and 火箭; the café serves crème brûlée, naïve jalapeño, Größe, façade.
Greek αβγδε, Cyrillic привет мир, Japanese こんにちは世界, Korean 안녕하세요 세계, Arabic مرحبا بالعالم.
"""


def special_token_ids(vocab_size: int = 512) -> dict[str, int]:
    """Ids of the demo tokenizer's special tokens for a vocabulary of ``vocab_size``
    (for the model's config.json / generation_config.json): token string -> id."""
    first = vocab_size - len(SPECIAL_TOKENS)
    return {token: first + i for i, token in enumerate(SPECIAL_TOKENS)}


def filler_token(index: int) -> str:
    """The text of the ``index``-th token that fills a large vocabulary past the trained merges."""
    return f"<|filler_{index}|>"


def _train(vocab_size: int) -> Tokenizer:
    """A byte-level BPE of exactly ``vocab_size`` tokens, special tokens last."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    num_bpe = vocab_size - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=num_bpe,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    # A corpus this small runs out of merges for large vocabularies: fill the gap so the
    # size is exact and ours stay last. Llama-3 fills it with reserved *special* tokens;
    # here they are plain tokens that render as text, because a random-weight model picks
    # mostly from the gap and special tokens render as nothing: its streamed answers
    # would be empty and a benchmark would time the first token by the first visible text.
    num_filler = num_bpe - tokenizer.get_vocab_size()
    tokenizer.add_tokens(
        [AddedToken(filler_token(i), special=False, normalized=False) for i in range(num_filler)]
    )
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    if (
        tokenizer.get_vocab_size() != vocab_size
        or special_token_ids(vocab_size)[BOS_TOKEN] != bos_id
    ):
        raise RuntimeError(f"demo tokenizer came out with {tokenizer.get_vocab_size()} tokens")
    return tokenizer


def write_demo_tokenizer(
    path: Path, vocab_size: int = 512, *, model_max_length: int = 4096
) -> None:
    """Write a deterministic byte-level BPE tokenizer of exactly ``vocab_size`` ids into ``path``.

    Args:
        path: directory (created if missing); receives tokenizer.json, tokenizer_config.json
            and special_tokens_map.json.
        vocab_size: total ids including the four special tokens, which take the last four ids.
        model_max_length: recorded in tokenizer_config.json (the model's context length).
    Raises:
        ValueError: ``vocab_size`` below 260 (256 byte tokens + 4 special tokens).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train(vocab_size)
    tokenizer.save(str(path / "tokenizer.json"))
    added = {
        str(token_id): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": added,
    }
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    for name, content in (
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", special_map),
    ):
        text = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        (path / name).write_text(text, encoding="utf-8")
