"""Evaluation benchmark: questions per second of lmforge's ``evaluate()`` against
lm-evaluation-harness's ``hf`` backend, on one model, the same questions, in one run.

Model: ``--checkpoint`` (anything ``lmforge.load`` opens), else ``runs/quickstart`` if present, else
a small model trained here for ``--train-steps`` (the ``tiny-cpu`` shape with a 1024-token
context, on GSM8K train and MMLU dev/val text; ~12 minutes on 2 cores). Both sides run the same
weights, so its accuracy does not matter, but how long its answers are does: trained for 1,500
steps it writes GSM8K-style solutions of ~80 tokens and ends them, as a real model does (300
steps gave models that either stopped after ~10 tokens or never stopped). It is exported with
``export_hf`` and both sides read that directory, in float32 on the CPU.

Data: the real files in ``--task-data`` (``../shared/data``): ``--mmlu`` test questions spread
over subjects (``--mmlu-per-subject`` each, subjects evenly spaced in alphabetical order) and the
first ``--gsm8k`` GSM8K test questions, 5-shot both, written once as a subset in the published
layout (GSM8K's full train split stays: the few-shot draw is made from it). lmforge runs its own
tasks (``evaluate()``); lm-eval runs its own ``mmlu`` and ``gsm8k`` definitions over the same
files (``write_local_tasks``), ``simple_evaluate(model="hf", ...)`` with the same batch size.

Each task is timed end to end on each side (model loading, prompt building, scoring or
generation), interleaved, best of ``--repeats`` after one warm-up run each (which also builds
lm-eval's dataset cache), in wall and CPU seconds. The per-example predictions are compared:
MMLU's predicted letter, GSM8K's generated text. ``--profile`` prints where lmforge's time goes.
``--gsm8k-sampler first`` gives every GSM8K question the same few-shot examples on both sides
(lm-eval's ``first_n`` sampler), so the prompts share a prefix that lmforge prefills once per
batch.

    python benchmarks/eval_bench.py [--checkpoint PATH] [--mmlu 100] [--gsm8k 30] [--repeats 1]
                                    [--threads N] [--work DIR] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import json
import pstats
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
LETTERS = "ABCD"


def subset(task_data: Path, out: Path, mmlu: int, per_subject: int, gsm8k: int) -> list[str]:
    """``mmlu`` MMLU test questions over evenly spaced subjects and the first ``gsm8k`` GSM8K
    test questions, in the layout of ``task_data``; returns the MMLU subjects."""
    subjects = sorted(p.name.removesuffix("_test.csv")
                      for p in (task_data / "mmlu" / "test").glob("*_test.csv"))
    count = min(len(subjects), max(1, mmlu // per_subject))
    chosen = [subjects[i * len(subjects) // count] for i in range(count)]
    for split in ("dev", "test"):
        (out / "mmlu" / split).mkdir(parents=True)
    for subject in chosen:
        shutil.copy(task_data / "mmlu" / "dev" / f"{subject}_dev.csv", out / "mmlu" / "dev")
        with open(task_data / "mmlu" / "test" / f"{subject}_test.csv", newline="",
                  encoding="utf-8") as f:
            rows = list(csv.reader(f))[:per_subject]
        with open(out / "mmlu" / "test" / f"{subject}_test.csv", "w", newline="",
                  encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
    (out / "gsm8k").mkdir()
    shutil.copy(task_data / "gsm8k" / "train.jsonl", out / "gsm8k")
    lines = (task_data / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    (out / "gsm8k" / "test.jsonl").write_text("\n".join(lines[:gsm8k]) + "\n", encoding="utf-8")
    return chosen


def train_small(task_data: Path, work: Path, steps: int) -> Path:
    """A run directory: the tiny-cpu shape (1024-token context) trained for ``steps`` on the
    tasks' own few-shot text (GSM8K train, MMLU dev and val), its tokenizer trained on it too."""
    from lmforge.data.pipeline import DataConfig, prepare
    from lmforge.eval import data
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.config import TrainConfig
    from lmforge.train.pretrain import train

    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}"
             for r in data.gsm8k(str(task_data), "train")]
    texts += ["\n".join([r["question"], *r["choices"], LETTERS[r["answer"]]])
              for split in ("dev", "val") for r in data.mmlu(str(task_data), split)]
    Tokenizer.train(texts, 4096, workers=2, show_progress=False).save(work / "tok.json")
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare(DataConfig(input=[str(work / "corpus.jsonl")], tokenizer=str(work / "tok.json"),
                       out=str(work / "data"), preset="prose", val_fraction=0.05, workers=2,
                       progress=False))
    train(TrainConfig(data=str(work / "data"), out=str(work / "run"), preset="tiny-cpu",
                      model={"context": 1024}, batch_size=4, seq_len=1024, lr=1e-3,
                      max_steps=steps, warmup_steps=steps // 10, eval_every=steps,
                      save_every=steps, eval_batches=2, sample_tokens=0, progress=False))
    return work / "run"


