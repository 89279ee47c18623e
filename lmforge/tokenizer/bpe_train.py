"""Byte-level BPE training: repeatedly merge the most frequent adjacent pair of symbols.

The trainer works on a word-frequency table (pre-tokens → count), never on the corpus itself, and
updates pair counts incrementally: a merge only revisits the words that contain the merged pair.

Representation (the reason this is fast in pure Python): every word is a ``str`` whose characters
are symbol ids (``chr(id)``), so a pair is a 2-character string, ``pair in word`` and
``word.replace(pair, new_symbol)`` run in C, and ``str.replace`` applies a merge left to right
without overlaps, exactly as BPE prescribes.

Tie-breaking follows Hugging Face ``tokenizers`` (``BpeTrainer``): among pairs of equal count the
smallest (left id, right id) wins, where ids are HF's: the 256 byte-level characters sorted by code
point, then merged tokens in creation order. Internal symbol ids use that order, so comparing the
2-character pair strings *is* HF's tie-break, and the same words give the same merges.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from lmforge.tokenizer.bytelevel import BYTE_TO_CHAR

# Internal id of each byte: its rank among the byte-level characters sorted by code point.
_BYTE_ORDER = sorted(range(256), key=lambda b: BYTE_TO_CHAR[b])
_BYTE_TO_SYMBOL = {b: i for i, b in enumerate(_BYTE_ORDER)}
_ID_MASK = (1 << 21) - 1
_LATIN1_TO_SYMBOLS = str.maketrans({chr(b): chr(i) for b, i in _BYTE_TO_SYMBOL.items()})


def train_bpe(
    word_counts: dict[bytes, int],
    num_tokens: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Learn merges from a pre-token frequency table until ``num_tokens`` new tokens exist.

    Returns ``(vocab, merges)``: ``vocab[i]`` is token ``i``'s bytes with ``vocab[b] == bytes([b])``
    for the 256 byte tokens; ``merges`` lists ``(left_id, right_id)`` in merge order. As in HF, a
    merge whose result already exists (the same bytes reached by another split) is recorded but adds
    no token, and training stops early when no pair occurs any more. ``progress(n)`` is called with
    the number of new tokens after each batch of merges.
    """
    # Symbol tables in internal (HF) order; byte tokens first.
    sym_bytes: list[bytes] = [bytes([b]) for b in _BYTE_ORDER]
    sym_of: dict[bytes, int] = {t: i for i, t in enumerate(sym_bytes)}

    words: list[str] = []
    freqs: list[int] = []
    for token, count in word_counts.items():
        if len(token) > 1:  # a one-byte word has no pair to merge
            words.append(token.decode("latin-1").translate(_LATIN1_TO_SYMBOLS))
            freqs.append(count)

    pair_count, where = _index_pairs(words, freqs)

    # Max-heap by count, then smallest pair, as ints: -count << 42 | left << 21 | right (ids are
    # below 2**21, the Unicode range), which compare faster than tuples. Entries may be stale (a
    # pair's count only falls after it is pushed, except for pairs with the new symbol, which are
    # pushed again), so a popped entry is re-checked and pushed back with its current count.
    heap = [-c << 42 | ord(p[0]) << 21 | ord(p[1]) for p, c in pair_count.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    added = 0
    while added < num_tokens and heap:
        entry = heapq.heappop(heap)
        left, right = entry >> 21 & _ID_MASK, entry & _ID_MASK
        pair = chr(left) + chr(right)
        count = pair_count.get(pair, 0)
        if -(entry >> 42) != count:
            if count > 0:
                heapq.heappush(heap, -count << 42 | left << 21 | right)
            continue
        new_bytes = sym_bytes[left] + sym_bytes[right]
        new = sym_of.get(new_bytes)
        if new is None:
            new = len(sym_bytes)
            sym_bytes.append(new_bytes)
            sym_of[new_bytes] = new
            added += 1
        merges.append((left, right))
        _apply_merge(pair, chr(new), words, freqs, pair_count, where, heap)
        if progress is not None and added % 256 == 0:
            progress(added)
    if progress is not None:
        progress(added)

    # Renumber: bytes keep their value as id; merged tokens follow in creation order.
    to_id = {i: b for i, b in enumerate(_BYTE_ORDER)}
    to_id.update({i: i for i in range(256, len(sym_bytes))})
    vocab = [bytes([b]) for b in range(256)] + sym_bytes[256:]
    return vocab, [(to_id[a], to_id[b]) for a, b in merges]


def _apply_merge(
    pair: str,
    new: str,
    words: list[str],
    freqs: list[int],
    pair_count: dict[str, int],
    where: dict[str, list[int]],
    heap: list[int],
) -> None:
    """Replace ``pair`` by ``new`` in every word holding it; update pair counts incrementally.

    For one occurrence ``x a b y`` → ``x' N y'`` the pairs (x, a) and (b, y) disappear and (x', N),
    (N, y') appear, where x' / y' are the neighbours *after* the merge: when two occurrences touch
    (``a b a b`` → ``N N``) the pair between them is counted once, as (N, N).
    """
    a, b = pair
    # Pair with the new symbol → one word index per occurrence.
    born: dict[str, list[int]] = defaultdict(list)
    for w in where.pop(pair):
        word = words[w]
        i = word.find(pair)
        if i < 0:  # a stale entry: an earlier merge took the pair out of this word
            continue
        f = freqs[w]
        merged = word.replace(pair, new)
        words[w] = merged
        # The k-th occurrence at i in ``word`` is at i - k in ``merged``. Old neighbour pairs lose
        # f; the pair between two touching occurrences is the first one's right neighbour, so it
        # is not taken again as the second's left. New pairs are listed once per occurrence
        # (their counts are summed below); (N, N) between touching ones only as a left pair.
        prev = -2
        last = len(word) - 2
        k = 0
        while i >= 0:
            if i > 0:
                if prev != i - 2:
                    pair_count[word[i - 1] + a] -= f
                born[merged[i - k - 1] + new].append(w)
            if i < last:
                pair_count[b + word[i + 2]] -= f
                right = merged[i - k + 1]
                if right != new:
                    born[new + right].append(w)
            prev = i
            k += 1
            i = word.find(pair, i + 2)
    del pair_count[pair]
    for p, occurrences in born.items():
        # Non-zero start only when ``new`` re-used an existing token.
        c = pair_count.get(p, 0) + sum(map(freqs.__getitem__, occurrences))
        pair_count[p] = c
        where.setdefault(p, []).extend(occurrences)
        heapq.heappush(heap, -c << 42 | ord(p[0]) << 21 | ord(p[1]))


def _index_pairs(words: list[str], freqs: list[int]) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Count every adjacent pair (weighted by word frequency) and list the words holding each.

    Vectorised: all words are laid end to end as one array of symbol ids, pair keys are computed
    for positions whose right neighbour is in the same word, then grouped with a stable sort.
    """
    if not words:
        return {}, {}
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    symbols = np.frombuffer("".join(words).encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    word_of = np.repeat(np.arange(len(words)), lengths)
    same_word = word_of[:-1] == word_of[1:]
    keys = (symbols[:-1] << 21 | symbols[1:])[same_word]  # ids < 2**21 (the Unicode range)
    owners = word_of[:-1][same_word]
    order = np.argsort(keys, kind="stable")
    keys, owners = keys[order], owners[order]
    weights = np.asarray(freqs, dtype=np.int64)[owners]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    totals = np.add.reduceat(weights, starts)
    owner_list = owners.tolist()
    bounds = [*starts.tolist(), len(owner_list)]
    pair_count: dict[str, int] = defaultdict(int)
    where: dict[str, list[int]] = {}
    for k, key, total in zip(range(len(starts)), keys[starts].tolist(), totals.tolist(),
                             strict=True):
        pair = chr(key >> 21) + chr(key & 0x1FFFFF)
        pair_count[pair] = total
        where[pair] = owner_list[bounds[k] : bounds[k + 1]]
    return pair_count, where
