"""Where ``lmforge data prepare`` keeps its files: a local directory, or an fsspec URL
(``s3://bucket/data``, ``gs://…``, ``file://…``) that every node of a cluster reaches.

:class:`Store` is a location, used like a :class:`pathlib.Path` (``store / "name"``): every
write is whole or not at all, as readers on other nodes may look at any time (a local file is
written to a temporary name and renamed; an object store's PUT is atomic by itself), and reads
of part of a ``.npy`` file fetch only that part (a memory map, or a ranged read). Remote URLs
need the filesystem's fsspec package (``s3fs``, ``gcsfs``, …).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.files import atomic_path


def _is_url(location: str | Path) -> bool:
    return "://" in str(location)


class Store:
    """A file or directory location; ``fs`` is None for a local path."""

    def __init__(self, location: str | Path, fs: Any = None) -> None:
        if fs is None and _is_url(location):
            import fsspec

            fs, location = fsspec.core.url_to_fs(str(location))
        self.fs = fs
        self.path = str(location) if fs is not None else Path(location)

    def __truediv__(self, name: str) -> Store:
        if self.fs is None:
            return Store(self.path / name)
        return Store(f"{str(self.path).rstrip('/')}/{name}", self.fs)

    def __str__(self) -> str:
        return str(self.path) if self.fs is None else self.fs.unstrip_protocol(self.path)

    @property
    def name(self) -> str:
        return Path(str(self.path)).name

    @property
    def parent(self) -> Store:
        if self.fs is None:
            return Store(self.path.parent)
        return Store(str(self.path).rstrip("/").rsplit("/", 1)[0], self.fs)

    # --- reading ---------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.path.exists() if self.fs is None else self.fs.exists(self.path)

    def is_file(self) -> bool:
        return self.path.is_file() if self.fs is None else self.fs.isfile(self.path)

    def read_bytes(self) -> bytes:
        return self.path.read_bytes() if self.fs is None else self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def names(self) -> list[str]:
        """The entries of this directory, sorted; none when it does not exist."""
        if self.fs is None:
            return sorted(e.name for e in os.scandir(self.path)) if self.path.is_dir() else []
        if not self.fs.isdir(self.path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1]
                      for p in self.fs.ls(self.path, detail=False))

    def load_arrays(self, *names: str) -> dict[str, np.ndarray]:
        """The arrays ``names`` (default: all) of an ``.npz`` file; only those are read."""
        with contextlib.ExitStack() as stack:
            source = (self.path if self.fs is None else
                      stack.enter_context(self.fs.open(self.path, "rb")))
            z = stack.enter_context(np.load(source, allow_pickle=False))
            return {key: z[key] for key in names or z.files}

    def load_array(self) -> np.ndarray:
        """The array of an ``.npy`` file."""
        source = self.path if self.fs is None else io.BytesIO(self.read_bytes())
        return np.load(source, allow_pickle=False)

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo`` … ``hi − 1`` of a C-ordered ``.npy`` file, reading only those."""
        if self.fs is None:
            return np.asarray(np.load(self.path, mmap_mode="r")[lo:hi])
        with self.fs.open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = header(f)
            if fortran:
                raise ValueError(f"{self}: rows of a Fortran-ordered array")
            row = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
            f.seek(f.tell() + lo * row)
            data = f.read((hi - lo) * row)
        return np.frombuffer(data, dtype).reshape((hi - lo, *shape[1:]))

    # --- writing ---------------------------------------------------------------------------------

    def _parents(self) -> None:
        """Folders above a remote file (a no-op on object stores; file systems need them)."""
        self.fs.makedirs(self.parent.path, exist_ok=True)

    def mkdir(self) -> None:
        if self.fs is None:
            self.path.mkdir(parents=True, exist_ok=True)
        else:
            self.fs.makedirs(self.path, exist_ok=True)

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """A local file to write; it becomes this location, whole, when the block succeeds."""
        if self.fs is None:
            with atomic_path(self.path) as tmp:
                yield tmp
            return
        fd, tmp = tempfile.mkstemp(suffix=f".{self.name}")
        os.close(fd)
        try:
            yield Path(tmp)
            self._parents()
            self.fs.put_file(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def write_bytes(self, data: bytes) -> None:
        if self.fs is None:
            with atomic_path(self.path) as tmp:
                tmp.write_bytes(data)
        else:
            self._parents()
            self.fs.pipe_file(self.path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def save_arrays(self, **arrays: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        self.write_bytes(buffer.getvalue())

    def save_array(self, array: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, array)
        self.write_bytes(buffer.getvalue())

    def move_to(self, dest: Store) -> None:
        """Rename (local) or copy and delete (an object store) this file to ``dest``."""
        if self.fs is None:
            os.replace(self.path, dest.path)
        else:
            dest._parents()
            self.fs.mv(self.path, dest.path)

    def remove(self) -> None:
        if self.fs is None:
            self.path.unlink(missing_ok=True)
        elif self.fs.exists(self.path):
            self.fs.rm_file(self.path)

    def remove_tree(self) -> None:
        if self.fs is None:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)
