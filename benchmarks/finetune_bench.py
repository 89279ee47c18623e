"""Fine-tuning benchmark: lmforge's LoRA SFT and DPO steps against TRL's ``SFTTrainer`` and
``DPOTrainer`` with PEFT, and lmforge's LoRA against its own full fine-tuning, in one run.

Models: ``--checkpoint`` (anything ``lmforge.load`` opens; default ``runs/quickstart``) and, per
``--presets`` name, a randomly initialised model of that shape with the checkpoint's tokenizer (so
that the matmuls, not the per-step overhead, dominate). Each is exported with ``export_hf`` and
both sides open that directory (lmforge with ``lmforge.load``, TRL with
``AutoModelForCausalLM``): the same weights, in float32 on the CPU.

Data (``--data real``): GSM8K train as user/assistant conversations for SFT; for DPO the
HH-RLHF harmless-base pairs (the test split, the only preference file at hand: nothing here is
evaluated on it); ``--data builtin``: lmforge's built-in stdlib-docstring sets. Rows are rendered
once by lmforge (chat format, assistant-only mask, cut from the left to ``--seq-len`` + 1) and
both sides get the same token ids, the same scored tokens and the same batches in the same order:
lmforge draws them with ``SFTBatches`` / ``PreferenceBatches`` (length-grouped, right-padded to
the longest row, no packing) and TRL reads the rows pre-tokenized in that order
(``train_sampling_strategy="sequential"``; DPO's tokenizing preparation is bypassed, the
collator and the training step are TRL's). DPO uses only pairs whose rows fit uncut and share
their prompt, which TRL's format needs.

Each side runs in a fresh subprocess (``--threads`` torch threads) so that its peak RSS
(``ru_maxrss``) is its own; the RSS after the model and data are loaded is reported too. lmforge's
side is the step ``fit`` runs, written out: ``sft.assistant_loss`` (``model(ids, targets)``) or
``dpo.dpo_batch_loss`` with ``reference_for`` (adapters off), backward, clip 1.0, AdamW from
``optimizer_for``. TRL's side is ``trainer.train()`` (fused AdamW, its metrics, logging every
step), timed by a callback at each step's end. Both: constant LR, AdamW β (0.9, 0.95), no weight
decay, LoRA rank 8 / alpha 16 on the 7 projections, dropout 0. Tokens/s counts real (non-pad)
input tokens over the steps after ``--warmup``. TRL runs with ``gradient_checkpointing=False``
(the same work as lmforge) and also, unless ``--no-trl-checkpointing``, with TRL's default
``True`` (less memory, more time: what a user gets without asking).

    python benchmarks/finetune_bench.py [--checkpoint PATH] [--presets tinystories-17m]
                                        [--steps 20] [--preset-steps 8] [--warmup 3]
                                        [--batch-size 8] [--dpo-batch-size 4] [--data real]
                                        [--threads 1] [--repeats 1] [--no-trl-checkpointing]
                                        [--malloc-mmap-threshold BYTES] [--profile] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TASK_DATA = ROOT.parent / "shared" / "data"
LORA_RANK, LORA_ALPHA = 8, 16.0
BETAS = (0.9, 0.95)  # lmforge's LoopConfig defaults, given to TRL too
DPO_BETA = 0.1
LOSS_STEPS = 10  # losses compared step by step
MIB = 1 << 20


# ------------------------------------------------------------------------------ measurements


def rss_now_mib() -> float:
    """This process's resident set size now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of AdamW's moment estimates (exp_avg, exp_avg_sq) over every parameter."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for name, t in state.items() if name in ("exp_avg", "exp_avg_sq"))


def trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- data, models


