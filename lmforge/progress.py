"""Progress bars for long work (tqdm), silenced with one flag.

On a terminal the bar redraws in place. Written to a file or a pipe (CI logs, ``make quickstart
> log``), carriage-return redraws would pile up by the thousand, so there the bar prints a plain
line at most every ``PLAIN_INTERVAL`` seconds, and a last one when it closes.
"""

from __future__ import annotations

import io
import sys
from typing import Any, TextIO

from tqdm import tqdm

PLAIN_INTERVAL = 30.0  # seconds between progress lines when stderr is not a terminal


class _Lines(io.TextIOBase):
    """A stream for tqdm that turns each ``\\r``-redraw into one whole line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")
            self.stream.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr; ``enabled=False`` gives a bar that counts but prints nothing."""
    if sys.stderr.isatty():
        return tqdm(disable=not enabled, file=sys.stderr, dynamic_ncols=True, **kwargs)
    return tqdm(disable=not enabled, file=_Lines(sys.stderr), mininterval=PLAIN_INTERVAL,
                ascii=True, ncols=100, **kwargs)
