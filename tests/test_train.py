"""Pretraining: exact resume, spike rollback, DDP equivalence, checkpoints and configs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.data.loader import TokenLoader
from lmforge.errors import ConfigError, InputError
from lmforge.train.checkpoint import load_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.loop import TrainingError
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import lr_at
from lmforge.train.pretrain import train

from .conftest import prepare_tiny_data

TINY = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "context": 32}
# A tiny model's early loss falls fast and its gradient norm jumps on ordinary batches: a short
# window, a lower loss bar and no gradient-norm bar keep ordinary steps from counting as spikes.
SPIKE = {"window": 10, "min_history": 5, "z_threshold": 4.0, "grad_z_threshold": 0,
         "sustained": 3, "cooldown_steps": 5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_tiny_data(tmp_path_factory.mktemp("train_data"), 400, seed=5,
                             val_fraction=0.2)


def config(data_dir: Path, out: Path, **kw) -> TrainConfig:
    values = dict(data=str(data_dir), out=str(out), model=TINY, batch_size=4, max_steps=16,
                  lr=3e-3, warmup_steps=3, eval_every=8, eval_batches=2, save_every=4,
                  keep_last=10, sample_tokens=4, progress=False, log_every=1)
    values.update(kw)
    return TrainConfig(**values)


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "event" not in r}


def test_training_learns_and_writes_a_run_directory(data_dir, tmp_path, capsys):
    summary = train(config(data_dir, tmp_path / "run", max_steps=40, eval_every=20))
    run = tmp_path / "run"
    losses = step_losses(run)
    assert sorted(losses) == list(range(40))
    assert losses[39] < losses[0] - 1.0
    assert summary["val_bpb"] < summary["unigram_bpb"]
    for name in ("config.json", "metrics.jsonl", "loss.png", "samples.txt",
                 "tokenizer.lmforge.json", "checkpoints/index.json"):
        assert (run / name).is_file(), name
    record = next(r for r in read_metrics(run / "metrics.jsonl") if "event" not in r)
    assert set(record) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s"}

    model, tok = lmforge.load(str(run))
    ids = torch.tensor([tok.encode("the model")])
    assert model(ids).shape == (1, ids.shape[1], model.config.vocab_size)

    assert main(["generate", "--checkpoint", str(run), "--prompt", "the model",
                 "--max-new-tokens", "5", "--num-samples", "2"]) == 0
    printed = capsys.readouterr().out.split("---\n")
    assert len(printed) == 3 and all(p.startswith("the model") for p in printed[:2])
    assert main(["generate", "--checkpoint", str(tmp_path / "none")]) == 2
    assert main(["export", "hf", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    exported, _ = lmforge.load(str(tmp_path / "hf"))
    assert torch.allclose(exported(ids), model(ids), atol=1e-6)
    assert main(["export", "gguf", "--checkpoint", str(run), "--out",
                 str(tmp_path / "m.gguf")]) == 0
    assert (tmp_path / "m.gguf").stat().st_size > 4 * model.config.num_params()


def test_resume_is_bit_exact(data_dir, tmp_path, monkeypatch):
    train(config(data_dir, tmp_path / "straight"))
    calls = {"n": 0}
    next_batch = TokenLoader.next_batch

    def crash_at_the_eleventh_training_batch(self):
        if self.mode == "random":  # the training loader (validation reads sequentially)
            calls["n"] += 1
            if calls["n"] == 11:
                raise KeyboardInterrupt
        return next_batch(self)

    monkeypatch.setattr(TokenLoader, "next_batch", crash_at_the_eleventh_training_batch)
    with pytest.raises(KeyboardInterrupt):
        train(config(data_dir, tmp_path / "resumed"))
    monkeypatch.setattr(TokenLoader, "next_batch", next_batch)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(config(data_dir, tmp_path / "resumed"))
    train(config(data_dir, tmp_path / "resumed", resume=True))
    assert step_losses(tmp_path / "resumed") == step_losses(tmp_path / "straight")  # bit for bit


def test_injected_spike_rolls_back_and_recovers(data_dir, tmp_path):
    # What must hold whatever the thread count and summation order: the spike is caught where
    # it starts, rolled back to a clean checkpoint from before it, every corrupted batch is
    # skipped for good, no training step is lost, and the loss comes back.
    run = tmp_path / "spiky"
    start, length, save_every = 14, 3, 5
    cfg = config(data_dir, run, max_steps=30, save_every=save_every, inject_spike_at=start,
                 inject_spike_length=length, spike=SPIKE, dtype="fp32")
    train(cfg)
    records = read_metrics(run / "metrics.jsonl")
    events = [(r["event"], r["step"]) for r in records if r.get("event") in ("skip", "rollback")]
    assert events and events[0][1] == start, events  # caught at the first corrupted batch
    rollbacks = [r for r in records if r.get("event") == "rollback"]
    assert rollbacks, events
    first = rollbacks[0]
    assert first["to_step"] <= start and first["to_step"] % save_every == 0  # clean, before it
    assert first["skipped_batches"] >= length  # the corrupted batches are not seen again
    losses = step_losses(run)
    assert sorted(losses) == list(range(30))  # every step trained once, after the rollback
    assert max(losses[s] for s in range(25, 30)) < 1.5 * losses[start - 1]  # recovered
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    back, after = first["to_step"] + 1, first["until_step"] + 1
    scheduled = {s: lr_at(s, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
                 for s in (back, after)}
    # lowered by lr_factor (0.5) for cooldown_steps (5) after the rollback, then back
    assert first["until_step"] == first["to_step"] + SPIKE["cooldown_steps"]
    assert lrs[back] == pytest.approx(0.5 * scheduled[back])
    assert lrs[after] == pytest.approx(scheduled[after])


def test_spikes_that_keep_coming_give_up_clearly(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path / "doomed", max_steps=40, save_every=5, inject_spike_at=12,
                 inject_spike_length=100, spike={**SPIKE, "max_rollbacks": 2}, dtype="fp32")
    with pytest.raises(TrainingError, match="persisted through 2 rollbacks"):
        train(cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_data_parallel_on_two_cpu_processes_matches_one_process(data_dir, tmp_path, strategy):
    # fp32: a sharp comparison (bf16 rounding would amplify the different summation order).
    single = config(data_dir, tmp_path / "single", max_steps=6, grad_accum=2, sample_tokens=0,
                    dtype="fp32")
    train(single)
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "-m", "lmforge.cli", "train", "--data", str(data_dir), "--out", str(tmp_path / "dp"),
            "--model", json.dumps(TINY), "--batch-size", "4", "--max-steps", "6",
            "--lr", "3e-3", "--warmup-steps", "3", "--eval-every", "8", "--eval-batches", "2",
            "--save-every", "4", "--sample-tokens", "2", "--no-progress", "--parallel", strategy,
            "--dtype", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = step_losses(tmp_path / "single"), step_losses(tmp_path / "dp")
    assert sorted(a) == sorted(b) == list(range(6))
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-5)


def test_bad_checkpoints_and_configs(data_dir, tmp_path):
    with pytest.raises(InputError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip archive at all")
    with pytest.raises(InputError, match=r"junk\.pt: unreadable checkpoint"):
        load_checkpoint(junk)
    with pytest.raises(ConfigError, match="has no checkpoint to resume"):
        train(config(data_dir, tmp_path / "fresh", resume=True))
    with pytest.raises(ConfigError, match="preset: 'huge' is not one of"):
        TrainConfig(data="d", preset="huge")
    with pytest.raises(ConfigError, match="grad_accum: must be >= 1"):
        TrainConfig(data="d", grad_accum=0)
    with pytest.raises(ConfigError, match="seq_len: 64 exceeds the model context 32"):
        train(config(data_dir, tmp_path / "long", seq_len=64))
    with pytest.raises(InputError, match="neither a run directory"):
        lmforge.load(str(tmp_path))
