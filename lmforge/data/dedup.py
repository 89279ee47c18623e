"""Deduplication of pretraining documents: exact (normalized-text digest) and near (MinHash LSH).

Exact duplicates share :func:`exact_key`, a 16-byte BLAKE2b digest of the text after Unicode NFC
and whitespace collapsing (case is kept: texts that differ in case are left to the near-duplicate
pass, which lowercases).

Near duplicates follow Broder (1997), "On the resemblance and containment of documents", with the
banding of Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets* §3.4, set up as in
datatrove's and FineWeb's MinHash stage (word 5-grams, 14 bands × 8 rows):

1. :func:`normalize_words`: NFKC, lowercase, every run of non-alphanumeric characters (punctuation,
   underscores, whitespace) becomes one space. A word is a maximal run of letters and digits.
2. Shingles are the word n-grams (a document with fewer than n words is one shingle, an empty one
   included). Each shingle is hashed to 31 bits from its UTF-8 bytes with a polynomial hash mod
   2^64, computed for all shingles of a batch at once from prefix sums, then the MurmurHash3
   finalizer: numpy only, never Python's per-process salted ``hash()``.
3. MinHash value i of a document is the minimum over its shingles x of h_i(x) = (a_i·x + b_i)
   mod p, with p = 2^31 − 1 and a_i, b_i uniform in [1, p) and [0, p), derived from ``seed`` with
   SHAKE-256. Products stay below 2^62, so uint64 arithmetic is exact. The 61-bit alternative
   (p = 2^61 − 1, 32-bit shingles, split multiplications) gave the same recall in the benchmark
   but costs more per hash (16 numpy operations instead of 10, all on uint64), and 31-bit
   shingle hashes collide rarely enough (a 10^4-shingle document has one collision with
   probability 2%, which moves its Jaccard similarities by 10^-4). Signatures are uint32: half
   the memory and inter-process traffic.
4. Documents whose signatures agree on all ``rows`` values of any band are candidates; clusters
   are the connected components of the candidate graph and each keeps its lowest index.

A pair with Jaccard similarity s shares a band with probability 1 − (1 − s^r)^b. For 14 × 8 this
S-curve passes 0.65 at its threshold (1/b)^(1/r) ≈ 0.72, near its steepest point, and gives 0.05
at s = 0.5, 0.56 at 0.7, 0.92 at 0.8 and > 0.999 at 0.9: "Jaccard ≈ 0.8" is the similarity found
with high probability, not a hard cut-off. Replacing a fraction k of a document's words keeps
about (1 − k)^5 of its 5-grams, s ≈ (1 − k)^5 / (2 − (1 − k)^5): copies with 1% of the words
changed (s ≈ 0.9) are all caught, with 3% (s ≈ 0.76) four in five, with 5% (s ≈ 0.65) two in
five (``benchmarks/dedup_quality.py``).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmforge.config import option
from lmforge.errors import ConfigError


@dataclass
class DedupConfig:
    """What to deduplicate and how near duplicates are defined."""

    exact: bool = option(True, "drop documents whose normalized text equals an earlier one's")
    near: bool = option(True, "drop near duplicates found with MinHash LSH, keeping the first")
    ngram: int = option(5, "words per shingle (datatrove / FineWeb use 5)")
    bands: int = option(14, "LSH bands: more bands catch less similar pairs")
    rows: int = option(8, "MinHash values per band: more rows make the S-curve steeper and "
                          "move its midpoint (1/bands)^(1/rows) up")
    seed: int = option(1, "seed of the hash permutations; signatures only compare under one seed")

    def __post_init__(self) -> None:
        for name in ("ngram", "bands", "rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed: expected a non-negative integer, got {self.seed!r}")
        for name in ("exact", "near"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")

    @property
    def num_perm(self) -> int:
        """MinHash values per document."""
        return self.bands * self.rows


def exact_key(text: str) -> bytes:
    """16-byte digest of ``text`` after NFC and collapsing whitespace runs (stripped, case kept)."""
    normal = " ".join(unicodedata.normalize("NFC", text).split())
    return hashlib.blake2b(normal.encode("utf-8"), digest_size=16).digest()


_NON_WORD = re.compile(r"[\W_]+")


def normalize_words(text: str) -> str:
    """The text shingles are cut from: NFKC, lowercase, words (runs of letters and digits)
    separated by single spaces, no leading or trailing space."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


