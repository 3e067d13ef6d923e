"""Generated token ids -> text pieces for streaming, with OpenAI ``stop`` strings.

Decoding token by token breaks multi-byte characters and word-joining tokenizers, so each piece is
the difference between decoding a short window of recent tokens with and without the newest ones
(the window moves on once it decodes cleanly), as vLLM's incremental detokenizer does. Text that
could be the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stops: list[str], skip: frozenset[int] = frozenset()):
        self.tokenizer, self.stops, self.skip = tokenizer, stops, skip
        self.tokens: list[int] = []
        self._prefix = self._read = 0  # decode window: tokens[_prefix:_read] are already text
        self.text = ""  # all text decoded so far (cut at a stop string once one appears)
        self.sent = 0  # characters of text handed out
        self.stopped = False  # a stop string ended the text
        self.used = 0  # tokens consumed until the text ended (all of them unless stopped)

    def add(self, token: int) -> str:
        """The next piece of text to send (may be empty)."""
        if self.stopped:
            return ""
        self.used += 1
        if token in self.skip:
            return ""
        self.tokens.append(token)
        self.text += self._decode_new()
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever was held back (an incomplete character included), once no more tokens come."""
        if self.stopped:
            return ""
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        self.text += decode(self.tokens[self._prefix:], skip_special_tokens=True)[len(before):]
        self._prefix = self._read = len(self.tokens)
        return self._release(final=True)

    def _decode_new(self) -> str:
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.tokens[self._prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self._prefix, self._read = self._read, len(self.tokens)
        return after[len(before):]

    def _release(self, final: bool) -> str:
        cut = self._first_stop()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            end = cut
        else:
            end = len(self.text) if final else len(self.text) - self._held_back()
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece

    def _first_stop(self) -> int | None:
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, self.sent - longest)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        for n in range(min(max((len(s) for s in self.stops), default=0), len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
