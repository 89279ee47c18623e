"""``lmforge eval``: run tasks on any model ``lmforge.load`` opens, write ``eval.json``.

Examples run in chunks; each finished chunk's predictions are appended to
``OUT/partial/TASK.jsonl`` (whose first line records the model and the task's settings), so an
interrupted run continues where it stopped and a rerun with more tasks only computes the new
ones. ``eval.json`` holds, per task, its metrics, the chance level, its settings and every
per-example prediction (for multiple choice the log-likelihood of each choice; for generation
the text and the extracted answer), to audit and diff against other harnesses.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lmforge.config import check_at_least, option
from lmforge.environment import describe_machine
from lmforge.errors import ConfigError, InputError
from lmforge.eval.task import Env, Prediction, Task
from lmforge.files import atomic_write_text
from lmforge.hardware import resolve_device
from lmforge.progress import progress_bar

if TYPE_CHECKING:
    from lmforge.loading import Loaded

TASKS = ("bpb", "mmlu", "gsm8k", "humaneval")
# Examples per saved chunk (what an interrupted run can lose). GSM8K's is several batches, so
# that its continuous batching seldom runs with free rows at the end of a chunk.
CHUNK = {"bpb": 8, "mmlu": 128, "gsm8k": 64, "humaneval": 16}


@dataclass
class EvalConfig:
    """What ``lmforge eval`` runs, on which model, and where it writes."""

    checkpoint: str = option("", "the model: run directory, checkpoint file, quantized file or "
                                 "Hugging Face directory")
    tasks: list[str] = option(["bpb"], f"tasks to run: {', '.join(TASKS)}")
    harness: list[str] = option([], "lm-evaluation-harness tasks to run instead, on lmforge's "
                                    "engine (e.g. mmlu gsm8k; mmlu_local gsm8k_local read "
                                    "--task-data); needs pip install 'lmforge[eval]'")
    include_path: str = option("", "harness: a directory of more lm-eval task YAMLs")
    task_data: str = option("", "MMLU/GSM8K/HumanEval data: a directory in the layout of "
                                "../shared/data (or of the hub's Parquet files), or `hub`")
    data: list[str] = option([], "bpb: text files, globs, JSONL or a prepared data directory "
                                 "(default: the run's prepared data, its validation split)")
    limit: int = option(0, "evaluate the first N examples of each task (0: all)")
    shots: int | None = option(None, "few-shot examples (default: 5 for mmlu and gsm8k)")
    fewshot_sampler: Literal["random", "first"] = option(
        "random", "gsm8k: lm-eval's seeded random draw per question, or the first k of train")
    chat: bool = option(False, "mmlu/gsm8k: prompt in the chat template (for chat models)")
    samples: int = option(1, "humaneval: completions per problem (1: greedy)")
    temperature: float = option(0.8, "humaneval: sampling temperature when samples > 1")
    max_new_tokens: int = option(256, "gsm8k and humaneval: longest generation")
    batch_size: int = option(16, "rows per forward pass")
    out: str = option("", "directory for eval.json (default: RUN/eval for a run, else "
                          "eval/ beside the model)")
    dtype: Literal["fp32", "bf16"] | None = option(None, "cast the weights (default: as stored)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    force: bool = option(False, "discard partial results of an earlier run in out/")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ConfigError(f"tasks: {', '.join(unknown) or 'none'} not among "
                              f"{', '.join(TASKS)}")
        check_at_least(self, 0, "limit")
        check_at_least(self, 1, "samples", "batch_size", "max_new_tokens")
        if self.shots is not None and self.shots < 0:
            raise ConfigError(f"shots: must be >= 0, got {self.shots}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")


def build_tasks(config: EvalConfig, run_data: str | None) -> list[Task]:
    """The task objects ``config`` names; ``run_data`` is the run's prepared data (for bpb)."""
    needs_data = [t for t in config.tasks if t != "bpb"]
    if needs_data and not config.task_data:
        raise ConfigError(f"task_data: {', '.join(needs_data)} need their data: --task-data DIR "
                          "(the layout of ../shared/data, see docs/evaluation.md) or "
                          "--task-data hub (downloads from the Hugging Face hub)")
    shots = {} if config.shots is None else {"shots": config.shots}
    out: list[Task] = []
    for name in config.tasks:
        if name == "bpb":
            from lmforge.eval.bpb import BitsPerByte

            inputs = config.data or ([run_data] if run_data else [])
            if not inputs:
                raise ConfigError("data: bpb needs text to measure: --data FILES or a prepared "
                                  "data directory (a run's own data is used by default)")
            out.append(BitsPerByte(inputs))
        elif name == "mmlu":
            from lmforge.eval.mmlu import MMLU

            out.append(MMLU(config.task_data, chat=config.chat, **shots))
        elif name == "gsm8k":
            from lmforge.eval.gsm8k import GSM8K

            out.append(GSM8K(config.task_data, sampler=config.fewshot_sampler, chat=config.chat,
                             max_new_tokens=config.max_new_tokens, **shots))
        else:
            from lmforge.eval.humaneval import HumanEval

            out.append(HumanEval(config.task_data, samples=config.samples,
                                 temperature=config.temperature,
                                 max_new_tokens=config.max_new_tokens))
    return out


