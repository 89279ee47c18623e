"""What ``lmforge data prepare`` is told: :class:`DataConfig`, and the text normalization every
stage applies first."""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from typing import Literal

from lmforge.config import build, check_at_least, option
from lmforge.data.dedup import DedupConfig
from lmforge.data.filter_result import DocumentFilter
from lmforge.data.filters import build_filters
from lmforge.data.reading import ReadOptions
from lmforge.data.storage import Store
from lmforge.errors import ConfigError


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return default


@dataclass
class DataConfig:
    """How ``lmforge data prepare`` turns inputs into shards."""

    input: list[str] = option([], "input SPECs: path, glob (text, JSONL, Parquet, WARC/WET, "
                                  "Wikipedia XML dumps), code:DIR[:EXT,...], builtin:NAME, "
                                  "hf:NAME[:CONFIG]:SPLIT; @WEIGHT mixes (e.g. "
                                  "builtin:python-docs@2)")
    tokenizer: str = option("", "tokenizer file (lmforge tokenizer train)")
    out: str = option("data", "output directory for shards and manifest.json: a path, or an "
                              "fsspec URL (s3://bucket/dir, gs://…) that every worker reaches")
    field: str = option("text", "JSONL field / Parquet column / dataset column holding the text")
    separator: str | None = option(None, "split text files into documents at this string")
    preset: str = option("web", "quality filter preset: web, prose or code")
    filters: dict = option({}, "per-filter overrides, {filter: {field: value}} (YAML)")
    languages: list[str] = option([], "keep only documents in these languages, ISO 639-1 codes "
                                      "(e.g. en fr); runs the language filter before the preset's, "
                                      "threshold in filters.language; empty: off")
    boilerplate_lines: int = option(0, "remove lines (of >= 10 characters, stripped) found in "
                                       "more than this many documents of the corpus, before "
                                       "filtering (a first pass counts them); 0: off")
    mask_pii: bool = option(False, "replace e-mail addresses, phone numbers and IP addresses by "
                                   "|||EMAIL_ADDRESS|||, |||PHONE_NUMBER|||, |||IP_ADDRESS||| "
                                   "before filtering")
    dedup: dict = option({}, "dedup overrides: exact, near, ngram, bands, rows, seed (YAML)")
    val_fraction: float = option(0.01, "share of documents for validation (by document hash)")
    shard_tokens: int = option(1 << 24, "tokens per shard (shards hold whole documents)")
    chunk_documents: int = option(512, "documents per unit of work, of resume and of memory")
    executor: Literal["local", "ray"] = option(
        "local", "run the stages on a local process pool, or as Ray tasks (pip install "
                 "'lmforge[scale]'); the output is the same")
    ray_address: str = option("", "Ray cluster to join (default: $RAY_ADDRESS; neither: a local "
                                  "Ray started for the run, with --workers CPUs)")
    workers: int = option(0, "worker processes of the local executor, CPUs of a local Ray "
                             "(0: one per core)")
    utf8_errors: Literal["replace", "strict", "quarantine"] = option(
        "replace", "invalid UTF-8: replace bad bytes (counted), stop, or drop the document")
    strict: bool = option(False, "stop at a malformed JSONL line or missing field (else skip)")
    rejects: bool = option(False, "write dropped documents with their reason to rejects.jsonl")
    force: bool = option(False, "replace the output of an earlier, different prepare in `out` "
                                "(removed only once the new shards are written) and rebuild one "
                                "finished with this config")
    rank: int = option(_env_int("RANK", "SLURM_PROCID", default=0), "this machine's rank")
    world_size: int = option(_env_int("WORLD_SIZE", "SLURM_NTASKS", default=1),
                             "number of machines sharing the inputs (without Ray)")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError("input: give at least one SPEC")
        if not self.tokenizer:
            raise ConfigError("tokenizer: give the tokenizer file to encode with")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: expected [0, 1), got {self.val_fraction}")
        check_at_least(self, 1, "shard_tokens", "chunk_documents", "world_size")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank: {self.rank} is outside world_size {self.world_size}")
        if self.executor == "ray" and self.world_size > 1:
            raise ConfigError("executor: ray spreads one run over a cluster by itself; use it "
                              "with world_size 1, or --rank/--world-size with the local executor")
        check_at_least(self, 0, "workers", "boilerplate_lines")
        self.build_filters()  # rejects an unknown preset, filter, field or language now
        _ = self.dedup_config  # rejects bad dedup settings now
        _ = self.read_options  # rejects an empty field or separator now

    def build_filters(self) -> list[DocumentFilter]:
        """The filter chain: the language filter when ``languages`` is set, then the preset's."""
        overrides = dict(self.filters)
        if not self.languages:
            if "language" in overrides:
                raise ConfigError("filters.language: the language filter is off; set languages "
                                  "(e.g. [en]) to turn it on")
            return build_filters(self.preset, overrides)
        given = overrides.get("language", {})
        if isinstance(given, dict):  # else build_filters names the bad value
            overrides["language"] = {**given, "keep": self.languages}
        return build_filters(self.preset, overrides, first=("language",))

    @property
    def dedup_config(self) -> DedupConfig:
        return build(DedupConfig, ("dedup", self.dedup))

    @property
    def read_options(self) -> ReadOptions:
        """How inputs are read (a fresh issue counter each time); quarantine reads like replace
        and drops the document later."""
        errors = "replace" if self.utf8_errors == "quarantine" else self.utf8_errors
        return ReadOptions(field=self.field, separator=self.separator, utf8_errors=errors,
                           strict=self.strict)

    @property
    def out_dir(self) -> Store:
        out = Store(self.out)
        return out / f"rank_{self.rank:05d}" if self.world_size > 1 else out


def normalize(text: str) -> str:
    """Unicode NFC (one spelling per character) and \\n line ends; the text is otherwise kept."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n"))