def timed(fn: Callable[..., Any], *args: Any, profile: bool = False
          ) -> tuple[tuple[float, float], Any]:
    """(wall, CPU) seconds of ``fn(*args)`` and its result; ``profile`` prints where the time
    went. CPU time (this process, all threads) is what other jobs on a shared machine leave
    least changed."""
    profiler = cProfile.Profile() if profile else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    out = fn(*args)
    seconds = time.perf_counter() - wall, time.process_time() - cpu
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(14)
    return seconds, out


def agreement(task: str, ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[int, int]:
    """How many examples got the same prediction on both sides, of how many."""
    preds = {p["id"]: p for p in ours["tasks"][task]["predictions"]}
    same = total = 0
    for name, samples in theirs["samples"].items():
        subject = name.removeprefix("mmlu_local_")
        for s in samples:
            if task == "mmlu":
                logprobs = [r[0][0] for r in s["resps"]]
                mine = preds[f"{subject}/{s['doc_id']}"]["pred"]
                same += mine == max(range(4), key=logprobs.__getitem__)
            elif s["filter"] == "strict-match":
                same += preds[str(s["doc_id"])]["generated"] == s["resps"][0][0]
            else:
                continue
            total += 1
    return same, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="",
                        help="the model (default: runs/quickstart if present, else train one)")
    parser.add_argument("--task-data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--mmlu", type=int, default=100, help="MMLU test questions in all")
    parser.add_argument("--mmlu-per-subject", type=int, default=5)
    parser.add_argument("--gsm8k", type=int, default=30, help="GSM8K test questions")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--gsm8k-sampler", choices=["random", "first"], default="random",
                        help="GSM8K few-shot examples: a seeded draw per question (lm-eval's "
                             "gsm8k default) or the first of train for all (its first_n "
                             "sampler, as gsm8k-cot uses), on both sides")
    parser.add_argument("--batch-size", type=int, default=16, help="both sides")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="GSM8K generation (lm-eval's default; halved context if longer)")
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up")
    parser.add_argument("--tasks", nargs="+", default=["mmlu", "gsm8k"])
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads, both sides (0: torch's default); on cores shared "
                             "with other jobs, 1 avoids stalls at every multi-threaded op")
    parser.add_argument("--profile", action="store_true", help="profile lmforge's last run")
    parser.add_argument("--work", default="",
                        help="keep the work files here (default: a temporary directory); a "
                             "model trained by an earlier run in it is reused")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import lm_eval
    import transformers
    from lm_eval.tasks import TaskManager

    from lmforge import load
    from lmforge.eval import EvalConfig, evaluate
    from lmforge.eval.harness import write_local_tasks
    from lmforge.export.hf import export_hf

    work = Path(args.work or tempfile.mkdtemp(prefix="eval-bench-"))
    for stale in ("hf", "data", "tasks"):
        shutil.rmtree(work / stale, ignore_errors=True)
    checkpoint = args.checkpoint or (str(ROOT / "runs" / "quickstart")
                                     if (ROOT / "runs" / "quickstart").exists() else "")
    if not checkpoint and (work / "run").is_dir():
        checkpoint = str(work / "run")  # trained by an earlier run with this --work
    if not checkpoint:
        print(f"no --checkpoint nor runs/quickstart: training a small model "
              f"({args.train_steps} steps)", flush=True)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = str(train_small(Path(args.task_data), work, args.train_steps))
    model, tok = load(checkpoint)
    hf_dir = work / "hf"
    export_hf(model, tok, hf_dir)
    context = model.config.context
    max_new = args.max_new_tokens if args.max_new_tokens < context else context // 2
    subjects = subset(Path(args.task_data), work / "data", args.mmlu, args.mmlu_per_subject,
                      args.gsm8k)
    write_local_tasks(str(work / "data"), work / "tasks", args.tasks, args.gsm8k_sampler)
    manager = TaskManager(include_path=str(work / "tasks"))
    print(f"model {checkpoint}: {model.config.num_params() / 1e6:.1f}M params, context {context}, "
          f"vocab {model.config.vocab_size}; MMLU {len(subjects)} subjects × "
          f"{args.mmlu_per_subject}, GSM8K {args.gsm8k} (max {max_new} new tokens), "
          f"{args.shots}-shot, batch {args.batch_size}; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, lm-eval {lm_eval.__version__}, "
          f"transformers {transformers.__version__}", flush=True)
    del model

    def ours(task: str, run: int) -> Any:
        return evaluate(EvalConfig(checkpoint=str(hf_dir), tasks=[task],
                                   task_data=str(work / "data"), shots=args.shots,
                                   batch_size=args.batch_size, max_new_tokens=max_new,
                                   fewshot_sampler=args.gsm8k_sampler,
                                   out=str(work / f"ours-{task}-{run}"), device="cpu",
                                   dtype="fp32", force=True, progress=False))

    def theirs(task: str) -> Any:
        return lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={hf_dir},dtype=float32", device="cpu",
            tasks=[f"{task}_local"], num_fewshot=args.shots, batch_size=args.batch_size,
            task_manager=manager, log_samples=True,
            gen_kwargs={"max_gen_toks": max_new} if max_new != 256 else None)

    sides = ("lmforge evaluate()", "lm-eval hf")
    rows = []
    for task in args.tasks:
        n = len(subjects) * args.mmlu_per_subject if task == "mmlu" else args.gsm8k
        best = {side: (float("inf"), float("inf")) for side in sides}
        for run in range(args.repeats + 1):  # run 0 is the warm-up
            last = run == args.repeats
            t_ours, out_ours = timed(ours, task, run, profile=args.profile and last)
            t_theirs, out_theirs = timed(theirs, task)
            if run:
                for side, t in zip(sides, (t_ours, t_theirs), strict=True):
                    best[side] = tuple(map(min, best[side], t))
            print(f"{task} run {run}{' (warm-up)' if not run else ''}: lmforge "
                  f"{t_ours[0]:.1f} s ({t_ours[1]:.1f} s CPU), lm-eval hf {t_theirs[0]:.1f} s "
                  f"({t_theirs[1]:.1f} s CPU)", flush=True)
        same, total = agreement(task, out_ours, out_theirs)
        rows.append((task, n, best, same, total))

    print("\n| task | questions | lmforge q/s | lm-eval hf q/s | lmforge s (CPU s) | "
          "lm-eval hf s (CPU s) | speed-up (CPU) | same predictions |\n|" + "---|" * 8)
    for task, n, best, same, total in rows:
        (ours_s, ours_cpu), (theirs_s, theirs_cpu) = best[sides[0]], best[sides[1]]
        print(f"| {task} {args.shots}-shot | {n} | {n / ours_s:.2f} | {n / theirs_s:.2f} | "
              f"{ours_s:.1f} ({ours_cpu:.1f}) | {theirs_s:.1f} ({theirs_cpu:.1f}) | "
              f"{theirs_s / ours_s:.2f}× ({theirs_cpu / ours_cpu:.2f}×) | "
              f"{same}/{total} ({same / max(total, 1):.0%}) |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
