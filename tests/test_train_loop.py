"""The shared training loop: any model, optimizer, batches and loss; frozen parameters stay
put; an optimizer restored from a checkpoint equals the saved one; a small validation split is
used, not refused; SIGTERM saves a checkpoint and the resumed curve equals the uninterrupted one;
a damaged latest checkpoint is passed over on resume; progress is plain lines in logs."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge.data.loader import TokenLoader
from lmforge.errors import TrainingInterrupted
from lmforge.model import ModelConfig, Transformer
from lmforge.progress import progress_bar
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import LoopConfig, TrainConfig
from lmforge.train.distributed import full_state, init_distributed, load_full_state
from lmforge.train.loop import RunInfo, fit, optimizer_for, place
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import train

from .conftest import prepare_tiny_data, synthetic_documents

TINY = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "context": 32}


class Repeating:
    """A batch source of one fixed (x, y) pair: enough for a loop test."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.step = x, y, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.step += 1
        return self.x, self.y

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_tiny_data(tmp_path_factory.mktemp("loop_data"), 400, seed=5, val_fraction=0.2)


def test_fit_trains_any_objective_and_leaves_frozen_parameters_alone(tmp_path) -> None:
    tok = Tokenizer.train(synthetic_documents(30), 300, workers=1, show_progress=False)
    config = ModelConfig(vocab_size=320, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                         context=16)
    torch.manual_seed(0)
    loop = LoopConfig(out=str(tmp_path / "run"), max_steps=12, warmup_steps=2, lr=1e-2,
                      save_every=6, eval_every=6, progress=False, dtype="fp32")
    env = init_distributed("cpu")
    model = place(Transformer(config), loop, env)
    model.embed_tokens.weight.requires_grad_(False)  # frozen: not in the optimizer
    frozen = model.embed_tokens.weight.detach().clone()
    before = model.layers[0].mlp.up_proj.weight.detach().clone()
    optimizer = optimizer_for(model, loop)
    assert all(p.requires_grad for g in optimizer.param_groups for p in g["params"])
    x = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    # another objective: predict the token itself (not the next), on a masked half of the row
    targets = x.clone()
    targets[:, :8] = -100

    def copy_loss(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, y = batch
        return torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), y.flatten(),
                                                 ignore_index=-100)

    summary = fit(model, optimizer, Repeating(x, targets), copy_loss, loop, env,
                  RunInfo({"objective": "copy"}, config, tok), batch_size=4, seq_len=16)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
              if "event" not in r]
    assert summary["step"] == 12 and losses[-1] < losses[0]
    assert torch.equal(model.embed_tokens.weight, frozen)
    assert not torch.equal(model.layers[0].mlp.up_proj.weight, before)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"] == {"objective": "copy"} and saved["model"]["vocab_size"] == 320


def test_optimizer_state_round_trips_exactly() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4,
                                    n_kv_heads=2, context=16))
    loop = LoopConfig(progress=False)
    optimizer = optimizer_for(model, loop)
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model_state, optim_state = full_state(model, optimizer)
    fresh = optimizer_for(model, loop)
    load_full_state(model, fresh, model_state, optim_state)
    assert fresh.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert isinstance(fresh.param_groups[0]["betas"], tuple)
    assert [{k: v for k, v in g.items() if k != "params"} for g in fresh.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def test_a_validation_split_smaller_than_a_batch_is_used(tmp_path, caplog, monkeypatch) -> None:
    import lmforge.data.process as process

    chosen: list[str] = []  # exactly one document held out (the split hashes tmp paths)

    def one_document(name: str, fraction: float) -> bool:
        chosen[:] = chosen or [name]
        return name == chosen[0]

    monkeypatch.setattr(process, "is_validation", one_document)
    data = prepare_tiny_data(tmp_path, 60, seed=3, val_fraction=0.05)
    val_tokens = sum(s["tokens"] for s in json.loads((data / "manifest.json").read_text())
                     ["shards"] if s["split"] == "val")
    assert 1 < val_tokens < 16 * 32  # smaller than one default batch of the tiny context
    summary = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), model=TINY,
                                max_steps=3, eval_every=3, sample_tokens=0, progress=False))
    assert summary["val_bpb"] > 0
    assert "the validation split has only" in caplog.text


def _loop_config(data_dir: Path, out: Path, **kw) -> TrainConfig:
    values = dict(data=str(data_dir), out=str(out), model=TINY, batch_size=4, max_steps=16,
                  lr=3e-3, warmup_steps=3, eval_every=8, eval_batches=2, save_every=4,
                  keep_last=10, sample_tokens=4, progress=False, log_every=1)
    return TrainConfig(**{**values, **kw})


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "event" not in r}


def test_sigterm_saves_the_current_step_and_resume_is_bit_exact(data_dir, tmp_path,
                                                                monkeypatch) -> None:
    train(_loop_config(data_dir, tmp_path / "straight"))
    calls = {"n": 0}
    next_batch = TokenLoader.next_batch

    def preempted_at_the_seventh_batch(self):
        if self.mode == "random":
            calls["n"] += 1
            if calls["n"] == 7:  # mid-run, between checkpoints (every 4 steps)
                os.kill(os.getpid(), signal.SIGTERM)
        return next_batch(self)

    monkeypatch.setattr(TokenLoader, "next_batch", preempted_at_the_seventh_batch)
    with pytest.raises(TrainingInterrupted, match="SIGTERM: saved a checkpoint at step 7"):
        train(_loop_config(data_dir, tmp_path / "resumed"))
    monkeypatch.setattr(TokenLoader, "next_batch", next_batch)
    assert (tmp_path / "resumed" / "checkpoints" / "step_0000007.pt").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    train(_loop_config(data_dir, tmp_path / "resumed", resume=True))
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")  # bit for bit


def test_resume_passes_over_a_damaged_latest_checkpoint(data_dir, tmp_path, caplog) -> None:
    run = tmp_path / "run"
    train(_loop_config(data_dir, run, max_steps=8))
    (run / "checkpoints" / "step_0000008.pt").write_bytes(b"truncated")
    summary = train(_loop_config(data_dir, run, max_steps=12, resume=True))
    assert summary["step"] == 12
    assert "step_0000008.pt" in caplog.text and "step_0000004.pt" in caplog.text


def test_progress_is_plain_lines_when_not_a_terminal(capsys) -> None:
    with progress_bar(total=10_000, desc="work") as bar:
        for _ in range(10_000):
            bar.update()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("work: 100%")


def test_training_progress_in_a_log_is_a_few_plain_lines(data_dir, tmp_path, capsys) -> None:
    train(_loop_config(data_dir, tmp_path / "run", progress=True, log_every=1))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train:")]
    assert "\r" not in err and 1 <= len(lines) <= 3, lines  # not one line per step
