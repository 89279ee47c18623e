"""Near-duplicate detection: lmforge's MinHash LSH against datasketch's, on planted duplicates.

What is measured
----------------
The corpus is built from the built-in sources (nothing is downloaded): ``builtin:python-docs``
documents of at least 50 words and ``builtin:python-src`` files cut into chunks of 300
whitespace-separated tokens. Candidates are kept in order only if they share less than 30% of
their word 5-grams (exact Jaccard of the shingle sets, via an inverted index) with every document
kept before them, so the *base* documents are pairwise distinct. Then copies are planted after
them, each of a different base document (its *source*):

* *exact*: the source verbatim or with its whitespace reflowed;
* *k%*: the source with k% of its whitespace-separated tokens (at least one) replaced by words
  drawn from the corpus, for k in 1, 3, 5, 10, 20.

Both implementations see the same words: :func:`lmforge.data.dedup.normalize_words`, then word
5-grams (a shorter document is one shingle). lmforge computes ``MinHasher.signatures`` and
``near_duplicate_clusters`` (14 bands × 8 rows = 112 hashes); datasketch gets each shingle's UTF-8
bytes through ``MinHash(num_perm=112, seed=1).update_batch`` (its defaults: 32-bit SHA-1 hashes
and, since datasketch 2.0, the "affine32" permutations a·x + b mod 2^32) and ``MinHashLSH(
num_perm=112, params=(14, 8))`` (``params`` fixes bands × rows instead of deriving them from a
threshold); every document is inserted, then queried, and the candidate pairs are joined with
union-find. Reported, for both:

* *recall* per edit rate: the fraction of copies whose cluster representative is their source,
  next to the exact Jaccard of the pairs and the recall the LSH S-curve predicts for them,
  the mean of 1 − (1 − J^8)^14;
* *false positives*: the fraction of base documents dropped (each is distinct from all others,
  so any drop is a false merge), and the copies merged with a document other than their source;
* *speed*: signatures per second (best of ``--repeat``, one process), on this corpus and on all
  ``builtin:python-docs`` docstrings (short: median 14 words), and the LSH + clustering time.
  Ratios are lmforge / datasketch.

Running
-------
``python benchmarks/dedup_quality.py`` (about 30 s on 2 cores); ``--pairs`` sets the number of
copies per edit rate (400). The tables are printed as Markdown.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from lmforge.data.builtin import python_docs, python_src
from lmforge.data.dedup import DedupConfig, MinHasher, near_duplicate_clusters, normalize_words

NGRAM, BANDS, ROWS = 5, 14, 8
EDIT_RATES = (0.01, 0.03, 0.05, 0.10, 0.20)
MAX_JACCARD = 0.3  # base documents share less than this fraction of their shingles
CHUNK_TOKENS = 300


def shingles(text: str) -> list[str]:
    words = normalize_words(text).split()
    return [" ".join(words[i:i + NGRAM]) for i in range(max(len(words) - NGRAM + 1, 1))]


def candidates(docstrings: list[str]) -> list[str]:
    docs = [text for text in docstrings if len(text.split()) >= 50]
    for doc in python_src():
        tokens = doc.text.split()
        for i in range(0, len(tokens), CHUNK_TOKENS):
            chunk = " ".join(tokens[i:i + CHUNK_TOKENS])
            if len(chunk.split()) >= 50:
                docs.append(chunk)
    return docs


def distinct(texts: list[str]) -> tuple[list[str], list[set[str]]]:
    """The texts, in order, that share < MAX_JACCARD of their shingles with every earlier kept
    one, and their shingle sets."""
    kept: list[str] = []
    sets: list[set[str]] = []
    postings: dict[str, list[int]] = {}
    for text in texts:
        mine = set(shingles(text))
        shared = Counter(j for s in mine for j in postings.get(s, ()))
        if any(c >= MAX_JACCARD * (len(mine) + len(sets[j]) - c) for j, c in shared.items()):
            continue
        for s in mine:
            postings.setdefault(s, []).append(len(kept))
        kept.append(text)
        sets.append(mine)
    return kept, sets


def edit(text: str, rate: float, vocab: Sequence[str], rng: random.Random) -> str:
    """``text`` with ``rate`` of its tokens (at least one) replaced; whitespace kept as is."""
    parts = re.split(r"(\s+)", text)  # tokens at even indices, whitespace at odd ones
    tokens = [i for i in range(0, len(parts), 2) if parts[i]]
    for i in rng.sample(tokens, max(1, round(rate * len(tokens)))):
        parts[i] = rng.choice(vocab)
    return "".join(parts)


def plant(base: list[str], pairs: int, seed: int) -> tuple[list[str], list[tuple[str, int, int]]]:
    """Copies of distinct base documents: (label, source index, copy index) for each."""
    rng = random.Random(seed)
    vocab = sorted({w for text in base[:500] for w in normalize_words(text).split()})
    sources = rng.sample(range(len(base)), pairs * (len(EDIT_RATES) + 1))
    copies, planted = [], []
    for n, source in enumerate(sources):
        group = n // pairs
        if group == 0:
            text = base[source]
            copy = text if n % 2 else "\n".join(text.split())
            label = "exact"
        else:
            rate = EDIT_RATES[group - 1]
            copy, label = edit(base[source], rate, vocab, rng), f"{rate:.0%}"
        planted.append((label, source, len(base) + len(copies)))
        copies.append(copy)
    return base + copies, planted


def lmforge_signatures(texts: list[str]) -> np.ndarray:
    return MinHasher(DedupConfig(ngram=NGRAM, bands=BANDS, rows=ROWS)).signatures(texts)


def lmforge_clusters(signatures: np.ndarray) -> np.ndarray:
    return near_duplicate_clusters(signatures, BANDS, ROWS)


def datasketch():
    try:
        import datasketch
    except ImportError:
        raise SystemExit("this benchmark compares against datasketch: pip install datasketch") \
            from None
    return datasketch


def datasketch_signatures(texts: list[str]) -> list:
    out, minhash = [], datasketch().MinHash  # import check once, outside the per-document loop
    for text in texts:
        m = minhash(num_perm=BANDS * ROWS, seed=1)
        m.update_batch([s.encode("utf-8") for s in shingles(text)])
        out.append(m)
    return out


def datasketch_clusters(minhashes: list) -> np.ndarray:
    lsh = datasketch().MinHashLSH(num_perm=BANDS * ROWS, params=(BANDS, ROWS))
    for i, m in enumerate(minhashes):
        lsh.insert(i, m)
    parent = list(range(len(minhashes)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, m in enumerate(minhashes):
        for j in lsh.query(m):
            a, b = find(i), find(j)
            parent[max(a, b)] = min(a, b)  # roots are the lowest indices of their sets
    return np.array([find(i) for i in range(len(minhashes))], dtype=np.int64)


def timed(fn: Callable, arg, repeat: int) -> tuple[object, float]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(arg)
        best = min(best, time.perf_counter() - start)
    return out, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=400, help="copies per edit rate")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (best is reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the planted copies")
    args = parser.parse_args()

    start = time.perf_counter()
    docstrings = [d.text for d in python_docs()]
    pool = candidates(docstrings)
    base, sets = distinct(pool)
    corpus, planted = plant(base, args.pairs, args.seed)
    print(f"corpus: {len(pool)} candidates → {len(base)} distinct base documents "
          f"+ {len(corpus) - len(base)} planted copies ({time.perf_counter() - start:.0f}s); "
          f"datasketch {datasketch().__version__}, scheme {datasketch().MinHash().scheme}\n")

    results, speed = {}, {}
    for name, sign, cluster in (("lmforge", lmforge_signatures, lmforge_clusters),
                                ("datasketch", datasketch_signatures, datasketch_clusters)):
        sigs, t_sig = timed(sign, corpus, args.repeat)
        reps, t_lsh = timed(cluster, sigs, 1)
        results[name] = (reps, t_lsh)
        _, t_docs = timed(sign, docstrings, args.repeat)
        speed[name] = (len(corpus) / t_sig, len(docstrings) / t_docs)

    labels = ["exact"] + [f"{r:.0%}" for r in EDIT_RATES]
    print("| planted | pairs | mean Jaccard | S-curve recall | lmforge recall "
          "| datasketch recall | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label in labels:
        group = [(s, c) for lab, s, c in planted if lab == label]
        jac = [len(sets[s] & set(shingles(corpus[c]))) / len(sets[s] | set(shingles(corpus[c])))
               for s, c in group]
        theory = statistics.mean(1 - (1 - j**ROWS) ** BANDS for j in jac)
        recall = {name: np.mean([reps[c] == s for s, c in group])
                  for name, (reps, _) in results.items()}
        ratio = (f"{recall['lmforge'] / recall['datasketch']:.2f}" if recall["datasketch"]
                 else "–")
        print(f"| {label} | {len(group)} | {statistics.mean(jac):.3f} | {theory:.3f} "
              f"| {recall['lmforge']:.3f} | {recall['datasketch']:.3f} | {ratio} |")

    print("\n| implementation | base docs dropped (false positives) | copies merged elsewhere "
          "| LSH + clusters (s) |")
    print("|---|---:|---:|---:|")
    for name, (reps, t_lsh) in results.items():
        false_pos = int(np.sum(reps[:len(base)] != np.arange(len(base))))
        misplaced = sum(reps[c] not in (s, c) for _, s, c in planted)
        print(f"| {name} | {false_pos} / {len(base)} ({false_pos / len(base):.2%}) | {misplaced} "
              f"| {t_lsh:.2f} |")

    print("\n| signatures/s (one process) | docs | MB | lmforge | datasketch | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for i, (label, texts) in enumerate((("this corpus", corpus), ("python-docs", docstrings))):
        ours, theirs = speed["lmforge"][i], speed["datasketch"][i]
        megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        print(f"| {label} | {len(texts)} | {megabytes:.1f} | {ours:,.0f} | {theirs:,.0f} "
              f"| {ours / theirs:.1f} |")
    print(f"\ntotal {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