def sft_rows(kind: str, tok: Any, seq_len: int) -> list[Any]:
    """Rendered SFT examples (lmforge ``Example``) of ``kind``'s conversations."""
    from lmforge.data.chat_batches import render_examples
    from lmforge.tokenizer.chat import Message

    if kind == "builtin":
        from lmforge.data.chat_builtin import docs_conversations
        conversations = docs_conversations("train")
    else:
        lines = (TASK_DATA / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()
        conversations = [[Message("user", r["question"]), Message("assistant", r["answer"])]
                         for r in map(json.loads, lines)]
    return render_examples(tok, conversations, seq_len)[0]


def dpo_pairs(kind: str, tok: Any, seq_len: int) -> list[tuple[Any, Any]]:
    """Rendered preference pairs that TRL's (prompt, chosen, rejected) format holds exactly:
    neither row cut, and the scored reply starting at the same position in both."""
    from lmforge.data.chat_batches import render_pairs

    if kind == "builtin":
        from lmforge.data.chat_builtin import docs_preferences
        pairs = docs_preferences("train")
    else:
        from lmforge.data.conversations import read_preferences
        pairs = read_preferences(TASK_DATA / "hh_rlhf" / "harmless-base-test.jsonl.gz")[0]
    rendered = render_pairs(tok, pairs, seq_len)[0]
    return [(c, r) for c, r in rendered if not (c.truncated or r.truncated)
            and first_scored(c) == first_scored(r)]


def first_scored(example: Any) -> int:
    return int(example.mask.argmax())


def subset(items: list[Any], count: int, seed: int) -> list[Any]:
    """``count`` items drawn at random (seeded), in their original order."""
    import numpy as np

    if len(items) < count:
        raise SystemExit(f"only {len(items)} usable rows for {count}; lower --steps or the "
                         "batch size")
    keep = np.sort(np.random.default_rng(seed).choice(len(items), count, replace=False))
    return [items[i] for i in keep]


def example_json(e: Any) -> dict[str, Any]:
    return {"ids": e.ids.tolist(), "mask": e.mask.astype(int).tolist(), "cut": e.truncated}


def example_from(d: dict[str, Any]) -> Any:
    import numpy as np

    from lmforge.data.chat_batches import Example
    return Example(np.asarray(d["ids"], dtype=np.int32), np.asarray(d["mask"], dtype=bool),
                   d["cut"])


def export_models(args: argparse.Namespace, work: Path) -> list[tuple[str, Path, int]]:
    """(label, Hugging Face directory, timed steps) per model: the checkpoint, then each
    preset's shape randomly initialised with the checkpoint's tokenizer."""
    import torch

    from lmforge import load
    from lmforge.export.hf import export_hf
    from lmforge.model import ModelConfig, Transformer
    from lmforge.vocab import padded_vocab

    model, tok = load(args.checkpoint)
    out = [(f"{Path(args.checkpoint).name} ({model.config.num_params() / 1e6:.1f}M)",
            work / "hf-checkpoint", args.steps)]
    export_hf(model, tok, out[0][1])
    for preset in args.presets:
        base = ModelConfig.from_preset(preset)
        config = ModelConfig.from_preset(preset, vocab_size=padded_vocab(tok.vocab_size,
                                                                           base.vocab_size))
        torch.manual_seed(args.seed)
        model = Transformer(config)
        label = f"{preset} shape, random ({config.num_params() / 1e6:.1f}M)"
        out.append((label, work / f"hf-{preset}", args.preset_steps))
        export_hf(model, tok, out[-1][1])
    return out


def write_specs(args: argparse.Namespace, work: Path, hf_dir: Path, steps: int
                ) -> dict[str, Path]:
    """The SFT and DPO data of one model, as files the sides read: rows and TRL's order."""
    from lmforge import load
    from lmforge.data.chat_batches import PreferenceBatches, SFTBatches, pad_id_of

    _, tok = load(str(hf_dir))
    context = json.loads((hf_dir / "config.json").read_text())["max_position_embeddings"]
    seq_len = min(args.seq_len, context)
    pad = pad_id_of(tok)
    total = args.warmup + steps + (args.profile_steps if args.profile else 0)
    common = {"hf_dir": str(hf_dir), "seq_len": seq_len, "pad": pad, "lr": args.lr,
              "seed": args.seed, "warmup": args.warmup, "steps": total,
              "timed": args.warmup + steps, "threads": args.threads, "work": str(work)}
    examples = subset(sft_rows(args.data, tok, seq_len), total * args.batch_size, args.seed)
    order = SFTBatches(examples, args.batch_size, seq_len, args.seed, pad).epoch_plan(0)
    sft = {**common, "batch_size": args.batch_size, "order": order.flatten().tolist(),
           "rows": [example_json(e) for e in examples]}
    pairs = subset(dpo_pairs(args.data, tok, seq_len), total * args.dpo_batch_size, args.seed)
    order = PreferenceBatches(pairs, args.dpo_batch_size, seq_len, args.seed,
                              pad).epoch_plan(0)
    dpo = {**common, "batch_size": args.dpo_batch_size, "order": order.flatten().tolist(),
           "rows": [[example_json(c), example_json(r)] for c, r in pairs]}
    paths = {}
    for name, spec in (("sft", sft), ("dpo", dpo)):
        paths[name] = work / f"{hf_dir.name}-{name}.json"
        paths[name].write_text(json.dumps(spec))
    return paths


# ------------------------------------------------------------------------------- the sides


def ours(spec: dict[str, Any], objective: str, lora: bool, profile: bool) -> dict[str, Any]:
    """lmforge: the step ``fit`` runs for ``objective`` ("sft" or "dpo"), LoRA or full."""
    import torch

    from lmforge import load
    from lmforge.data.chat_batches import (
        PreferenceBatches,
        SFTBatches,
        count_tokens,
    )
    from lmforge.finetune.dpo import dpo_batch_loss, preference_figures
    from lmforge.finetune.lora import LoraConfig, apply_lora
    from lmforge.finetune.run import Base, reference_for
    from lmforge.finetune.sft import assistant_loss
    from lmforge.train.config import LoopConfig
    from lmforge.train.loop import optimizer_for

    loaded = load(spec["hf_dir"])
    model = loaded.model
    torch.manual_seed(spec["seed"])  # the adapters' A
    lora_config = LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA) if lora else None
    if lora_config:
        apply_lora(model, lora_config)
    else:
        model.requires_grad_(True)
    model.train()
    if objective == "sft":
        rows = [example_from(r) for r in spec["rows"]]
        batches: Any = SFTBatches(rows, spec["batch_size"], spec["seq_len"], spec["seed"],
                                  spec["pad"])

        def loss_fn(m: Any, batch: Any) -> tuple[Any, dict[str, float]]:
            return assistant_loss(m, batch), {}
    else:
        pairs = [(example_from(c), example_from(r)) for c, r in spec["rows"]]
        batches = PreferenceBatches(pairs, spec["batch_size"], spec["seq_len"], spec["seed"],
                                    spec["pad"])
        reference = reference_for(Base(model, loaded, lora_config, spec["seq_len"]),
                                  adapters_off=lora)

        def loss_fn(m: Any, batch: Any) -> tuple[Any, dict[str, float]]:
            out = dpo_batch_loss(m, batch, reference, DPO_BETA)
            return out.loss, preference_figures(out)
    optimizer = optimizer_for(model, LoopConfig(lr=spec["lr"], weight_decay=0.0,
                                                beta1=BETAS[0], beta2=BETAS[1]))
    loaded_rss = rss_now_mib()

    def step() -> tuple[float, int]:
        batch = batches.next_batch()
        loss, _figures = loss_fn(model, batch)  # computed as fit does (it logs them)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), count_tokens(batch, spec["pad"]).real

    losses, tokens, ends = [], [], []
    for _ in range(spec["timed"]):
        loss, real = step()
        ends.append(time.perf_counter())
        losses.append(loss)
        tokens.append(real)
    result = {"losses": losses, "tokens": tokens, "ends": ends, "rss_loaded": loaded_rss,
              "peak_rss": peak_rss_mib(), "trainable": trainable(model),
              "optimizer_bytes": optimizer_state_bytes(optimizer)}
    if profile and spec["steps"] > spec["timed"]:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(spec["steps"] - spec["timed"]):
                step()
        result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total",
                                                      row_limit=18, max_name_column_width=40)
    return result


