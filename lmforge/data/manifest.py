"""``DIR/manifest.json``: what a prepared data directory holds and how it was made.

Fields: ``format``/``version``; ``shards`` (``path`` relative to DIR, ``split``, ``tokens``,
``documents``); ``num_tokens`` and ``num_documents`` per split and in total; ``dtype``;
``tokenizer`` (path, fingerprint, vocab size); ``stats`` (``input``: documents read, bytes replaced
in invalid UTF-8, unreadable records; ``filters``: filter name → documents dropped; ``dedup``:
``exact`` / ``near`` → documents removed; with PII masking ``pii``: type → replacements; with a
language filter ``languages``: code → kept, dropped; with boilerplate-line removal
``boilerplate``: lines removed, documents touched, distinct lines); ``config``: the resolved
pipeline config.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from lmforge.data.storage import Store
from lmforge.errors import InputError

FORMAT = "lmforge-data"
VERSION = 1
NAME = "manifest.json"


def write_manifest(data_dir: str | Path | Store, manifest: dict[str, Any]) -> None:
    doc = {"format": FORMAT, "version": VERSION, **manifest}
    (_store(data_dir) / NAME).write_text(json.dumps(doc, indent=2))


def _store(data_dir: str | Path | Store) -> Store:
    return data_dir if isinstance(data_dir, Store) else Store(data_dir)


def load_manifest(data_dir: str | Path | Store) -> dict[str, Any]:
    """The manifest of a prepared directory (a path or an fsspec URL)."""
    path = _store(data_dir) / NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no manifest; prepare the directory with `lmforge data "
                         "prepare` first") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: corrupt manifest ({e})") from None
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise InputError(f"{path}: not an lmforge data manifest of version {VERSION}")
    return doc


def totals(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """``num_tokens`` / ``num_documents`` per split and overall, from the shard list."""
    tokens: Counter = Counter()
    docs: Counter = Counter()
    for s in shards:
        tokens[s["split"]] += s["tokens"]
        docs[s["split"]] += s["documents"]
    return {"num_tokens": sum(tokens.values()), "num_documents": sum(docs.values()),
            "splits": {k: {"tokens": tokens[k], "documents": docs[k]} for k in sorted(tokens)}}


def _add(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict):
            _add(into.setdefault(key, {}), value)
        else:
            into[key] = into.get(key, 0) + value


def merge_manifests(data_dir: str | Path) -> dict[str, Any]:
    """Combine the ``rank_*/manifest.json`` of a multi-machine run into ``DIR/manifest.json``.

    Each rank deduplicated its own part; documents duplicated *across* ranks are not removed.
    """
    data_dir = Path(data_dir)
    parts = sorted(p.parent for p in data_dir.glob("rank_*/manifest.json"))
    if not parts:
        raise InputError(f"{data_dir}: no rank_*/manifest.json to merge")
    manifests = [load_manifest(p) for p in parts]
    fingerprints = {m["tokenizer"]["fingerprint"] for m in manifests}
    if len(fingerprints) != 1:
        raise InputError(f"{data_dir}: ranks used different tokenizers; cannot merge")
    world = {m["config"]["world_size"] for m in manifests}
    if world != {len(manifests)}:
        raise InputError(f"{data_dir}: found {len(manifests)} rank manifests but the runs were "
                         f"made for world_size {sorted(world)}; is a rank missing?")
    shards = [{**s, "path": f"{p.name}/{s['path']}"} for p, m in zip(parts, manifests, strict=True)
              for s in m["shards"]]
    stats: dict[str, Any] = {}
    for m in manifests:
        _add(stats, m["stats"])
    merged = {"shards": shards, **totals(shards), "dtype": manifests[0]["dtype"],
              "tokenizer": manifests[0]["tokenizer"], "stats": stats,
              "config": {**manifests[0]["config"], "rank": None}, "ranks": len(manifests)}
    write_manifest(data_dir, merged)
    return merged


def summarize(data_dir: str | Path) -> dict[str, Any]:
    """The figures of a prepared directory (``lmforge data stats``)."""
    m = load_manifest(data_dir)
    return {"num_tokens": m["num_tokens"], "num_documents": m["num_documents"],
            "splits": m["splits"], "shards": len(m["shards"]), "dtype": m["dtype"],
            "tokenizer": m["tokenizer"]["fingerprint"][:16], "stats": m["stats"]}
