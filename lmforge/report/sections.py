"""What a report says about a run: one function per section, each reading only what it needs.

:class:`RunRecords` reads a run directory's records once (``config.json``, ``metrics.jsonl``,
``eval/eval.json``); each section function turns them into blocks (:mod:`.render`). A part that is
missing is left out with a line saying so; one that is there but malformed is an
:class:`~lmforge.errors.InputError` naming the file.
"""

from __future__ import annotations

import io
import json
import os
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import lmforge
from lmforge.environment import describe_machine
from lmforge.errors import InputError
from lmforge.report.render import Block, Code, Figure, Section, Table
from lmforge.rundir import RunDir
from lmforge.train.metrics import read_metrics

EVAL_FILE = Path("eval") / "eval.json"
LAST_SAMPLES = 3


def fmt(value: Any) -> str:
    """A figure as a reader wants it: 1,234,567; 0.1235; JSON for structures; — for none."""
    if value is None:
        return "—"
    if isinstance(value, bool | str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.1f}"
        return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3g}"
    return json.dumps(value, ensure_ascii=False)


def literal(value: Any) -> str:
    """A config value as it would be written: 0.003, 1e-05, true, {"n_layers": 2}."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a JSON object at the top level")
    return doc


@dataclass
class RunRecords:
    """A run directory's records, read once."""

    run: RunDir
    config: dict[str, Any]  # config.json: {"train": ..., "model": ...} ({} when missing)
    records: list[dict[str, Any]]  # metrics.jsonl, in order ([] when missing)
    evaluation: dict[str, Any] | None  # eval/eval.json

    @classmethod
    def read(cls, run: RunDir) -> RunRecords:
        config = _read_json(run.config) if run.config.is_file() else {}
        records = []
        if run.metrics.is_file():
            try:
                records = read_metrics(run.metrics)
            except json.JSONDecodeError as e:
                raise InputError(f"{run.metrics}: a line is not JSON ({e})") from None
        eval_path = run.path / EVAL_FILE
        evaluation = _read_json(eval_path) if eval_path.is_file() else None
        return cls(run, config, records, evaluation)

    @property
    def train(self) -> dict[str, Any]:
        return self.config.get("train") or {}

    @property
    def steps(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "event" not in r and "loss" in r]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == name]

    @property
    def done(self) -> dict[str, Any] | None:
        done = self.events("done")
        return done[-1] if done else None

    @property
    def final(self) -> dict[str, Any]:
        """The last validation figures: the ``done`` record's, else the last evaluation's."""
        evals = self.events("eval")
        return self.done or (evals[-1] if evals else {})


def _params(rec: RunRecords) -> int | None:
    if rec.done and "params" in rec.done:
        return rec.done["params"]
    if "model" not in rec.config:
        return None
    from lmforge.model import ModelConfig

    return ModelConfig(**rec.config["model"]).num_params()


def _status(rec: RunRecords) -> str:
    if rec.done:
        budget = " (stopped by its time budget)" if rec.done.get("stopped_by_time_budget") else ""
        return f"Finished at step {rec.done['step']:,}{budget}."
    stopped = rec.events("interrupted")
    if stopped:
        last = stopped[-1]
        return f"Interrupted at step {last['step']:,} ({last.get('signal') or 'stop request'})."
    if rec.records:
        return (f"No `done` record: still training, or stopped without one (last record: step "
                f"{rec.records[-1].get('step', 0):,}).")
    return "No metrics.jsonl: training has not logged anything yet."


def summary(rec: RunRecords) -> Section:
    final = rec.final
    bpb, base = final.get("val_bpb"), final.get("unigram_bpb")
    blocks: list[Block] = [
        f"Generated {datetime.now().astimezone():%Y-%m-%d %H:%M %Z} by lmforge "
        f"{lmforge.__version__} from {rec.run.path.resolve()}.", _status(rec)]
    if bpb is not None and base:
        gain = 1 - bpb / base
        blocks.append(f"Final validation: {bpb:.4f} bits per byte against the unigram baseline's "
                      f"{base:.4f} ({abs(gain):.1%} {'lower' if gain >= 0 else 'higher'}; a "
                      "model that ignores context scores the baseline).")
    elif bpb is not None:
        blocks.append(f"Final validation: {bpb:.4f} bits per byte (no unigram baseline recorded).")
    else:
        blocks.append("No validation result recorded yet.")
    steps = rec.done["step"] if rec.done else max((r["step"] + 1 for r in rec.steps), default=0)
    rows = [["validation bpb", fmt(bpb)], ["unigram baseline bpb", fmt(base)],
            ["validation loss (nats/token)", fmt(final.get("val_loss"))],
            ["parameters", fmt(_params(rec))], ["steps", fmt(steps)],
            ["rollbacks", fmt(len(rec.events("rollback")))],
            ["skipped steps", fmt(len(rec.events("skip")))]]
    blocks.append(Table(["figure", "value"], rows))
    blocks.append(_checkpoints(rec.run))
    return Section("Summary", blocks)