def theirs(spec: dict[str, Any], objective: str, checkpointing: bool) -> dict[str, Any]:
    """TRL's ``SFTTrainer`` / ``DPOTrainer`` with a PEFT LoRA of the same shape."""
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from lmforge.finetune.lora import PROJECTIONS

    class StepClock(TrainerCallback):
        """Each optimizer step's end time and each logged loss."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.losses: dict[int, float] = {}

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ends.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   **kw: Any) -> None:
            if logs and "loss" in logs:
                self.losses[state.global_step - 1] = logs["loss"]

    rows = spec["rows"]
    order = spec["order"]
    if objective == "sft":
        # ids without the last token (a "\n" that is never scored), as lmforge's inputs
        data = [{"input_ids": rows[i]["ids"][:-1],
                 "labels": [t if m else -100 for t, m in zip(rows[i]["ids"][:-1],
                                                             rows[i]["mask"][:-1],
                                                             strict=True)]}
                for i in order]
    else:
        data = []
        for i in order:
            chosen, rejected = rows[i]
            start = first_scored_json(chosen)
            data.append({"prompt_ids": chosen["ids"][:start],
                         "chosen_ids": chosen["ids"][start:-1],
                         "rejected_ids": rejected["ids"][start:-1]})
    tok = AutoTokenizer.from_pretrained(spec["hf_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32)
    torch.manual_seed(spec["seed"])
    peft_config = PeftLoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                 target_modules=list(PROJECTIONS), bias="none",
                                 task_type="CAUSAL_LM")
    common = dict(output_dir=str(Path(spec["work"]) / f"trl-{objective}"),
                  max_steps=spec["timed"], per_device_train_batch_size=spec["batch_size"],
                  gradient_accumulation_steps=1, learning_rate=spec["lr"],
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                  adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=1e-8,
                  max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True,
                  gradient_checkpointing=checkpointing, max_length=spec["seq_len"],
                  padding_free=False, train_sampling_strategy="sequential", logging_steps=1,
                  save_strategy="no", report_to="none", disable_tqdm=True, seed=spec["seed"],
                  dataloader_num_workers=0)
    clock = StepClock()
    if objective == "sft":
        trainer: Any = trl.SFTTrainer(
            model=model, args=trl.SFTConfig(**common, packing=False),
            train_dataset=Dataset.from_list(data), processing_class=tok,
            peft_config=peft_config, callbacks=[clock])
    else:
        class PretokenizedDPOTrainer(trl.DPOTrainer):
            """The rows come tokenized (prompt_ids, chosen_ids, rejected_ids): TRL's own
            preparation, which tokenizes text, is skipped; its collator and step are kept."""

            def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
                return dataset

        trainer = PretokenizedDPOTrainer(
            model=model, args=trl.DPOConfig(**common, beta=DPO_BETA),
            train_dataset=Dataset.from_list(data), processing_class=tok,
            peft_config=peft_config, callbacks=[clock])
    collate = trainer.data_collator
    tokens: list[int] = []

    def counting(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(examples)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    loaded_rss = rss_now_mib()
    trainer.train()
    return {"losses": [clock.losses.get(k, float("nan")) for k in range(len(clock.ends))],
            "tokens": tokens[: len(clock.ends)], "ends": clock.ends, "rss_loaded": loaded_rss,
            "peak_rss": peak_rss_mib(), "trainable": trainable(trainer.model)}


def first_scored_json(example: dict[str, Any]) -> int:
    return example["mask"].index(1)


def run_side(args: argparse.Namespace) -> None:
    """In a fresh subprocess: one side on one spec; the result as JSON on stdout's last line."""
    import torch

    torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.spec).read_text())
    objective, who, variant = args.side.split("-")
    if who == "ours":
        result = ours(spec, objective, variant == "lora", args.profile)
    else:
        result = theirs(spec, objective, variant == "ckpt")
    print("RESULT " + json.dumps(result), flush=True)


