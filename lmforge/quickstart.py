"""The end-to-end quickstart on the built-in offline corpus (``make quickstart``).

Stage by stage: it trains a tokenizer on the training split of the built-in corpus (checking it is
lossless on the validation split, measuring its compression there, and exporting it in Hugging
Face and tiktoken formats), runs the data pipeline (filters, dedup, tokenization) into token
shards, then pretrains the ``tiny-cpu`` model and reports its validation bits per byte next to the
unigram baseline, with samples; evaluates it (bpb, and MMLU/GSM8K/HumanEval on a few questions
when ``task_data`` is given) and writes its report card. About 13 minutes on 2 CPU cores. With
``chat``, it then fine-tunes a chat model from it (SFT, then DPO: :mod:`lmforge.finetune.chain`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge import load
from lmforge.config import check_at_least, option, to_dict
from lmforge.data.builtin import is_validation
from lmforge.data.pipeline import DataConfig, prepare
from lmforge.data.sources import documents
from lmforge.errors import ConfigError
from lmforge.eval import EvalConfig, evaluate
from lmforge.eval.run import table
from lmforge.files import atomic_write_text
from lmforge.finetune.chain import chat_chain
from lmforge.inference import SamplingParams, generate
from lmforge.report import ReportConfig, write_report
from lmforge.rundir import RunDir
from lmforge.tokenizer import ENDOFTEXT
from lmforge.tokenizer.stage import (
    TokenizerTrainConfig,
    describe,
    export_tokenizer,
    train_tokenizer,
)
from lmforge.train.config import TrainConfig
from lmforge.train.pretrain import train


@dataclass
class QuickstartConfig:
    """What ``lmforge quickstart`` runs on and where it writes."""

    out_dir: str = option("runs/quickstart", "run directory for everything the quickstart makes")
    corpus: list[str] = option(["builtin:python-docs", "builtin:python-src"],
                               "input SPECs (the built-in corpora need no network)")
    vocab_size: int = option(8192, "tokenizer vocabulary size")
    preset: str = option("code", "quality filter preset (the built-in corpus is code and docs)")
    model: str = option("tiny-cpu", "model preset to pretrain")
    steps: int = option(1200, "training steps")
    batch_size: int = option(16, "sequences per training step")
    seq_len: int = option(256, "tokens per sequence")
    time_budget_minutes: float = option(11.0, "stop training early after this long")
    val_fraction: float = option(0.05, "share of documents held out for validation (by name hash)")
    task_data: str = option("", "MMLU/GSM8K/HumanEval data to evaluate on (the layout of "
                                "../shared/data, or `hub`); none: bpb only")
    eval_limit: int = option(50, "questions per benchmark task (the trained model is tiny: "
                                 "a taste, not a score)")
    chat: bool = option(False, "then fine-tune a chat model: SFT on the built-in docstring "
                               "conversations, DPO on their preference pairs, with held-out "
                               "before/after figures and a few replies")
    chat_steps: int = option(300, "SFT steps of --chat (DPO: half as many)")
    chat_minutes: float = option(4.0, "time budget of each fine-tuning stage (--chat)")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        check_at_least(self, 1, "eval_limit", "chat_steps")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction: expected a value in (0, 0.5), "
                              f"got {self.val_fraction}")
        if not self.corpus:
            raise ConfigError("corpus: give at least one input SPEC")


def quickstart(config: QuickstartConfig) -> dict:
    """Run the pipeline; returns (and writes to ``out_dir/quickstart.json``) its figures."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = 7 if config.chat else 6
    atomic_write_text(out / "config.json", json.dumps(to_dict(config), indent=2))

    print(f"[1/{stages}] reading {' + '.join(config.corpus)}")
    train_docs, val_docs = [], []
    for spec in config.corpus:
        for doc in documents(spec):
            (val_docs if is_validation(doc.name, config.val_fraction) else train_docs).append(
                doc.text)
    mb = sum(len(t.encode()) for t in train_docs) / 1e6
    print(f"      {len(train_docs)} training documents ({mb:.1f} MB), {len(val_docs)} "
          "validation documents")

    print(f"[2/{stages}] training a byte-level BPE tokenizer, vocabulary {config.vocab_size}")
    tok_config = TokenizerTrainConfig(input=config.corpus, vocab_size=config.vocab_size,
                                      out=str(out / "tokenizer.lmforge.json"),
                                      progress=config.progress, force=True)
    tok, summary = train_tokenizer(tok_config, corpus=train_docs)
    lossless = all(tok.decode(tok.encode(t)) == t for t in val_docs)
    stats = describe(tok, val_docs)
    # a rerun writes the same files again: the quickstart owns its out_dir
    exported = (export_tokenizer(tok, "hf", out / "hf", force=True)
                + export_tokenizer(tok, "tiktoken", out / "tiktoken", force=True))
    report = {"tokenizer": summary["tokenizer"], "train_seconds": summary["train_seconds"],
              "train_mb": round(mb, 2), "validation_lossless": lossless, **stats,
              "exported": [str(p) for p in exported]}
    atomic_write_text(out / "quickstart.json", json.dumps(report, indent=2, ensure_ascii=False))

    example = "def greet(name):\n    return f'Hello, {name}!'  # café ☕"
    ids = tok.encode(example)
    pieces = [tok.decode_bytes([i]).decode("utf-8", errors="backslashreplace") for i in ids]
    print(f"      trained in {summary['train_seconds']:.1f} s: {stats['vocab_size']} tokens "
          f"({stats['merges']} merges, {len(stats['special_tokens'])} special)")
    print(f"      validation: {stats['bytes_per_token']} bytes/token over "
          f"{stats['sample_bytes'] / 1e6:.2f} MB, round trip lossless: {lossless}")
    print(f"      longest tokens: {stats['longest_tokens'][:3]}")
    print(f"      example: {example!r}\n        → {len(ids)} tokens {pieces}")

    print(f"[3/{stages}] data pipeline: filters, exact + MinHash dedup, tokenization, shards")
    manifest = prepare(DataConfig(input=config.corpus, tokenizer=summary["tokenizer"],
                                  out=str(out / "data"), preset=config.preset,
                                  val_fraction=config.val_fraction, progress=config.progress))
    stats = manifest["stats"]
    report["data"] = {k: manifest[k] for k in ("num_tokens", "num_documents", "splits")}
    report["data"]["stats"] = stats
    atomic_write_text(out / "quickstart.json", json.dumps(report, indent=2, ensure_ascii=False))
    splits = manifest["splits"]
    print(f"      {stats['input']['documents']} documents read; filters dropped "
          f"{sum(stats['filters'].values())} {dict(stats['filters'])}; dedup removed "
          f"{stats['dedup']['exact']} exact + {stats['dedup']['near']} near duplicates")
    print(f"      train: {splits['train']['tokens']:,} tokens in {splits['train']['documents']} "
          f"documents; val: {splits.get('val', {}).get('tokens', 0):,} tokens "
          f"({len(manifest['shards'])} shards, {manifest['dtype']})")

    resume = RunDir(out / "train").checkpoints.exists()
    print(f"[4/{stages}] pretraining {config.model} for {config.steps} steps "
          f"(time budget {config.time_budget_minutes:g} min)")
    if resume:
        print(f"      {out}/train holds an earlier run: continuing it from its latest "
              f"checkpoint (delete {out}/train, or pass another --out-dir, to start afresh)")
    result = train(TrainConfig(data=str(out / "data"), out=str(out / "train"),
                               preset=config.model,
                               batch_size=config.batch_size, seq_len=config.seq_len,
                               max_steps=config.steps, lr=3e-3, warmup_steps=config.steps // 10,
                               eval_every=max(1, config.steps // 4), eval_batches=20,
                               save_every=max(1, config.steps // 4),
                               time_budget_minutes=config.time_budget_minutes,
                               progress=config.progress, resume=resume))
    report["train"] = result
    atomic_write_text(out / "quickstart.json", json.dumps(report, indent=2, ensure_ascii=False))
    model, tok = load(str(out / "train"))
    g = torch.Generator().manual_seed(0)
    print("      samples:")
    for prompt in ("def ", "The "):
        new = list(generate(model, tok.encode(prompt), SamplingParams(max_new_tokens=60),
                            generator=g, stop_ids=(tok.token_id(ENDOFTEXT),),
                            vocab_size=tok.vocab_size))
        print("      | " + (prompt + tok.decode(new)).replace("\n", "\n      | "))

    tasks = ["bpb"]
    if config.task_data:
        tasks += ["mmlu", "gsm8k", "humaneval"]
    print(f"[5/{stages}] evaluating: {', '.join(tasks)}"
          + (f" (first {config.eval_limit} questions each)" if config.task_data else ""))
    if not config.task_data:
        print("      no --task-data: benchmarks skipped. Give a directory in the layout of "
              "../shared/data (mmlu/, gsm8k/, humaneval/) or `--task-data hub` to download "
              "them; see docs/evaluation.md")
    evaluation = evaluate(EvalConfig(checkpoint=str(out / "train"), tasks=tasks,
                                     task_data=config.task_data, limit=config.eval_limit,
                                     progress=config.progress, force=True))
    report["eval"] = {name: r["metrics"] for name, r in evaluation["tasks"].items()}
    atomic_write_text(out / "quickstart.json", json.dumps(report, indent=2, ensure_ascii=False))
    for line in table(evaluation).splitlines():
        print("      " + line)

    print(f"[6/{stages}] writing the report card")
    pages = write_report(ReportConfig(run=str(out / "train")))
    print(f"      {pages[0]}\n      {pages[1]}")
    if config.chat:
        print(f"[7/{stages}] fine-tuning a chat model: SFT then DPO (≤ {config.chat_minutes:g} "
              "min each), measured on held-out functions")
        report["chat"] = chat_chain(out / "train", out, config.chat_minutes, config.progress,
                                    config.chat_steps)
        atomic_write_text(out / "quickstart.json",
                          json.dumps(report, indent=2, ensure_ascii=False))
        print("      chat with the DPO model (held-out questions):")
        for turn in report["chat"]["dpo"]["replies"]:
            print(f"      > {turn['user']}\n      {turn['assistant']!r}")
        print(f"      talk to it: lmforge chat --checkpoint {out}/dpo")
    print(f"done: {out}/ (tokenizer, data/, train/ with checkpoints, metrics.jsonl, loss.png, "
          "eval/, report.html" + (", sft/, dpo/" if config.chat else "") + ")")
    print(f"trained {result['step']} steps ({result['params'] / 1e6:.1f}M parameters)"
          + (" — stopped by the time budget" if result["stopped_by_time_budget"] else ""))
    print(f"final validation bpb: {result['val_bpb']:.3f}   "
          f"unigram baseline bpb: {result['unigram_bpb']:.3f}")
    return report