def _checkpoints(run: RunDir) -> Block:
    from lmforge.train.checkpoint import Checkpoints

    ckpts = Checkpoints(run)
    entries = ckpts.entries()
    if not entries:
        return "No checkpoints listed in checkpoints/index.json."
    best = ckpts.best()
    return Table(["checkpoint", "step", "val loss", "clean (rollback target)", "best"],
                 [[e["path"], fmt(e["step"]), fmt(e["val_loss"]), fmt(e["clean"]),
                   "best" if best is not None and best.name == e["path"] else ""]
                  for e in entries])


def _kv_table(values: dict[str, Any], caption: str, show: Callable[[Any], str] = fmt) -> Table:
    return Table(["field", "value"], [[k, show(v)] for k, v in values.items()], caption)


def configs(rec: RunRecords) -> Section:
    if not rec.config:
        return Section("Configs", ["config.json not found: the run's configs are unknown."])
    blocks: list[Block] = ["The resolved configs the run recorded in config.json."]
    for name in ("train", "model"):
        if isinstance(rec.config.get(name), dict):
            blocks.append(_kv_table(rec.config[name], name, literal))
    return Section("Configs", blocks)


def _flatten(values: dict[str, Any], prefix: str = "") -> list[list[str]]:
    rows = []
    for key, value in values.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", fmt(value)])
    return rows


def data(rec: RunRecords) -> Section:
    from lmforge.data.manifest import NAME, summarize

    data_dir = rec.run.data_dir()
    if data_dir is None:
        return Section("Data", ["config.json records no data directory."])
    if not (Path(data_dir) / NAME).is_file():
        return Section("Data", [f"{Path(data_dir) / NAME}: not found (the data directory was "
                                "moved or deleted); its figures are left out."])
    s = summarize(data_dir)
    blocks: list[Block] = [
        f"Prepared data: {data_dir}",
        Table(["figure", "value"], [["tokens", fmt(s["num_tokens"])],
                                    ["documents", fmt(s["num_documents"])],
                                    ["shards", fmt(s["shards"])], ["dtype", s["dtype"]],
                                    ["tokenizer fingerprint", s["tokenizer"]]]),
        Table(["split", "tokens", "documents"],
              [[name, fmt(v["tokens"]), fmt(v["documents"])] for name, v in s["splits"].items()]),
        Table(["statistic", "count"], _flatten(s["stats"]),
              "pipeline: documents read, dropped by each filter, removed as duplicates")]
    return Section("Data", blocks)


def tokenizer(rec: RunRecords) -> Section:
    from lmforge.tokenizer import Tokenizer

    if not rec.run.tokenizer.is_file():
        return Section("Tokenizer", [f"{rec.run.tokenizer.name}: not found."])
    tok = Tokenizer.load(rec.run.tokenizer)
    return Section("Tokenizer", [
        Table(["figure", "value"], [["vocabulary size", fmt(tok.vocab_size)],
                                    ["merges", fmt(len(tok.merges))],
                                    ["special tokens", fmt(len(tok.special_tokens))],
                                    ["fingerprint", tok.fingerprint[:16]]]),
        Table(["special token", "id"], [[s, str(i)] for s, i in tok.special_tokens.items()]),
        "Pre-tokenization pattern:", Code(tok.pattern)])


