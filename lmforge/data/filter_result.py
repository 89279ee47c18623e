"""What every document filter returns, and the protocol it follows: the bottom of the filter
modules (:mod:`lmforge.data.filters`, :mod:`lmforge.data.langid`), so that they import only
downwards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class FilterResult:
    """A filter's verdict on one document."""

    keep: bool
    text: str  # the (possibly modified, e.g. by C4 line removal) text to pass on
    reason: str | None  # when dropped: "<filter name>:<rule>", e.g. "gopher_quality:min_words"
    language: str | None = None  # set by the language filter: the detected ISO 639-1 code


class DocumentFilter(Protocol):
    name: str

    def __call__(self, text: str) -> FilterResult: ...
