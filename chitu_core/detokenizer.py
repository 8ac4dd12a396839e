"""Streaming detokenization: token ids in, final text out, never a half character.

A byte-level BPE token may end in the middle of a UTF-8 character (an emoji is four
bytes and often spans several tokens); decoding it alone gives U+FFFD. The detokenizer
decodes a short window of recent tokens and emits only the part of the text that can
no longer change: everything except a trailing U+FFFD, which may still be completed.
The window restarts at each point where the decoded text ends cleanly, so each token
costs O(window) work, independent of how long the sequence already is.
"""

from __future__ import annotations

from collections.abc import Iterable

from chitu_core.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# A window that never ends cleanly (a run of invalid bytes, or literal U+FFFD text) is
# cut at a safe split point once it reaches this many tokens.
MAX_WINDOW_TOKENS = 32


class IncrementalDetokenizer:
    """Turns one sequence's token ids, fed one at a time, into text chunks.

    ``"".join(add(i) for i in ids) + flush() == tokenizer.decode(ids, skip_special_tokens)``,
    and no chunk holds U+FFFD for a character that later tokens complete.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        context_ids: Iterable[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        """Args:
        tokenizer: the model's tokenizer.
        context_ids: ids already shown, usually the prompt (only its last few tokens are
            kept); never emitted, but they condition the text of the first new tokens (a
            sentencepiece "▁word" after a prompt decodes to " word", not "word").
        skip_special_tokens: drop special tokens (eos, im_end...) from the text.
        """
        self._tokenizer = tokenizer
        self._skip_ids = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._window: list[int] = [i for i in context_ids if i not in self._skip_ids][-4:]
        # Where the window's decoded text last ended cleanly (the next window starts there),
        # and how many characters of the window's text have been emitted or were context
        # (all of the context's, so bytes the prompt left incomplete never leak out).
        self._clean_index = 0
        self._num_emitted = len(self._decode(self._window))

    def _decode(self, ids: list[int]) -> str:
        # Special tokens were already filtered out when they are to be skipped.
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    @staticmethod
    def _stable(text: str) -> str:
        # An incomplete UTF-8 sequence at the end decodes to exactly one U+FFFD (maximal
        # subpart rule); any earlier U+FFFD stands for bytes that can never become valid.
        return text[:-1] if text.endswith(REPLACEMENT_CHAR) else text

    def add(self, token_id: int) -> str:
        """Feed the next generated id; return the text that became final (often "")."""
        if token_id in self._skip_ids:
            return ""
        self._window.append(token_id)
        text = self._decode(self._window)
        stable = self._stable(text)
        chunk = stable[self._num_emitted :]
        self._num_emitted = max(self._num_emitted, len(stable))
        if len(stable) == len(text):
            # Clean end: keep the tokens since the previous clean point as context for the
            # next ones (decoders such as Metaspace treat a window's first token specially).
            self._window = self._window[self._clean_index :]
            self._num_emitted = len(self._decode(self._window))
            self._clean_index = len(self._window)
        elif len(self._window) >= MAX_WINDOW_TOKENS:
            self._cut_window()
        return chunk

    def _cut_window(self) -> None:
        """Drop a prefix of a long dirty window at a split where decoding the two halves
        apart gives the same text, so every later diff stays exact."""
        text = self._decode(self._window)
        for split in range(len(self._window) - 4, 0, -1):
            head = self._decode(self._window[:split])
            if len(head) <= self._num_emitted and head + self._decode(self._window[split:]) == text:
                self._window = self._window[split:]
                self._num_emitted -= len(head)
                self._clean_index = 0
                return

    def flush(self) -> str:
        """End of sequence: return whatever is still held back (a truly incomplete
        character at the very end comes out as U+FFFD, exactly as ``decode`` gives it)."""
        text = self._decode(self._window)
        chunk = text[self._num_emitted :]
        self._window, self._clean_index, self._num_emitted = [], 0, 0
        return chunk
