"""Token ids -> text, incrementally, with OpenAI stop strings.

A token's text depends on its neighbours (SentencePiece writes a word's space as part of the next
piece and drops a leading one; a character outside the vocabulary is several byte tokens), so
each step decodes a short window of recent tokens and emits what the new token added (vLLM's
prefix/read offsets). Text that could be the start of a stop string is held back until it is
known not to be one; a stop string ends the text just before it, and the caller then cancels the
request.
"""
from __future__ import annotations

from typing import Sequence

from llamax.infer.chat_format import ChatFormat

_UNFINISHED = "\ufffd"  # what a decoder returns for a UTF-8 sequence still missing bytes


class TextStream:
    """Feeds new tokens, returns the new text that is safe to show.

    Args:
      chat: the tokenizer wrapper.
      context: ids that precede the new tokens (the prompt); its last tokens give the first new
        token its leading space.
      stop: stop strings; the text ends just before the first one that appears.
      skip_ids: ids that never produce text (the stop ids: a reply's end-of-turn token).
      strip_leading: drop whitespace before the first visible character (a chat reply: templates
        strip message contents, and SentencePiece starts the reply with a space piece).
    """

    def __init__(self, chat: ChatFormat, context: Sequence[int] = (), stop: Sequence[str] = (),
                 skip_ids: Sequence[int] = (), strip_leading: bool = False):
        self.chat, self.strip_leading = chat, strip_leading
        self.stop = tuple(s for s in stop if s)
        self.skip_ids = frozenset(skip_ids)
        self.ids = list(context[-4:])  # a few tokens of context are enough for a word's spacing
        self.prefix_offset = 0  # window start for decoding
        self.read_offset = len(self.ids)  # ids before this are already part of `text`
        self.text = ""  # all text of the new tokens so far (up to a stop string)
        self.sent = 0  # characters of `text` already returned
        self.stopped = False
        self.token_offsets: list[int] = []  # per new token: len(text) before it (logprobs' text_offset)

    def push(self, token: int) -> str:
        """Adds one new token; returns the text now safe to emit ('' if none or stopped)."""
        self.token_offsets.append(len(self.text))
        if self.stopped or token in self.skip_ids:
            return ""
        self.ids.append(token)
        return self._read(final=False)

    def finish(self) -> str:
        """The held-back rest (and an unfinished character as U+FFFD) once no tokens will come."""
        return "" if self.stopped else self._read(final=True)

    def _read(self, final: bool) -> str:
        prefix = self.chat.decode(self.ids[self.prefix_offset:self.read_offset])
        window = self.chat.decode(self.ids[self.prefix_offset:])
        if not final and (window.endswith(_UNFINISHED) or not window.startswith(prefix)):
            return ""  # wait for the rest of a multi-byte character
        searched_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=1) + 1)
        if window.startswith(prefix):
            self.text += window[len(prefix):]
        if self.strip_leading and self.sent == 0:
            self.text = self.text.lstrip()
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        cut = self._find_stop(0 if self.sent == 0 else min(searched_from, len(self.text)))
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._emit(len(self.text))
        return self._emit(len(self.text) if final else len(self.text) - self._held_back())

    def _emit(self, end: int) -> str:
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _find_stop(self, start: int) -> int | None:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
