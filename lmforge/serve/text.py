"""Text at the edge of a stream of token ids: incremental detokenization and stop strings.

A token can end in the middle of a UTF-8 character, and a stop string can span tokens, so text
is released only once it is final: complete characters, and not a prefix of a stop string that
the next tokens might complete. The text of a token stream is the decoding of all its bytes
(special tokens left out), so what is released, concatenated, equals the decoding of its
ordinary tokens cut at the first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.tokenizer import Tokenizer


class TextStream:
    """Feed token ids, read newly final text; ``stopped`` once a stop string appeared (the
    text ends before it)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self._bytes = bytearray()
        self._special = frozenset(tokenizer.special_tokens.values())
        self.released = ""  # text given out so far
        self.stopped = False

    def feed(self, token: int) -> str:
        """The text that became final with ``token`` (possibly empty). Special tokens (role
        markers, ``<|end|>``) are control, not text: they add nothing, as in vLLM's default."""
        if token not in self._special:
            self._bytes += self.tokenizer.decode_bytes([token])
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of the stream."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self._bytes.decode("utf-8", errors="replace")
        if not final and text.endswith("\ufffd"):
            # an incomplete character at the end: wait for its next bytes
            text = self._bytes[:_complete_prefix(self._bytes)].decode("utf-8", errors="replace")
        cut = min((i for i in (text.find(s, max(0, len(self.released) - len(s)))
                               for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            text = text[:cut]
        elif not final and self.stop:
            # hold back the longest tail that is a prefix of some stop string
            hold = max((k for s in self.stop for k in range(1, len(s))
                        if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        new = text[len(self.released):]
        self.released += new
        return new


def _complete_prefix(data: bytes | bytearray) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the lead byte of the last character
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 \
                else 4 if byte >> 3 == 0b11110 else 1
            return len(data) if back >= need else len(data) - back
    return len(data)