def _curves_png(rec: RunRecords) -> bytes:
    """Validation bpb against the unigram baseline, and training throughput, per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in rec.events("eval") if "val_bpb" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax1.plot([r["step"] for r in evals], [r["val_bpb"] for r in evals], "o-", label="model")
    base = rec.final.get("unigram_bpb")
    if base is not None:
        ax1.axhline(base, color="gray", ls="--", label="unigram baseline")
    ax1.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    ax1.legend()
    ax2.plot([r["step"] for r in rec.steps], [r["tokens_per_s"] for r in rec.steps], lw=0.8)
    ax2.set(xlabel="step", ylabel="tokens/s", title="training throughput")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def curves(rec: RunRecords, out_dir: Path) -> Section:
    blocks: list[Block] = []
    plot = rec.run.loss_plot
    if plot.is_file():
        link = Path(os.path.relpath(plot, out_dir)).as_posix()
        blocks.append(Figure("loss.png: training loss and validation bpb (from training)",
                             plot.read_bytes(), link))
    else:
        blocks.append("loss.png: not found (training draws it when it finishes).")
    if rec.events("eval") or rec.steps:
        blocks.append(Figure("validation bpb and throughput, drawn from metrics.jsonl",
                             _curves_png(rec)))
    else:
        blocks.append("metrics.jsonl holds no steps or evaluations to draw.")
    return Section("Training curves", blocks)


def evaluation(rec: RunRecords) -> Section:
    doc = rec.evaluation
    path = rec.run.path / EVAL_FILE
    if doc is None:
        return Section("Evaluation", [f"{EVAL_FILE.as_posix()}: not found (the run has not been "
                                      "evaluated)."])
    tasks = doc.get("tasks")
    if not isinstance(tasks, dict) or not all(isinstance(t, dict) and isinstance(
            t.get("metrics"), dict) for t in tasks.values()):
        raise InputError(f"{path}: expected \"tasks\": {{NAME: {{\"metrics\": {{...}}}}}}")
    model = doc.get("model") or {}
    seconds = doc.get("seconds")
    took = f" in {seconds:.1f} s" if isinstance(seconds, int | float) else ""
    blocks: list[Block] = [
        f"Model: {model.get('source', '?')} ({model.get('kind', '?')}, "
        f"{model.get('dtype', '?')}), evaluated{took}."]
    unigram = rec.final.get("unigram_bpb")
    rows = []
    for name, task in tasks.items():
        for metric, value in task["metrics"].items():
            if not isinstance(value, float):  # counts and per-subject breakdowns stay in the file
                continue
            chance = task.get("chance")
            if "bpb" in metric:
                chance = f"{unigram:.4f} (unigram)" if unigram is not None else None
            rows.append([name, metric, fmt(value), fmt(chance),
                         fmt(task.get("n", task["metrics"].get("n")))])
    blocks.append(Table(["task", "metric", "score", "chance", "n"], rows))
    blocks.append("Chance: the score of guessing (a uniform pick among MMLU's four choices; 0 "
                  "where an answer is generated); for bits per byte, the unigram baseline of the "
                  f"run's validation split. Task settings and breakdowns: {EVAL_FILE.as_posix()}.")
    return Section("Evaluation", blocks)


def samples(rec: RunRecords) -> Section:
    if not rec.run.samples.is_file():
        why = " (the run sampled nothing: sample_tokens 0)" if rec.train.get(
            "sample_tokens") == 0 else ""
        return Section("Samples", [f"samples.txt: not found{why}."])
    # samples.txt is "--- step N\n<text>\n" per evaluation
    parts = re.split(r"^--- step (\d+)\n", rec.run.samples.read_text(encoding="utf-8"),
                     flags=re.M)
    found = list(zip(parts[1::2], parts[2::2], strict=True))
    if not found:
        return Section("Samples", ["samples.txt holds no samples."])
    prompt = rec.train.get("sample_prompt")
    blocks: list[Block] = [f"The last {min(LAST_SAMPLES, len(found))} of {len(found)} samples"
                           + (f" (prompt {prompt!r})" if prompt else "") + ":"]
    for step, text in found[-LAST_SAMPLES:]:
        blocks += [f"step {int(step):,}:", Code(text.removesuffix("\n"))]
    return Section("Samples", blocks)


def _step_seconds(rec: RunRecords) -> float | None:
    """Σ tokens per step ÷ tokens/s over the step records: time in optimizer steps (evaluation
    and checkpoints excluded), for one process (the ranks of torchrun are not recorded)."""
    model = rec.config.get("model") or {}
    seq_len = rec.train.get("seq_len") or model.get("context")
    batch, accum = rec.train.get("batch_size"), rec.train.get("grad_accum", 1)
    if not (seq_len and batch and rec.steps):
        return None
    return sum(batch * seq_len * accum / r["tokens_per_s"] for r in rec.steps
               if r["tokens_per_s"] > 0)


def timings(rec: RunRecords) -> Section:
    if not rec.records:
        return Section("Timings", ["metrics.jsonl: not found or empty."])
    tps = [r["tokens_per_s"] for r in rec.steps]
    mfu = [r["mfu"] for r in rec.steps if "mfu" in r]
    seconds = _step_seconds(rec)
    rows = [["step records", fmt(len(tps))],
            ["last step", fmt(max((r.get("step", 0) for r in rec.records), default=0))],
            ["median tokens/s", fmt(statistics.median(tps)) if tps else "—"],
            ["median MFU", f"{statistics.median(mfu):.1%}" if mfu else "— (not measured)"],
            ["time in training steps (one process)",
             f"{seconds:.1f} s" if seconds is not None else "—"],
            ["evaluations", fmt(len(rec.events("eval")))]]
    blocks: list[Block] = [Table(["figure", "value"], rows)]
    if rec.done:
        blocks.append(_kv_table({k: v for k, v in rec.done.items() if k != "event"},
                                "the final summary (metrics.jsonl's done record)"))
    return Section("Timings", blocks)


def environment(rec: RunRecords) -> Section:
    rows = [list(item) for item in describe_machine().items()]
    blocks: list[Block] = [Table(["item", "value"], rows,
                                 "where this report was generated")]
    evaluated_on = (rec.evaluation or {}).get("environment")
    if isinstance(evaluated_on, dict) and evaluated_on:
        blocks.append(Table(["item", "value"], _flatten(evaluated_on),
                            f"where the evaluation ran ({EVAL_FILE.as_posix()})"))
    return Section("Environment", blocks)


def sections(rec: RunRecords, out_dir: Path) -> list[Section]:
    """Every section of the report, in reading order."""
    return [summary(rec), configs(rec), data(rec), tokenizer(rec), curves(rec, out_dir),
            evaluation(rec), samples(rec), timings(rec), environment(rec)]
