"""Token shards: the binary files that training streams from.

Layout of one shard (little-endian)::

    header   32 bytes  magic b"LMFSHARD" | version u32 | bytes per token u32 (2 or 4)
                       | number of tokens u64 | number of documents u64
    tokens   n_tokens × (uint16 | uint32)   documents back to back, each followed by <|endoftext|>
    index    (n_docs + 1) × uint64          token offset where each document starts, then n_tokens

uint16 is used whenever the vocabulary fits (≤ 65,536 ids), halving disk and page-cache use. A
shard is written to a temporary file and renamed into place, so a reader never sees half of one;
:class:`Shard` checks magic, version and the exact file size on open and names the file otherwise.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lmforge.errors import InputError
from lmforge.files import atomic_path

MAGIC = b"LMFSHARD"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")
HEADER_BYTES = _HEADER.size  # 32


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id of a vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@contextmanager
def shard_writer(path: str | Path, dtype: np.dtype) -> Iterator[Callable[[np.ndarray], None]]:
    """Write one shard a document at a time: yields ``add(tokens)``, which appends a document
    (its separator already appended) to the file; only the offsets stay in memory. The shard
    appears at ``path`` when the block ends without an error."""
    little = np.dtype(dtype).newbyteorder("<")
    offsets = array("Q", [0])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(bytes(HEADER_BYTES))

        def add(tokens: np.ndarray) -> None:
            f.write(np.asarray(tokens).astype(little, copy=False).tobytes())
            offsets.append(offsets[-1] + len(tokens))

        yield add
        f.write(np.frombuffer(offsets, np.uint64).astype("<u8", copy=False).tobytes())
        f.seek(0)
        f.write(_HEADER.pack(MAGIC, VERSION, little.itemsize, offsets[-1], len(offsets) - 1))


def write_shard(path: str | Path, documents: Sequence[Sequence[int] | np.ndarray],
                dtype: np.dtype) -> Path:
    """Write ``documents`` (token id sequences, separators already appended) as one shard."""
    with shard_writer(path, dtype) as add:
        for doc in documents:
            add(np.asarray(doc, dtype=dtype))
    return Path(path)


class Shard:
    """A shard opened for reading: ``tokens`` is a read-only memory map, ``offsets`` in memory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(HEADER_BYTES)
        except OSError as e:
            raise InputError(f"{self.path}: cannot open shard ({e.strerror})") from None
        if len(head) < HEADER_BYTES or head[:8] != MAGIC:
            raise InputError(f"{self.path}: not an lmforge token shard (bad magic)")
        _, version, itemsize, n_tokens, n_docs = _HEADER.unpack(head)
        if version != VERSION:
            raise InputError(f"{self.path}: shard format version {version} is not supported "
                             f"(this lmforge reads version {VERSION})")
        if itemsize not in (2, 4):
            raise InputError(f"{self.path}: bad token size {itemsize} in the header")
        expected = HEADER_BYTES + n_tokens * itemsize + (n_docs + 1) * 8
        if size != expected:
            raise InputError(f"{self.path}: shard is {size} bytes but its header describes "
                             f"{expected} (truncated or corrupt)")
        self.dtype = np.dtype(np.uint16 if itemsize == 2 else np.uint32).newbyteorder("<")
        self.num_tokens = int(n_tokens)
        self.num_documents = int(n_docs)
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r", offset=HEADER_BYTES,
                                shape=(self.num_tokens,)) if n_tokens else np.zeros(0, self.dtype)
        index_at = HEADER_BYTES + n_tokens * itemsize
        self.offsets = np.fromfile(self.path, dtype="<u8", count=n_docs + 1, offset=index_at)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (its trailing separator included)."""
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]])

    def __len__(self) -> int:
        return self.num_tokens
