"""GPT-2's reversible byte ↔ printable-character map, used by Hugging Face ``ByteLevel`` files.

Every byte gets a printable Unicode character (printable Latin-1 bytes map to themselves, the rest
to U+0100 onwards), so a byte string can be written as readable text: b" the" → "Ġthe".
Reference: ``bytes_to_unicode`` in openai/gpt-2 ``encoder.py``.
"""

from __future__ import annotations

from lmforge.errors import TokenizerFileError


def _byte_to_char() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR: list[str] = _byte_to_char()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def bytes_to_str(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


def str_to_bytes(text: str, where: str = "token") -> bytes:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError as e:
        raise TokenizerFileError(
            f"{where}: {text!r} is not a byte-level token (character {e.args[0]!r} is outside "
            "the GPT-2 byte alphabet)") from None
