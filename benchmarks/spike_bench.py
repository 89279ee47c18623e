"""Spike-detector benchmark: false alarms on healthy runs, detection of injected spikes.

1. **False alarms**: clean ``tiny-cpu`` runs at the default ``TrainConfig`` and ``SpikeConfig``
   (the bench sets only the steps, the seed and the batch size) on both built-in corpora, several
   seeds each. Every ``skip`` or ``rollback`` event is a false alarm; target zero. Each run's
   logged (loss, grad norm) steps are replayed through the rule before issue 10 (the loss *or*
   the gradient norm far above its level), kept here as :class:`OldRule`: the steps it would have
   flagged along the same trajectory. The largest loss and gradient-norm excess (noise units above
   the healthy level, as the detector measures them) show the margin below the bars.
2. **Detection**: runs with uniformly random batches injected after warmup
   (``inject_spike_at``, ``inject_spike_length`` 1 and 3). Each must be caught: alarms at exactly
   the injected steps (a skip each; the ``sustained``-th in a row a rollback) and nowhere else.
   These runs checkpoint every 10 steps (something to roll back to) and stop 10 steps after the
   injection.

A tokenizer (vocabulary 2048) and the data are prepared once per corpus under ``--work``.

    python benchmarks/spike_bench.py [--steps 150] [--seeds 3] [--batch 8] [--inject 60,100]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from lmforge.data.pipeline import DataConfig, prepare
from lmforge.tokenizer.stage import TokenizerTrainConfig, train_tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import train
from lmforge.train.spikes import SpikeConfig, SpikeDetector, excess

CORPORA = {"python-docs": "prose", "python-src": "code"}  # built-in corpus → filter preset
ALARMS = ("skip", "rollback")


class OldRule(SpikeDetector):
    """The rule before issue 10: an outlier when the loss is more than 6 noise units above its
    level *or* the gradient norm more than 12 above its own."""

    def outlier(self, loss: float, grad_norm: float) -> bool:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return True
        if len(self.losses) < self.config.min_history:
            return False
        return excess(loss, self.losses) > 6.0 or excess(grad_norm, self.norms) > 12.0


def prepare_corpus(name: str, preset: str, work: Path) -> Path:
    """Train a 2048-token tokenizer on ``builtin:name`` and prepare its data under ``work``."""
    tokenizer = work / name / "tokenizer.lmforge.json"
    train_tokenizer(TokenizerTrainConfig(input=[f"builtin:{name}"], vocab_size=2048,
                                         out=str(tokenizer), progress=False))
    data = work / name / "data"
    prepare(DataConfig(input=[f"builtin:{name}"], tokenizer=str(tokenizer), out=str(data),
                       preset=preset, val_fraction=0.05, progress=False))
    return data


def run(data: Path, out: Path, steps: int, seed: int, batch: int, **kw: Any
        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """Train; returns the step records, the alarm events and the seconds it took."""
    start = time.perf_counter()
    train(TrainConfig(data=str(data), out=str(out), max_steps=steps, seed=seed, batch_size=batch,
                      sample_tokens=0, eval_every=steps, progress=False, **kw))
    records = read_metrics(out / "metrics.jsonl")
    return ([r for r in records if "event" not in r],
            [r for r in records if r.get("event") in ALARMS],
            time.perf_counter() - start)


def replay(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Along a logged trajectory: the steps the old rule flags, and the largest loss and
    gradient-norm excess over the healthy history once the detector has enough of it."""
    old, new = OldRule(SpikeConfig()), SpikeDetector(SpikeConfig())
    flagged, loss_z, grad_z = 0, -math.inf, -math.inf
    for r in steps:
        loss, norm = r["loss"], r["grad_norm"]
        if len(new.losses) >= new.config.min_history:
            loss_z = max(loss_z, excess(loss, new.losses))
            grad_z = max(grad_z, excess(norm, new.norms))
        flagged += old.check(loss, norm) != "ok"
        new.check(loss, norm)
    return {"old": flagged, "loss_z": loss_z, "grad_z": grad_z}


