"""Tokenizer of an HF model directory: ``tokenizer.json`` (or a tiktoken ``tiktoken.model``,
``chitu_core/tiktoken_bpe.py``) through the ``tokenizers`` package,
special tokens and the chat template from ``tokenizer_config.json``, rendered with jinja2
the way ``transformers`` renders it (same sandbox, globals, filters and variables)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _HFTokenizer

from chitu_core.errors import TokenizerError
from chitu_core.tiktoken_bpe import TIKTOKEN_FILE, tiktoken_tokenizer

# The named special tokens transformers passes to a chat template (its special_tokens_map).
SPECIAL_TOKEN_NAMES = tuple(
    f"{kind}_token" for kind in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant spans with it;
    without the tag those templates would not even parse. Renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' override: jinja's own tojson escapes HTML characters, which changes prompts.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile ``source`` in the environment transformers uses for chat templates.

    Raises:
        TokenizerError: the template is not valid jinja2.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not compile (line {e.lineno}): {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    """``path`` parsed as a JSON object, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _select_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja wins over the config's entry, as in transformers; a list of named
    templates yields the one named "default"."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class Tokenizer:
    """Text <-> token ids and chat rendering for one model.

    Build it with :meth:`from_dir`. Results match ``transformers.AutoTokenizer`` on the same
    directory: same ids, same decoded text, same rendered chat.
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        config: dict[str, Any],
        chat_template: str | None = None,
        generation_eos_ids: tuple[int, ...] = (),
    ) -> None:
        """Args:
        backend: the loaded ``tokenizers.Tokenizer`` (modified in place: missing special
            tokens are added and the bos/eos post-processor set as transformers does).
        config: parsed tokenizer_config.json.
        chat_template: jinja2 source, or None when the model has none.
        generation_eos_ids: extra stop ids from generation_config.json.
        """
        self._backend = backend
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = _token_content(config.get(name))
            if content is not None:
                self.special_tokens[name] = content
        # transformers adds named special tokens the vocabulary lacks.
        missing = [t for t in self.special_tokens.values() if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in missing]
            )
        # tokenizer.json's post-processor decides what encode() adds around a text, as in
        # transformers v5 (it drops add_bos/eos_token when tokenizer.json exists); only when
        # there is none do the config's flags apply, as Llama's tokenizer class applies them.
        if backend.post_processor is None:
            self._set_post_processor(
                bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
            )
        self.chat_template = chat_template
        self._compiled: jinja2.Template | None = None
        eos_id = self._id_of("eos_token")
        self.eos_token_ids: set[int] = set(generation_eos_ids) | ({eos_id} - {None})
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json (optional), chat_template.jinja (optional)
        and generation_config.json's ``eos_token_id`` (optional) from the model directory ``path``.

        Raises:
            TokenizerError: tokenizer.json missing or unreadable, or a JSON file invalid.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        config = _read_json(path / "tokenizer_config.json")
        if not tokenizer_file.is_file() and (path / TIKTOKEN_FILE).is_file():  # Kimi-K2
            backend = tiktoken_tokenizer(path / TIKTOKEN_FILE, config)
        elif not tokenizer_file.is_file():
            raise TokenizerError(
                f"no tokenizer.json in {path}: Chitu needs a 'fast' HF tokenizer (or Kimi-K2's "
                f"{TIKTOKEN_FILE}); convert a sentencepiece model with transformers "
                "(AutoTokenizer(...).save_pretrained(dir))"
            )
        else:
            try:
                backend = _HFTokenizer.from_file(str(tokenizer_file))
            except Exception as e:  # tokenizers raises a bare Exception for every parse error
                raise TokenizerError(f"{tokenizer_file} cannot be loaded: {e}") from e
        eos = _read_json(path / "generation_config.json").get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,) if isinstance(eos, int) else ()
        return cls(backend, config, _select_chat_template(path, config), eos_ids)

    def _id_of(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        specials = [
            (t, self._backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on
        ]
        self._backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids including added/special tokens (the embedding must cover them)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        """Id of ``bos_token``, or None when the model has none."""
        return self._id_of("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        """Id of ``pad_token``, or None when the model has none."""
        return self._id_of("pad_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``text`` -> ids; ``add_special_tokens`` adds what the model wants around a text
        (usually bos). Special tokens written in ``text`` are recognised as such."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """ids -> text. Incomplete UTF-8 at either end decodes to U+FFFD; stream with
        ``chitu_core.detokenizer.IncrementalDetokenizer`` instead."""
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of ``token_id`` (byte-level form), or None if out of range."""
        return self._backend.id_to_token(token_id)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) to the prompt text.

        ``kwargs`` become extra template variables (e.g. ``tools=[...]``, ``enable_thinking``)
        and override the special tokens, as in transformers.

        Raises:
            TokenizerError: the model has no chat template, or the template rejected the
                messages (its ``raise_exception``).
        """
        if self.chat_template is None:
            raise TokenizerError(
                "this model has no chat template (no chat_template in tokenizer_config.json "
                "and no chat_template.jinja); use the plain completion API instead"
            )
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template)
        # transformers drops None-valued keys: OpenAI clients send content=None with tool calls.
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        try:
            return self._compiled.render(
                messages=chat, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template rejected the messages: {e}") from e

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Render then encode. No special tokens are added: the template writes its own bos,
        as transformers' ``apply_chat_template(tokenize=True)`` assumes."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model path: an HF directory's tokenizer files (``from_dir``), or a
    GGUF file's ``tokenizer.*`` metadata (a ``.gguf`` file or a directory holding one)."""
    from chitu_core.gguf import find_gguf

    gguf_path = find_gguf(path)
    if gguf_path is None:
        return Tokenizer.from_dir(path)
    from chitu_core.gguf.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(gguf_path)
