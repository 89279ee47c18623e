"""Task data in its published formats, from a local directory or the Hugging Face hub.

``--task-data DIR`` takes either layout, per task:

- the published files (the layout of ``../shared/data``): ``mmlu/{dev,val,test}/SUBJECT_SPLIT.csv``
  (headerless: question, A, B, C, D, answer letter), ``gsm8k/{train,test}.jsonl``
  (``question``, ``answer``), ``humaneval/HumanEval.jsonl.gz`` (``task_id``, ``prompt``,
  ``canonical_solution``, ``test``, ``entry_point``);
- the hub's Parquet files of the same tasks, as ``cais/mmlu``, ``openai/gsm8k`` and
  ``openai/openai_humaneval`` publish them: ``mmlu/all/{dev,validation,test}-*.parquet``
  (``question``, ``subject``, ``choices``, ``answer`` as 0–3),
  ``gsm8k/main/{train,test}-*.parquet``, ``humaneval/openai_humaneval/test-*.parquet``.

``hub`` downloads those Parquet files (``huggingface_hub``); offline it fails at once, saying so.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

from lmforge.errors import InputError

HUB = {"mmlu": ("cais/mmlu", "all"), "gsm8k": ("openai/gsm8k", "main"),
       "humaneval": ("openai/openai_humaneval", "openai_humaneval")}
LETTERS = "ABCD"
Rows = list[dict[str, Any]]


def task_root(source: str, task: str) -> Path:
    """The directory holding ``task``'s files: ``source/task``, or the hub snapshot."""
    if source == "hub":
        return _download(task)
    root = Path(source) / task
    if not root.is_dir():
        raise InputError(f"{root}: no {task} data here; give --task-data a directory in the "
                         f"layout of ../shared/data (see docs/evaluation.md), or --task-data hub")
    return root


def _download(task: str) -> Path:
    from lmforge.data.sources import require_hub

    repo, subset = HUB[task]
    require_hub(f"hub:{repo}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError("--task-data hub needs huggingface_hub (pip install huggingface_hub)"
                         ) from None
    path = snapshot_download(repo, repo_type="dataset", allow_patterns=[f"{subset}/*.parquet"])
    root = Path(path).parent / f"{task}-snapshot"  # a task-named view of the snapshot
    root.mkdir(exist_ok=True)
    link = root / subset
    if not link.exists():
        link.symlink_to(Path(path) / subset, target_is_directory=True)
    return root


def _parquet(files: list[Path]) -> Rows:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{files[0]}: reading Parquet needs pyarrow (pip install pyarrow)"
                         ) from None
    rows: Rows = []
    for f in files:
        rows += pq.read_table(f).to_pylist()
    return rows


def _parquet_split(root: Path, subset: str, split: str) -> Rows | None:
    files = sorted((root / subset).glob(f"{split}-*.parquet"))
    return _parquet(files) if files else None


def _jsonl(path: Path) -> Rows:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}: line {n}: not JSON ({e.msg})") from None
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    return rows


def _need(rows: Rows, fields: tuple[str, ...], where: Path) -> Rows:
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise InputError(f"{where}: record {i + 1} lacks {', '.join(missing)} (has "
                             f"{', '.join(sorted(row))})")
    return rows


# ------------------------------------------------------------------------------------------ MMLU


def mmlu(source: str, split: str) -> Rows:
    """MMLU rows ``{question, choices, answer (0-3), subject}`` of ``split`` (dev, val, test),
    in file order, subjects sorted."""
    root = task_root(source, "mmlu")
    hub_split = {"val": "validation"}.get(split, split)
    rows = _parquet_split(root, "all", hub_split)
    if rows is not None:
        return _need(rows, ("question", "choices", "answer", "subject"), root)
    files = sorted((root / split).glob(f"*_{split}.csv"))
    if not files:
        raise InputError(f"{root}: no {split}/*_{split}.csv nor all/{hub_split}-*.parquet")
    out: Rows = []
    for path in files:
        subject = path.name.removesuffix(f"_{split}.csv")
        with open(path, newline="", encoding="utf-8") as f:
            for n, rec in enumerate(csv.reader(f), 1):
                if len(rec) != 6 or rec[5].strip() not in LETTERS:
                    raise InputError(f"{path}: row {n}: expected question, A, B, C, D and an "
                                     "answer letter A-D")
                out.append({"question": rec[0], "choices": rec[1:5],
                            "answer": LETTERS.index(rec[5].strip()), "subject": subject})
    return out


# ----------------------------------------------------------------------------------------- GSM8K


def gsm8k(source: str, split: str) -> Rows:
    """GSM8K rows ``{question, answer}`` of ``split`` (train, test), in file order."""
    root = task_root(source, "gsm8k")
    rows = _parquet_split(root, "main", split)
    where = root / "main"
    if rows is None:
        where = root / f"{split}.jsonl"
        if not where.is_file():
            raise InputError(f"{root}: no {split}.jsonl nor main/{split}-*.parquet")
        rows = _jsonl(where)
    return _need(rows, ("question", "answer"), where)


# ------------------------------------------------------------------------------------- HumanEval


def humaneval(source: str) -> Rows:
    """HumanEval problems ``{task_id, prompt, canonical_solution, test, entry_point}``."""
    root = task_root(source, "humaneval")
    rows = _parquet_split(root, "openai_humaneval", "test")
    where = root / "openai_humaneval"
    if rows is None:
        candidates = sorted(root.glob("HumanEval.jsonl*"))
        if not candidates:
            raise InputError(f"{root}: no HumanEval.jsonl.gz nor "
                             "openai_humaneval/test-*.parquet")
        where = candidates[0]
        rows = _jsonl(where)
    return _need(rows, ("task_id", "prompt", "test", "entry_point"), where)