def launch(side: str, spec: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``side`` in a fresh Python process and return its figures."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(spec.parent / "datasets-cache"),
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    command = [sys.executable, __file__, "--side", side, "--spec", str(spec),
               "--threads", str(args.threads)] + (["--profile"] if args.profile else [])
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"{side} failed (exit {done.returncode})")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["wall"] = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------- reporting


def throughput(result: dict[str, Any], warmup: int) -> float:
    """Real tokens per second over the steps after ``warmup``."""
    ends, tokens = result["ends"], result["tokens"]
    return sum(tokens[warmup:len(ends)]) / (ends[-1] - ends[warmup - 1])


def best(runs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """The run with the highest throughput, its figure added."""
    for r in runs:
        r["tok_s"] = throughput(r, warmup)
    return max(runs, key=lambda r: r["tok_s"])


def loss_gap(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest |Δ loss| over the first steps both logged."""
    pairs = list(zip(a["losses"][:LOSS_STEPS], b["losses"][:LOSS_STEPS], strict=False))
    return max(abs(x - y) for x, y in pairs) if pairs else float("nan")


def mib(x: float) -> str:
    return f"{x:,.0f}"


def comparison_table(title: str, rows: list[tuple[str, str, dict, dict]]) -> None:
    print(f"\n### {title}\n")
    print("| model | TRL variant | lmforge tok/s | TRL tok/s | speed ours/TRL | lmforge RSS "
          "load → peak (MiB) | TRL RSS load → peak (MiB) | peak ours/TRL | trainable "
          "(ours / TRL) | step-0 loss ours / TRL | max abs Δ loss, steps 0–9 |\n|"
          + "---|" * 11)
    for model, variant, o, t in rows:
        print(f"| {model} | {variant} | {o['tok_s']:,.0f} | {t['tok_s']:,.0f} | "
              f"{o['tok_s'] / t['tok_s']:.2f}× | {mib(o['rss_loaded'])} → "
              f"{mib(o['peak_rss'])} | {mib(t['rss_loaded'])} → {mib(t['peak_rss'])} | "
              f"{o['peak_rss'] / t['peak_rss']:.2f} | {o['trainable']:,} / {t['trainable']:,} "
              f"| {o['losses'][0]:.4f} / {t['losses'][0]:.4f} | {loss_gap(o, t):.1e} |")


def loss_table(rows: list[tuple[str, str, dict[str, Any]]]) -> None:
    print(f"\n### Losses of the first {LOSS_STEPS} steps (same batches, same order)\n")
    print("| model | run | " + " | ".join(str(k) for k in range(LOSS_STEPS)) + " |\n|"
          + "---|" * (LOSS_STEPS + 2))
    for model, name, r in rows:
        print(f"| {model} | {name} | "
              + " | ".join(f"{x:.4f}" for x in r["losses"][:LOSS_STEPS]) + " |")


def lora_vs_full_table(rows: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> None:
    print("\n### lmforge SFT: LoRA (rank 8) vs full fine-tuning\n")
    print("| model | method | trainable params | AdamW state (MiB) | tok/s | RSS load → peak "
          "(MiB) | training increment (MiB) |\n|" + "---|" * 7)
    for model, lora, full in rows:
        for name, r in (("LoRA", lora), ("full", full)):
            print(f"| {model} | {name} | {r['trainable']:,} | "
                  f"{r['optimizer_bytes'] / MIB:,.2f} | {r['tok_s']:,.0f} | "
                  f"{mib(r['rss_loaded'])} → {mib(r['peak_rss'])} | "
                  f"{r['peak_rss'] - r['rss_loaded']:,.0f} |")
        print(f"| {model} | LoRA / full | {lora['trainable'] / full['trainable']:.3f} | "
              f"{lora['optimizer_bytes'] / full['optimizer_bytes']:.3f} | "
              f"{lora['tok_s'] / full['tok_s']:.2f}× | "
              f"{lora['peak_rss'] / full['peak_rss']:.2f} (peak) | |")


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "runs" / "quickstart"),
                        help="the model (default: runs/quickstart)")
    parser.add_argument("--presets", nargs="*", default=["tinystories-17m"],
                        help="model shapes also measured, randomly initialised")
    parser.add_argument("--data", choices=("real", "builtin"), default="real",
                        help="real: GSM8K train (SFT), HH-RLHF (DPO); builtin: stdlib docs")
    parser.add_argument("--steps", type=int, default=20, help="timed steps, --checkpoint")
    parser.add_argument("--preset-steps", type=int, default=8, help="timed steps, --presets")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8, help="SFT rows per step")
    parser.add_argument("--dpo-batch-size", type=int, default=4,
                        help="DPO pairs per step (twice as many rows)")
    parser.add_argument("--seq-len", type=int, default=256, help="capped at the context")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per side, alternating the order; the fastest is reported")
    parser.add_argument("--trl-checkpointing", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="also run TRL with its default gradient_checkpointing=True")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=0,
                        help="MALLOC_MMAP_THRESHOLD_ of every side (0: glibc's dynamic "
                             "default); a fixed threshold hands freed activations back to the "
                             "OS, so the peak RSS follows the tensors rather than the heap")
    parser.add_argument("--profile", action="store_true",
                        help="profile lmforge's steps (torch.profiler) after the timed ones")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--work", default="", help="keep the work files here")
    parser.add_argument("--side", default="", help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args)
        return
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the clock starts at its end)")

    import peft
    import torch
    import transformers
    import trl

    work = Path(args.work or tempfile.mkdtemp(prefix="finetune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl "
          f"{trl.__version__}, peft {peft.__version__}; {args.threads} thread(s) per side, "
          f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} / {load_before[1]:.2f}; "
          f"data {args.data}, SFT batch {args.batch_size}, DPO batch {args.dpo_batch_size} "
          f"pairs, seq_len ≤ {args.seq_len}, lr {args.lr}, warm-up {args.warmup}"
          + (f", MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}"
             if args.malloc_mmap_threshold else ""), flush=True)
    variants = [("no grad ckpt", "plain")] + (
        [("grad ckpt (TRL default)", "ckpt")] if args.trl_checkpointing else [])
    sft_rows_out, dpo_rows_out, full_rows, losses, profiles = [], [], [], [], []
    started = time.perf_counter()
    for label, hf_dir, steps in export_models(args, work):
        specs = write_specs(args, work, hf_dir, steps)
        print(f"\n{label}: {steps} timed steps", flush=True)
        for objective in ("sft", "dpo"):
            sides = [f"{objective}-ours-lora"] + [f"{objective}-trl-{v}" for _, v in variants]
            if objective == "sft":
                sides.append("sft-ours-full")
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
            for repeat in range(args.repeats):
                for side in sides if repeat % 2 == 0 else sides[::-1]:
                    r = launch(side, specs[objective], args)
                    runs[side].append(r)
                    print(f"  {side} run {repeat}: {throughput(r, args.warmup):,.0f} tok/s, "
                          f"peak {r['peak_rss']:,.0f} MiB, losses "
                          f"{' '.join(f'{x:.3f}' for x in r['losses'][:4])} … "
                          f"({r['wall']:.0f} s)", flush=True)
            picked = {s: best(rs, args.warmup) for s, rs in runs.items()}
            ours_lora = picked[f"{objective}-ours-lora"]
            for s in sides[1:]:
                if "trl" in s and picked[s]["tokens"] != ours_lora["tokens"][:len(picked[s]
                                                                                  ["tokens"])]:
                    print(f"  warning: {s} saw different real-token counts per batch than "
                          "lmforge", flush=True)
            table = sft_rows_out if objective == "sft" else dpo_rows_out
            for name, v in variants:
                table.append((label, name, ours_lora, picked[f"{objective}-trl-{v}"]))
                losses.append((label, f"{objective.upper()} TRL {name}",
                               picked[f"{objective}-trl-{v}"]))
            losses.append((label, f"{objective.upper()} lmforge LoRA", ours_lora))
            if objective == "sft":
                full_rows.append((label, ours_lora, picked["sft-ours-full"]))
            for s, r in picked.items():
                if "profile" in r:
                    profiles.append((label, s, r["profile"]))
    load_after = os.getloadavg()

    comparison_table("SFT + LoRA: lmforge vs TRL SFTTrainer + PEFT", sft_rows_out)
    comparison_table("DPO + LoRA: lmforge vs TRL DPOTrainer + PEFT (reference = adapters off, "
                     f"ln 2 = {math.log(2):.4f})", dpo_rows_out)
    lora_vs_full_table(full_rows)
    loss_table(losses)
    for label, side, text in profiles:
        print(f"\n### torch.profiler, {side}, {label} ({args.profile_steps} steps)\n")
        print(text)
    print(f"\nload average before {load_before[0]:.2f} / {load_before[1]:.2f} / "
          f"{load_before[2]:.2f}, after {load_after[0]:.2f} / {load_after[1]:.2f} / "
          f"{load_after[2]:.2f}; {time.perf_counter() - started:.0f} s in all")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