# ASCII letters and digits to themselves, lowercased; every other byte to a space.
_ASCII_WORDS = bytes(c if chr(c).isalnum() and c < 128 else 32 for c in range(256)).lower()


def _normalized_utf8(text: str) -> bytes:
    """``normalize_words(text)`` as UTF-8; twice as fast for ASCII text (NFKC leaves it as is)."""
    if text.isascii():
        return b" ".join(text.encode("ascii").translate(_ASCII_WORDS).split())
    return normalize_words(text).encode("utf-8")


_U64 = np.uint64
_P = (1 << 31) - 1  # a Mersenne prime: y mod p is a shift, a mask and an add
# Polynomial base of the shingle hash: any odd constant is invertible mod 2^64. This one is
# ⌊2^64/φ⌋ | 1 (Knuth's multiplicative hashing constant).
_BASE = 0x9E3779B97F4A7C15
_BASE_INV = pow(_BASE, -1, 1 << 64)
# Shingles per MinHash block, the fastest of 256 … 16384 measured: (num_perm, 4096) buffers give
# numpy long contiguous inner loops and few calls per shingle.
_BLOCK = 4096
# Characters per batch of documents whose shingles are indexed together: about 50 MB of index
# arrays, and measured faster than 2^21 or 2^22 (they fit the caches better).
_BATCH_CHARS = 1 << 20


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (Appleby, MurmurHash3.cpp ``fmix64``), a bijection whose
    output bits each depend on every input bit. Modifies and returns ``h`` (uint64)."""
    h ^= h >> _U64(33)
    h *= _U64(0xFF51AFD7ED558CCD)
    h ^= h >> _U64(33)
    h *= _U64(0xC4CEB9FE1A85EC53)
    h ^= h >> _U64(33)
    return h


def _powers(base: int, n: int) -> np.ndarray:
    """base^0 … base^(n−1) mod 2^64 (uint64 products wrap, which is the modulo), as an outer
    product of two short sequential cumprods: base^(1024·i + j) = base^(1024·i) · base^j."""
    def cumpowers(step: int, count: int) -> np.ndarray:
        steps = np.full(count, step, dtype=np.uint64)
        steps[0] = 1
        return np.cumprod(steps, dtype=np.uint64)

    low = cumpowers(base, 1024)
    high = cumpowers(pow(base, 1024, 1 << 64), n // 1024 + 1)
    return (high[:, None] * low[None, :]).ravel()[:n]


class MinHasher:
    """MinHash signatures of documents as a (n, bands·rows) uint32 array of values in [0, 2^31−1).

    Holds only the config and the permutation parameters, so it pickles small and computes the
    same signatures in every process: a document's signature depends on its text and the config,
    never on the other documents of the batch.
    """

    def __init__(self, config: DedupConfig) -> None:
        self.config = config
        k = config.num_perm
        # SHAKE-256 as a seeded stream of 2k little-endian uint64: no dependence on numpy's RNG.
        raw = np.frombuffer(hashlib.shake_256(f"lmforge-minhash:{config.seed}".encode())
                            .digest(16 * k), dtype="<u8").astype(np.uint64)
        # Column vectors (num_perm, 1) that broadcast along a block of shingles (1, m). The
        # modulo bias of 64-bit values reduced mod p is below 2^-32.
        self._a = (_U64(1) + raw[:k] % _U64(_P - 1))[:, None]
        self._b = (raw[k:] % _U64(_P))[:, None]

    def signature(self, text: str) -> np.ndarray:
        """Shape (bands·rows,), uint32."""
        return self.signatures([text])[0]

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """Shape (len(texts), bands·rows), uint32; row i is ``signature(texts[i])``."""
        out = np.empty((len(texts), self.config.num_perm), np.uint32)
        # Batches of about _BATCH_CHARS characters bound the per-shingle index arrays.
        ends = np.cumsum([len(t) for t in texts]) // _BATCH_CHARS
        cuts = np.flatnonzero(np.diff(ends)) + 1
        for lo, hi in zip([0, *cuts], [*cuts, len(texts)], strict=True):
            if hi > lo:
                out[lo:hi] = self._minhash(*self._shingle_hashes(texts[lo:hi]))
        return out

    def _shingle_hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """31-bit hashes (in uint64) of every document's shingles, concatenated, and the index
        of each document's first shingle. Every document has at least one shingle."""
        n = self.config.ngram
        encoded = [_normalized_utf8(t) for t in texts]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        # Documents are joined with one space, so no word crosses a document boundary.
        data = np.frombuffer(b" ".join(encoded), dtype=np.uint8)
        doc_start = np.concatenate(([0], np.cumsum(lengths[:-1] + 1)))

        # Word spans [word_start, word_end) in bytes; one trailing 0 so that an empty
        # document's (unused) indices stay in range.
        space = np.concatenate(([True], data == 32, [True]))
        word_start = np.append(np.flatnonzero(space[:-2] & ~space[1:-1]), 0)
        word_end = np.append(np.flatnonzero(~space[1:-1] & space[2:]) + 1, 0)
        doc_of_word = np.searchsorted(doc_start, word_start[:-1], side="right") - 1
        words = np.bincount(doc_of_word, minlength=len(texts))
        first_word = np.concatenate(([0], np.cumsum(words)[:-1]))

        # Shingle j of document d covers words first_word[d] + j … + n − 1, or all its words.
        per_doc = np.maximum(words - n + 1, 1)
        first = np.concatenate(([0], np.cumsum(per_doc)[:-1]))
        doc = np.repeat(np.arange(len(texts)), per_doc)
        j = np.arange(len(doc)) - first[doc]
        begin = word_start[first_word[doc] + j]
        end = word_end[first_word[doc] + np.minimum(j + n, words[doc]) - 1]
        end = np.where(words[doc] == 0, begin, end)  # an empty document: one empty shingle

        # Polynomial hash of bytes [begin, end): prefix[k] = Σ_{i<k} byte_i·B^i, so
        # (prefix[end] − prefix[begin])·B^−begin = Σ byte_i·B^(i−begin) wherever the shingle
        # sits. Shingles are short, far from the length where mod-2^64 polynomial hashes collide
        # for every odd base (Thue–Morse strings of 2^11 bytes; Pachocki & Radoszewski, "Where
        # to use and how not to use polynomial string hashing", 2013).
        weighted = _powers(_BASE, len(data))
        weighted *= data
        prefix = np.zeros(len(data) + 1, np.uint64)
        np.cumsum(weighted, out=prefix[1:])
        h = (prefix[end] - prefix[begin]) * _powers(_BASE_INV, len(data) + 1)[begin]
        return _fmix64(h) >> _U64(33), first

    def _minhash(self, shingles: np.ndarray, first: np.ndarray) -> np.ndarray:
        """Min over each document's shingles x of h_i(x) = (a_i·x + b_i) mod p, for every i.

        x, a, b < 2^31, so y = a·x + b < 2^62 fits in uint64. As 2^31 ≡ 1 (mod p), folding the
        high bits onto the low ones, (y & p) + (y >> 31), keeps the residue: once to < 2^32
        (then uint32 suffices), once more to ≤ p + 1, and min(y, y − p) wraps y − p around
        unless y ≥ p.
        """
        k = self.config.num_perm
        p64, p32 = _U64(_P), np.uint32(_P)
        out = np.empty((len(first), k), np.uint32)
        wide = np.empty((k, _BLOCK), np.uint64)
        wide_tmp = np.empty_like(wide)
        narrow = np.empty((k, _BLOCK), np.uint32)
        narrow_tmp = np.empty_like(narrow)
        for start in range(0, len(shingles), _BLOCK):
            x = shingles[None, start:start + _BLOCK]  # (1, m)
            m = x.shape[1]
            y, t = wide[:, :m], wide_tmp[:, :m]  # (num_perm, m)
            np.multiply(x, self._a, out=y)
            np.add(y, self._b, out=y)
            np.right_shift(y, _U64(31), out=t)
            np.bitwise_and(y, p64, out=y)
            np.add(y, t, out=y)
            z, t = narrow[:, :m], narrow_tmp[:, :m]
            z[...] = y
            np.right_shift(z, np.uint32(31), out=t)
            np.bitwise_and(z, p32, out=z)
            np.add(z, t, out=z)
            np.subtract(z, p32, out=t)
            np.minimum(z, t, out=z)
            # Segments: the block start, then each document that starts inside the block. The
            # documents are lo_doc … hi_doc − 1; the first may have begun in an earlier block.
            lo_doc = np.searchsorted(first, start, side="right") - 1
            hi_doc = np.searchsorted(first, start + m)
            starts = np.concatenate(([0], first[lo_doc + 1:hi_doc] - start))
            mins = np.minimum.reduceat(z, starts, axis=1).T  # (segments, num_perm)
            if first[lo_doc] < start:
                np.minimum(mins[0], out[lo_doc], out=mins[0])
            out[lo_doc:hi_doc] = mins
        return out


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 per (document, band) standing for the band's ``rows`` values; distinct values
    collide with probability 2^-64 per pair. Shape (n, bands)."""
    n, k = signatures.shape
    if k != bands * rows:
        raise ValueError(f"signatures have {k} values per document, expected bands·rows = "
                         f"{bands}·{rows} = {bands * rows}")
    sig = signatures.reshape(n, bands, rows)
    key = np.zeros((n, bands), np.uint64)
    for r in range(rows):
        key += sig[:, :, r].astype(np.uint64)
        _fmix64(key)
    return key


def near_duplicate_clusters(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """For each document, the index of its cluster representative (the lowest index in its
    connected component of documents that share at least one band bucket). Shape (n,), int64."""
    n = len(signatures)
    keys = band_keys(np.asarray(signatures), bands, rows)
    if n == 0:
        return np.zeros(0, np.int64)
    ids = np.arange(n, dtype=np.int64)
    edges = [duplicate_edges(keys[:, band, None], ids) for band in range(bands)]
    return connected_components(np.concatenate([u for u, _ in edges]),
                                np.concatenate([v for _, v in edges]), n)


def duplicate_edges(keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entries ``ids[i]`` with key row ``keys[i]`` (shape (m, w)): (members, heads), an edge from
    each entry to the lowest id of its key, for every entry but that lowest one."""
    if not len(ids):
        return ids, ids
    order = np.lexsort((ids, *keys.T[::-1]))
    sorted_keys = keys[order]
    new = np.concatenate(([True], (sorted_keys[1:] != sorted_keys[:-1]).any(axis=1)))
    head = ids[order[new]][np.cumsum(new) - 1]
    return ids[order[~new]], head[~new]


def connected_components(u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    """For each of the nodes 0 … n−1 of the graph with edges ``u[i]``–``v[i]``, the lowest node
    of its connected component. Shape (n,), int64."""
    label = np.arange(n, dtype=np.int64)
    u, v = np.asarray(u, np.int64), np.asarray(v, np.int64)
    # Min-label propagation with hooking and pointer jumping: label[x] always lies in x's
    # component and never exceeds x; at the fixed point it is constant on each component, so it
    # is the component's minimum.
    while True:
        lu, lv = label[u], label[v]
        low = np.minimum(lu, lv)
        new_label = label.copy()
        for target in (u, v, lu, lv):
            np.minimum.at(new_label, target, low)
        while True:
            jumped = new_label[new_label]
            if np.array_equal(jumped, new_label):
                break
            new_label = jumped
        if np.array_equal(new_label, label):
            return label
        label = new_label


def near_duplicates(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Boolean mask, True for documents to drop (not their cluster's representative)."""
    clusters = near_duplicate_clusters(signatures, bands, rows)
    return clusters != np.arange(len(clusters))