def false_alarms(data: dict[str, Path], work: Path, steps: int, seeds: int, batch: int
                 ) -> tuple[int, int, int]:
    """Clean runs; prints their table, returns (alarms, old-rule flags, steps)."""
    print("| corpus | seed | steps | skips | rollbacks | old rule (replayed) | max loss z "
          "| max grad-norm z | seconds |\n|---|---|---|---|---|---|---|---|---|")
    alarms_total = flags_total = steps_total = 0
    for name, path in data.items():
        for seed in range(seeds):
            records, alarms, seconds = run(path, work / f"{name}-{seed}", steps, seed, batch)
            r = replay(records)
            skips, rollbacks = (sum(a["event"] == e for a in alarms) for e in ALARMS)
            alarms_total, flags_total = alarms_total + len(alarms), flags_total + r["old"]
            steps_total += len(records)
            print(f"| {name} | {seed} | {len(records)} | {skips} | {rollbacks} | {r['old']} | "
                  f"{r['loss_z']:.1f} | {r['grad_z']:.1f} | {seconds:.0f} |", flush=True)
    return alarms_total, flags_total, steps_total


def detection(data: dict[str, Path], work: Path, positions: list[int], batch: int
              ) -> tuple[int, int]:
    """Injected runs; prints their table, returns (caught, tried)."""
    print("| corpus | injected at | length | alarms (event@step) | min loss z of the skips | "
          "caught |\n|---|---|---|---|---|---|")
    caught = tried = 0
    for name, path in data.items():
        for at in positions:
            for length in (1, 3):
                records, alarms, _ = run(path, work / f"{name}-at{at}x{length}", at + 10, 0,
                                         batch, inject_spike_at=at, inject_spike_length=length,
                                         save_every=10)
                detector = SpikeDetector(SpikeConfig())
                for r in records[:at]:  # the healthy steps before the injection
                    detector.check(r["loss"], r["grad_norm"])
                expected = [("rollback" if i + 1 >= detector.config.sustained else "skip", at + i)
                            for i in range(length)]
                got = [(a["event"], a["step"]) for a in alarms]
                z = min((excess(a["loss"], detector.losses) for a in alarms
                         if a["event"] == "skip"), default=math.nan)
                caught, tried = caught + (got == expected), tried + 1
                print(f"| {name} | {at} | {length} | {', '.join(f'{e}@{s}' for e, s in got)} "
                      f"| {z:.1f} | {got == expected} |", flush=True)
    return caught, tried


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="steps per clean run")
    parser.add_argument("--seeds", type=int, default=3, help="clean runs per corpus")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--inject", default="60,100", help="data steps the spikes start at")
    parser.add_argument("--work", default="", help="a new directory for the data and runs "
                                                    "(default: a temporary one, removed after)")
    args = parser.parse_args()
    config = SpikeConfig()
    print(f"# Spike detector — tiny-cpu, batch {args.batch}, defaults: z_threshold "
          f"{config.z_threshold}, corroborated_fraction {config.corroborated_fraction}, "
          f"grad_z_threshold {config.grad_z_threshold}, window {config.window}\n")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        data = {name: prepare_corpus(name, preset, work) for name, preset in CORPORA.items()}
        alarms, flags, steps = false_alarms(data, work / "runs", args.steps, args.seeds,
                                            args.batch)
        print()
        caught, tried = detection(data, work / "runs",
                                  [int(p) for p in args.inject.split(",")], args.batch)
    print(f"\nfalse alarms: **{alarms}** in {steps} healthy steps ({len(data) * args.seeds} "
          f"runs; the old rule, replayed: {flags}); injected spikes caught: **{caught}/{tried}**")


if __name__ == "__main__":
    main()
