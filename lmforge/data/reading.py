"""How input files are read, shared by every source kind (:mod:`lmforge.data.sources` and the
readers it dispatches to): the read options and UTF-8 decoding with counted replacements."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from lmforge.errors import ConfigError, InputError

log = logging.getLogger(__name__)

Utf8Errors = Literal["replace", "strict"]

_ESCAPED = re.compile("[\udc80-\udcff]")  # how surrogateescape spells an undecodable byte


@dataclass
class ReadOptions:
    """How SPECs are read (shared by every source kind)."""

    field: str = "text"
    separator: str | None = None
    utf8_errors: Utf8Errors = "replace"
    strict: bool = False
    # Problems met while reading, for the run report: kind → count.
    issues: Counter = dataclasses.field(default_factory=Counter)

    def __post_init__(self) -> None:
        if not self.field:
            raise ConfigError("field: must name the JSONL field / Parquet column holding the text")
        if self.separator == "":
            raise ConfigError("separator: must not be empty; leave it unset to read one document "
                              "per file")


def decode_utf8(data: bytes, where: str, errors: Utf8Errors = "replace", warn: bool = True
                ) -> tuple[str, int]:
    """``(text, replaced_bytes)``; with ``errors="replace"`` each bad byte becomes one U+FFFD
    (logged unless ``warn`` is false: JSONL files report their lines together)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise InputError(f"{where}: not valid UTF-8 at byte {e.start} "
                             f"({data[e.start:e.start + 4]!r}…); fix the file or use "
                             "--utf8-errors replace") from None
        first = e.start
    text, bad = _ESCAPED.subn("\ufffd", data.decode("utf-8", errors="surrogateescape"))
    if warn:
        log.warning("%s: invalid UTF-8 from byte %d; replaced %d byte(s) with U+FFFD",
                    where, first, bad)
    return text, bad
