"""Progress bars for long work (tqdm), silenced with one flag."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr; ``enabled=False`` gives a bar that counts but prints nothing."""
    return tqdm(disable=not enabled, file=sys.stderr, dynamic_ncols=True, **kwargs)
