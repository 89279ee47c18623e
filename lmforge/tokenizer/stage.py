"""The tokenizer stage as typed functions: each ``lmforge tokenizer …`` subcommand calls one."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import regex

from lmforge.config import check_at_least, option, to_dict
from lmforge.data.sources import ReadOptions, texts
from lmforge.errors import ConfigError
from lmforge.files import atomic_write_text, check_output
from lmforge.tokenizer.hf import load_hf, save_hf
from lmforge.tokenizer.pretokenize import PATTERNS
from lmforge.tokenizer.tiktoken_file import save_tiktoken
from lmforge.tokenizer.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class TokenizerTrainConfig:
    """How to train a tokenizer (``lmforge tokenizer train``)."""

    input: list[str] = option([], "input SPECs: a path, a glob or builtin:NAME "
                                  "(builtin:python-docs, builtin:python-src)")
    vocab_size: int = option(8192, "total vocabulary: 256 bytes + merges + special tokens")
    out: str = option("tokenizer.lmforge.json", "where to write the tokenizer file")
    field: str = option("text", "JSONL field / Parquet column holding the text")
    separator: str | None = option(None, "split text files into documents at this string")
    pattern: str = option("gpt4", "pre-tokenization regex: gpt4 (cl100k), gpt2, or a regex")
    special_tokens: list[str] = option(list(DEFAULT_SPECIAL_TOKENS),
                                       "special tokens, never learned from text; ids after merges")
    workers: int = option(0, "pre-tokenization processes (0: one per core)")
    utf8_errors: Literal["replace", "strict"] = option(
        "replace", "invalid UTF-8 in input: replace each bad byte with U+FFFD and warn, or stop")
    progress: bool = option(True, "show progress bars")
    force: bool = option(False, "replace an existing output file")

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError("input: give at least one SPEC (a path, a glob or builtin:NAME)")
        minimum = 256 + len(set(self.special_tokens))
        if self.vocab_size < minimum:
            raise ConfigError(f"vocab_size: {self.vocab_size} is too small; it must be at least "
                              f"256 bytes + {len(set(self.special_tokens))} special tokens = "
                              f"{minimum}")
        if self.vocab_size > 1 << 21:
            raise ConfigError(f"vocab_size: {self.vocab_size} exceeds the supported 2**21")
        check_at_least(self, 0, "workers")
        if any(not s for s in self.special_tokens):
            raise ConfigError("special_tokens: an empty string cannot be a special token")
        try:
            regex.compile(self.regex)
        except regex.error as e:
            raise ConfigError(f"pattern: not a valid regex ({e}); use gpt4, gpt2 or a regex"
                              ) from None
        self.read_options()  # rejects an empty field or separator now, not mid-run

    def read_options(self) -> ReadOptions:
        return ReadOptions(field=self.field, separator=self.separator,
                           utf8_errors=self.utf8_errors)

    @property
    def regex(self) -> str:
        return PATTERNS.get(self.pattern, self.pattern)


def train_tokenizer(config: TokenizerTrainConfig, corpus: Iterable[str] | None = None
                    ) -> tuple[Tokenizer, dict[str, Any]]:
    """Train on ``config.input`` (or on ``corpus`` when given), save to ``config.out``.

    Returns the tokenizer and a summary (time, sizes) that is also written beside the file as
    ``<out>.train.json`` together with the resolved config.
    """
    check_output(config.out, config.force)
    if corpus is None:
        corpus = texts(config.input, config.read_options())
    seen = 0

    def counted(docs: Iterable[str]) -> Iterable[str]:
        nonlocal seen
        for d in docs:
            seen += len(d.encode("utf-8"))
            yield d

    start = time.perf_counter()
    tok = Tokenizer.train(counted(corpus), config.vocab_size, config.special_tokens,
                          config.regex, config.workers or None, config.progress)
    seconds = time.perf_counter() - start
    if tok.vocab_size < config.vocab_size:
        log.warning("the corpus ran out of pairs: vocabulary is %d, not %d",
                    tok.vocab_size, config.vocab_size)
    out = tok.save(config.out)
    summary = {"tokenizer": str(out), "fingerprint": tok.fingerprint,
               "vocab_size": tok.vocab_size, "merges": len(tok.merges),
               "train_bytes": seen, "train_seconds": round(seconds, 3), "config": to_dict(config)}
    atomic_write_text(f"{out}.train.json", json.dumps(summary, indent=2))
    return tok, summary


def describe(tok: Tokenizer, sample: Iterable[str] = ()) -> dict[str, Any]:
    """Statistics of a tokenizer; with ``sample`` texts, its compression on them."""
    pattern = next((k for k, v in PATTERNS.items() if v == tok.pattern), "custom")
    regular = [t for i, t in tok.vocab.items() if i not in tok.special_tokens.values()]
    longest = sorted(regular, key=len, reverse=True)[:5]
    stats: dict[str, Any] = {
        "vocab_size": tok.vocab_size,
        "merges": len(tok.merges),
        "special_tokens": tok.special_tokens,
        "pattern": pattern,
        "fingerprint": tok.fingerprint,
        "mean_token_bytes": round(sum(map(len, regular)) / len(regular), 2),
        "longest_tokens": [t.decode("utf-8", errors="replace") for t in longest],
    }
    n_bytes = n_tokens = 0
    for text in sample:
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tok.encode(text))
    if n_tokens:
        stats["sample_bytes"] = n_bytes
        stats["sample_tokens"] = n_tokens
        stats["bytes_per_token"] = round(n_bytes / n_tokens, 3)
    return stats


def load_any(path: str | Path) -> Tokenizer:
    """A Hugging Face tokenizer (a directory, ``tokenizer.json`` or ``vocab.json``), else an
    lmforge tokenizer file."""
    path = Path(path)
    if path.is_dir() or path.name in ("tokenizer.json", "vocab.json"):
        return load_hf(path)
    return Tokenizer.load(path)


ExportFormat = Literal["hf", "tiktoken"]


def export_tokenizer(tok: Tokenizer, fmt: ExportFormat, out_dir: str | Path,
                     force: bool = False) -> list[Path]:
    """Write ``tok`` as Hugging Face files or a tiktoken rank file into ``out_dir`` (refused if
    it is not empty, unless ``force``); returns the files written."""
    check_output(out_dir, force, directory=True)
    if fmt == "hf":
        save_hf(tok, out_dir)
        names = ["tokenizer.json", "tokenizer_config.json"]
    elif fmt == "tiktoken":
        save_tiktoken(tok, out_dir)
        names = ["tokenizer.tiktoken", "tiktoken.json"]
    else:
        raise ConfigError(f"format: {fmt!r} is not one of 'hf', 'tiktoken'")
    return [Path(out_dir) / n for n in names]


def import_tokenizer(source: str | Path, out: str | Path, force: bool = False) -> Tokenizer:
    """Convert a Hugging Face byte-level BPE to an lmforge tokenizer file at ``out`` (refused if
    it exists, unless ``force``)."""
    check_output(out, force)
    tok = load_hf(source)
    tok.save(out)
    return tok