def _partial(path: Path, header: dict[str, Any], force: bool) -> list[Prediction]:
    """Predictions already made for this model and these settings (and the file ready to be
    appended to); refuses a file made with other settings unless ``force``."""
    records: list[Any] = []
    if path.is_file() and not force:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption: redo from there
                break
        if records and records[0] != header:
            raise InputError(f"{path}: partial results of another model or other settings; "
                             "pass --force to discard them, or choose another --out")
    done = records[1:]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in [header, *done]))
    return done


def default_out(loaded: Loaded) -> Path:
    """Where results go unless ``--out`` says: ``RUN/eval``, else ``eval/`` beside the model."""
    return loaded.run.path / "eval" if loaded.run is not None else loaded.source.parent / "eval"


def _model_id(source: Path) -> dict[str, Any]:
    """What identifies the model a partial result belongs to."""
    files = [source] if source.is_file() else sorted(source.glob("*.safetensors"))
    return {"source": str(source.resolve()),
            "files": [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files]}


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Run ``config.tasks``; returns (and writes to ``OUT/eval.json``) the results."""
    from lmforge.loading import open_model

    started = time.perf_counter()
    loaded = open_model(config.checkpoint, resolve_device(config.device), config.dtype)
    run_data = loaded.run.data_dir() if loaded.run is not None else None
    tasks = build_tasks(config, run_data)
    out = Path(config.out) if config.out else default_out(loaded)
    (out / "partial").mkdir(parents=True, exist_ok=True)
    env = Env(loaded.model, loaded.tokenizer, config.batch_size)
    model_id = _model_id(loaded.source)
    results: dict[str, Any] = {}
    for task in tasks:
        t0 = time.perf_counter()
        examples = task.examples()
        if config.limit:
            examples = examples[:config.limit]
        header = {"task": task.name, "model": model_id, "settings": task.settings(),
                  "limit": config.limit}
        path = out / "partial" / f"{task.name}.jsonl"
        done = _partial(path, header, config.force)
        finished = {p["id"] for p in done}
        todo = [ex for ex in examples if ex["id"] not in finished]
        bar = progress_bar(config.progress, total=len(examples), initial=len(examples) - len(todo),
                           desc=task.name, unit="ex")
        chunk = CHUNK[task.name]
        for start in range(0, len(todo), chunk):
            predictions = task.run(env, todo[start:start + chunk])
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(p) + "\n" for p in predictions))
            done += predictions
            bar.update(len(todo[start:start + chunk]))
        bar.close()
        order = {ex["id"]: i for i, ex in enumerate(examples)}
        done = sorted((p for p in done if p["id"] in order), key=lambda p: order[p["id"]])
        results[task.name] = {"metrics": task.metrics(done), "chance": task.chance,
                              "settings": task.settings(), "n": len(done),
                              "seconds": round(time.perf_counter() - t0, 2),
                              "predictions": done}
    report = {"model": {"source": str(loaded.source), "kind": loaded.kind,
                        "dtype": loaded.dtype, "quantization": loaded.quantization},
              "tasks": results, "seconds": round(time.perf_counter() - started, 2),
              "environment": describe_machine()}
    atomic_write_text(out / "eval.json", json.dumps(report, indent=1))
    report["out"] = str(out / "eval.json")
    return report


def table(report: dict[str, Any]) -> str:
    """The results as a plain-text table: task, metric, value, chance."""
    rows = [("task", "metric", "value", "chance", "n")]
    for name, result in report["tasks"].items():
        for metric, value in result["metrics"].items():
            if isinstance(value, float):
                chance = result["chance"]
                rows.append((name, metric, f"{value:.4f}",
                             "" if chance is None or metric in ("perplexity",) else f"{chance:g}",
                             str(result["n"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
