"""Pre-tokenization: split text into the chunks ("words") that BPE merges never cross.

GPT-4's cl100k pattern is the default: letters with an optional leading non-letter, numbers of at
most three digits, punctuation runs, and whitespace runs that leave the last space to the next
word. GPT-2's pattern is available. Text is first split at special-token strings so that they are
never learned as ordinary text. Counting runs in a process pool over chunks of documents.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import regex

# Source: tiktoken's cl100k_base and gpt2 definitions (openai_public.py).
GPT4_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PATTERNS = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}

# Documents are handed to workers in batches of about this many characters.
_CHUNK_CHARS = 1 << 20


def split_special(text: str, special_re: regex.Pattern | None) -> list[str]:
    """The pieces of ``text`` between special-token strings (the specials themselves dropped)."""
    if special_re is None:
        return [text]
    return special_re.split(text)


def special_pattern(specials: Iterable[str]) -> regex.Pattern | None:
    specials = sorted(specials, key=len, reverse=True)  # longest first: no prefix shadows another
    if not specials:
        return None
    return regex.compile("|".join(regex.escape(s) for s in specials))


def _count_chunk(args: tuple[list[str], str, tuple[str, ...]]) -> tuple[Counter, int]:
    texts, pattern, specials = args
    findall = regex.compile(pattern).findall
    special_re = special_pattern(specials)
    counts: Counter = Counter()
    size = 0
    for text in texts:
        size += len(text)
        for piece in split_special(text, special_re):
            counts.update(findall(piece))
    return counts, size


def _chunks(texts: Iterable[str], pattern: str, specials: tuple[str, ...]) -> Iterator[tuple]:
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= _CHUNK_CHARS:
            yield batch, pattern, specials
            batch, size = [], 0
    if batch:
        yield batch, pattern, specials


def count_words(
    texts: Iterable[str],
    pattern: str = GPT4_PATTERN,
    specials: Iterable[str] = (),
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[bytes, int]:
    """Pre-tokenize ``texts`` and count each word, as UTF-8 bytes. ``progress(n_chars)`` per chunk.

    ``workers`` processes (default: all cores; 1 runs in this process). Texts are streamed, so the
    corpus never has to fit in memory; only the table of distinct words does.
    """
    workers = workers or mp.cpu_count()
    specials = tuple(specials)
    total: Counter = Counter()
    jobs = _chunks(texts, pattern, specials)
    if workers == 1:
        results: Iterable[tuple[Counter, int]] = map(_count_chunk, jobs)
        for counts, size in results:
            total.update(counts)
            if progress:
                progress(size)
    else:
        # fork shares the parent's imports (fast start) where the platform has it.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            for counts, size in pool.imap_unordered(_count_chunk, jobs):
                total.update(counts)
                if progress:
                    progress(size)
    return {word.encode("utf-8"): n for word, n in total.items()}
