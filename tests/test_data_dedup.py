"""Deduplication: exact keys, MinHash signatures (parity, determinism) and LSH clustering."""

from __future__ import annotations

import hashlib
import multiprocessing
import pickle
import random

import numpy as np
import pytest

from lmforge.config import build
from lmforge.data import dedup
from lmforge.data.builtin import python_src
from lmforge.data.dedup import (
    DedupConfig,
    MinHasher,
    _normalized_utf8,
    exact_key,
    near_duplicate_clusters,
    near_duplicates,
    normalize_words,
)
from lmforge.errors import ConfigError

P = (1 << 31) - 1


def _shingles(words: list[str], n: int) -> set[str]:
    return {" ".join(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}


@pytest.fixture(scope="module")
def originals() -> list[str]:
    """200 chunks of standard-library source (200 whitespace tokens each, one per file), no two
    of which share ≥ 30% of their word 5-grams, so none is a near duplicate of another."""
    docs: list[str] = []
    kept: list[set[str]] = []
    for doc in python_src():
        tokens = doc.text.split()
        if len(tokens) < 400:
            continue
        chunk = " ".join(tokens[100:300])
        shingles = _shingles(normalize_words(chunk).split(), 5)
        if all(len(shingles & other) < 0.3 * len(shingles | other) for other in kept):
            docs.append(chunk)
            kept.append(shingles)
        if len(docs) == 200:
            return docs
    raise AssertionError("the standard library has fewer than 200 files of ≥ 400 tokens")


def _edit(text: str, fraction: float, rng: random.Random) -> str:
    """``text`` with ``fraction`` of its whitespace-separated tokens (at least one) replaced."""
    tokens = text.split()
    for i in rng.sample(range(len(tokens)), max(1, round(fraction * len(tokens)))):
        tokens[i] = f"zq{rng.randrange(10**6)}"
    return " ".join(tokens)


def test_exact_key_ignores_whitespace_and_unicode_form_not_case():
    assert len(exact_key("x")) == 16
    assert exact_key("Hello  world\n\tagain ") == exact_key(" Hello world again")
    assert exact_key("caf\u00e9") == exact_key("cafe\u0301")  # NFC: composed == decomposed
    assert exact_key("Hello world") != exact_key("hello world")
    assert exact_key("Hello world") != exact_key("Hello world!")
    assert exact_key("") == exact_key(" \n ")


def test_normalization_for_shingles():
    messy = "  Hello, WORLD!\n\tfoo_bar(x=1)… Ｆｕｌｌ "  # fullwidth letters: NFKC makes them ASCII
    assert normalize_words(messy) == "hello world foo bar x 1 full"
    assert normalize_words("Café naïve 日本語 — ok") == "café naïve 日本語 ok"
    ascii_text = "".join(map(chr, range(128))) + " Mixed_CASE 42 a--b  "
    assert _normalized_utf8(ascii_text) == normalize_words(ascii_text).encode()


def _reference_signature(text: str, config: DedupConfig) -> list[int]:
    """The documented scheme with Python integers: polynomial shingle hash mod 2^64 (base
    0x9E3779B97F4A7C15) → MurmurHash3 fmix64 → top 31 bits → min of (a·x + b) mod 2^31 − 1."""
    mask = (1 << 64) - 1

    def fmix64(h: int) -> int:
        h ^= h >> 33
        h = h * 0xFF51AFD7ED558CCD & mask
        h ^= h >> 33
        h = h * 0xC4CEB9FE1A85EC53 & mask
        return h ^ (h >> 33)

    k = config.bands * config.rows
    raw = hashlib.shake_256(f"lmforge-minhash:{config.seed}".encode()).digest(16 * k)
    words = [int.from_bytes(raw[8 * i:8 * i + 8], "little") for i in range(2 * k)]
    a = [1 + w % (P - 1) for w in words[:k]]
    b = [w % P for w in words[k:]]
    xs = []
    for shingle in _shingles(normalize_words(text).split(), config.ngram):
        h = sum(c * pow(0x9E3779B97F4A7C15, i, 1 << 64) for i, c in enumerate(shingle.encode()))
        xs.append(fmix64(h & mask) >> 33)
    return [min((ai * x + bi) % P for x in xs) for ai, bi in zip(a, b, strict=True)]


@pytest.mark.parametrize("ngram", [1, 3, 5])
def test_signatures_match_a_big_integer_reference(ngram):
    config = DedupConfig(ngram=ngram, bands=4, rows=3, seed=7)
    texts = ["", "!!", "one", "Two words", "a b c d e f g", "Café naïve 日本語, x_1 foo.bar " * 3]
    got = MinHasher(config).signatures(texts)
    assert got.shape == (len(texts), 12) and got.dtype == np.uint32
    for text, row in zip(texts, got, strict=True):
        assert row.tolist() == _reference_signature(text, config)


def _signatures_in_child(texts: list[str]) -> np.ndarray:
    return MinHasher(DedupConfig()).signatures(texts)


def test_signatures_are_deterministic_across_instances_processes_and_batches(originals):
    texts = [*originals[:20], "", "short text"]
    hasher = MinHasher(DedupConfig())
    sig = hasher.signatures(texts)
    assert np.array_equal(sig, MinHasher(DedupConfig()).signatures(texts))
    assert np.array_equal(sig, pickle.loads(pickle.dumps(hasher)).signatures(texts))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert np.array_equal(sig, pool.apply(_signatures_in_child, (texts,)))
    order = list(reversed(range(len(texts))))
    assert np.array_equal(sig[order], hasher.signatures([texts[i] for i in order]))
    assert np.array_equal(sig[3], hasher.signature(texts[3]))
    # Pinned values: a change to normalization or hashing must be deliberate (it invalidates
    # stored signatures).
    golden = [152360415, 49619185, 48314826]
    assert hasher.signature("The quick brown fox jumps over the lazy dog.")[:3].tolist() == golden
    assert not np.array_equal(sig, MinHasher(DedupConfig(seed=2)).signatures(texts))


def test_batch_and_block_boundaries_do_not_change_signatures(originals, monkeypatch):
    texts = [*originals[:30], "", "a b", "x " * 50]
    expected = MinHasher(DedupConfig()).signatures(texts)
    # Tiny batches and blocks: documents straddle many blocks and batches start anywhere.
    monkeypatch.setattr(dedup, "_BATCH_CHARS", 3000)
    monkeypatch.setattr(dedup, "_BLOCK", 7)
    assert np.array_equal(MinHasher(DedupConfig()).signatures(texts), expected)


def test_short_and_empty_documents():
    hasher = MinHasher(DedupConfig())
    assert hasher.signatures([]).shape == (0, 112)
    sig = hasher.signatures(["", " ...\n", "Hello, world!", "hello world", "world hello"])
    assert np.array_equal(sig[0], sig[1])  # both normalize to no words: one empty shingle
    assert np.array_equal(sig[2], sig[3])  # fewer words than ngram: the whole text is a shingle
    assert not np.array_equal(sig[3], sig[4])
    assert (sig < P).all()
    assert near_duplicates(sig, 14, 8).tolist() == [False, True, False, True, False]


def test_planted_near_duplicates_are_found_and_the_lowest_index_kept(originals):
    rng = random.Random(0)
    # 1% of tokens replaced: Jaccard ≈ 0.9, found with probability ≈ 1 − (1 − 0.9^8)^14 > 0.999.
    # 2% and 3% give Jaccard ≈ 0.83 and 0.77, on the slope of the S-curve, found about 97% and
    # 80% of the time (benchmarks/dedup_quality.py): too close to 95% for a test.
    copies = [_edit(text, 0.01, rng) for text in originals]
    n = len(originals)
    reps = near_duplicate_clusters(MinHasher(DedupConfig()).signatures(originals + copies), 14, 8)
    assert reps.dtype == np.int64
    assert np.mean(reps[n:] == np.arange(n)) >= 0.95
    # A copy joins its own source or stays alone, never another document's cluster.
    assert np.mean([r not in (i, n + i) for i, r in enumerate(reps[n:].tolist())]) <= 0.01
    assert np.mean(reps[:n] != np.arange(n)) <= 0.01
    # Order defines which one is kept: a copy placed first is the representative.
    first = near_duplicates(MinHasher(DedupConfig()).signatures([copies[0], originals[0]]), 14, 8)
    assert first.tolist() == [False, True]


def test_clusters_are_transitive_and_keep_the_lowest_index():
    sig = np.arange(5 * 6, dtype=np.uint64).reshape(5, 6) * 1000  # 3 bands × 2 rows, all distinct
    sig[3, 0:2] = sig[0, 0:2]  # 3 ~ 0 in band 0
    sig[4, 4:6] = sig[3, 4:6]  # 4 ~ 3 in band 2, so 4 ~ 0
    sig[2] = sig[1]
    sig[1, 2] += 1  # 1 and 2 still share bands 0 and 2
    assert near_duplicate_clusters(sig, 3, 2).tolist() == [0, 1, 1, 0, 0]
    assert near_duplicates(sig, 3, 2).tolist() == [False, False, True, True, True]
    sig[4, 5] += 1  # one row differs in the only shared band: no longer a candidate
    assert near_duplicate_clusters(sig, 3, 2).tolist() == [0, 1, 1, 0, 4]
    assert near_duplicate_clusters(np.empty((0, 6), np.uint64), 3, 2).shape == (0,)
    with pytest.raises(ValueError, match="expected bands·rows = 2·2 = 4"):
        near_duplicate_clusters(sig, 2, 2)


@pytest.mark.parametrize(("values", "field"), [
    ({"ngram": 0}, "ngram"), ({"bands": -1}, "bands"), ({"rows": 2.5}, "rows"),
    ({"seed": -3}, "seed"), ({"exact": "yes"}, "exact"),
])
def test_invalid_config_names_the_field(values, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        DedupConfig(**values)


def test_config_from_flags():
    config = build(DedupConfig, ("command line", {"bands": "20", "rows": "5", "near": "false"}))
    assert (config.bands, config.rows, config.near, config.num_perm) == (20, 5, False, 100)
    with pytest.raises(ConfigError, match="command line: ngram: expected int"):
        build(DedupConfig, ("command line", {"ngram": "five"}))
