"""Atomic file writes (a reader sees the old file or the new one, never half of one), and the one
overwrite policy every command follows: an existing output is replaced only with ``--force``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.errors import InputError


def _new_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``
    with the permissions a plainly created file would have (``mkstemp`` makes it 0600).

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _new_file_mode())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_output(path: str | Path, force: bool, directory: bool = False) -> None:
    """Refuse an output that would replace something: an existing file, or (``directory``) a
    non-empty directory, unless ``force``; and a directory where a file is expected or the
    reverse, always."""
    path = Path(path)
    if directory:
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: exists and is not a directory; give a directory for --out")
        if path.is_dir() and any(path.iterdir()) and not force:
            raise InputError(f"{path}: directory is not empty; choose another --out, or pass "
                             "--force to write into it (files of the same name are replaced)")
        return
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give a file path for --out")
    if path.exists() and not force:
        raise InputError(f"{path}: already exists; choose another --out, or pass --force to "
                         "replace it")
