"""``lmforge train``: the pretraining loop, in one visible ``while``.

    set LR → evaluate / sample / checkpoint → micro-steps (forward, backward) → clip
           → spike verdict (step, skip, or roll back) → log

The same function runs alone or under ``torchrun`` (DDP or FSDP2 applied from outside the model).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lmforge.config import build, to_dict
from lmforge.data.loader import TokenLoader
from lmforge.data.manifest import load_manifest
from lmforge.errors import ConfigError, LmforgeError
from lmforge.files import atomic_write_text
from lmforge.generate import sample
from lmforge.hardware import resolve_dtype
from lmforge.model import ModelConfig, Transformer
from lmforge.progress import progress_bar
from lmforge.tokenizer import ENDOFTEXT, Tokenizer
from lmforge.train.checkpoint import (
    TOKENIZER_FILE,
    Checkpoints,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import (
    DistEnv,
    all_reduce_mean,
    full_state,
    init_distributed,
    load_full_state,
    parallelize,
    shutdown_distributed,
    unwrap,
)
from lmforge.train.metrics import MetricsLog, plot_loss_curve, read_metrics
from lmforge.train.optim import build_optimizer, lr_at
from lmforge.train.spikes import SpikeConfig, SpikeDetector
from lmforge.train.validation import Validator, token_bytes, unigram_bpb

# Known dense bf16 peaks (FLOP/s) for MFU: NVIDIA H100/H200 SXM datasheets, A100 datasheet.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class TrainingError(LmforgeError):
    """Training cannot go on (e.g. loss spikes keep coming back after every rollback)."""


def _peak_flops(config: TrainConfig, env: DistEnv) -> float:
    if config.peak_flops:
        return config.peak_flops
    if env.device.type == "cuda":
        name = torch.cuda.get_device_name(env.device)
        return next((v for k, v in PEAK_BF16.items() if k in name), 0.0)
    return 0.0


def _autocast(config: TrainConfig, env: DistEnv) -> contextlib.AbstractContextManager:
    if resolve_dtype(config.dtype, env.device) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=env.device.type, dtype=torch.bfloat16)


def _corrupt(x: torch.Tensor, vocab: int, data_step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly random tokens: a batch no model can predict (loss ≈ ln vocab)."""
    g = torch.Generator().manual_seed(data_step)
    noise = torch.randint(0, vocab, (x.shape[0], x.shape[1] + 1), generator=g).to(x.device)
    return noise[:, :-1], noise[:, 1:]


class _Run:
    """The state a checkpoint holds and a rollback restores, around the model and optimizer."""

    def __init__(self, config: TrainConfig, env: DistEnv) -> None:
        self.config, self.env = config, env
        self.out = Path(config.out)
        manifest = load_manifest(config.data)
        tok_path = Path(manifest["tokenizer"]["path"])
        self.tokenizer = Tokenizer.load(tok_path)
        if self.tokenizer.fingerprint != manifest["tokenizer"]["fingerprint"]:
            raise ConfigError(f"{tok_path}: tokenizer changed since {config.data} was prepared")
        overrides = {"vocab_size": self.tokenizer.vocab_size, **config.model}
        self.model_config = ModelConfig.from_preset(config.preset, **overrides)
        if self.model_config.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size {self.model_config.vocab_size} is smaller than "
                              f"the tokenizer's {self.tokenizer.vocab_size}")
        self.seq_len = config.seq_len or self.model_config.context
        if self.seq_len > self.model_config.context:
            raise ConfigError(f"seq_len: {self.seq_len} exceeds the model context "
                              f"{self.model_config.context}")

        torch.manual_seed(config.seed)
        model = Transformer(self.model_config).to(env.device)
        self.model = parallelize(model, config.parallel, env)
        self.compiled = torch.compile(self.model) if config.compile else self.model
        self.optimizer = build_optimizer(unwrap(self.model), config.lr, config.weight_decay,
                                         (config.beta1, config.beta2), config.decay_embeddings)
        self.loader = TokenLoader(config.data, "train", config.batch_size, self.seq_len,
                                  config.loader_mode, config.seed, env.rank, env.world_size,
                                  env.device)
        self.detector = SpikeDetector(build(SpikeConfig, ("spike", config.spike)))
        self.checkpoints = Checkpoints(self.out, config.keep_last)
        self.step = 0
        self.cooldown_until = 0
        self.rollbacks = 0
        self.best_val: float | None = None

    def state(self, val_loss: float | None) -> dict[str, Any]:
        model_state, optim_state = full_state(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optim_state, "step": self.step,
                "loader": self.loader.state_dict(), "detector": self.detector.state_dict(),
                "rng": rng_state(), "cooldown_until": self.cooldown_until,
                "rollbacks": self.rollbacks, "val_loss": val_loss,
                "config": to_dict(self.config), "model_config": asdict(self.model_config),
                "tokenizer_fingerprint": self.tokenizer.fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        if state["tokenizer_fingerprint"] != self.tokenizer.fingerprint:
            raise ConfigError("checkpoint was trained with a different tokenizer than the data's")
        if state["model_config"] != asdict(self.model_config):
            raise ConfigError("checkpoint's model config differs from this run's; resume with "
                              "the same preset and model overrides")
        load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        self.detector.load_state_dict(state["detector"])
        set_rng_state(state["rng"])
        self.cooldown_until = state["cooldown_until"]
        self.rollbacks = state["rollbacks"]


def _prepare_run_dir(run: _Run, resume: bool) -> None:
    out = run.out
    if not resume and run.checkpoints.entries():
        raise ConfigError(f"out: {out} already holds a run; pass --resume to continue it or "
                          "choose another directory")
    if not run.env.is_main:
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(
        {"train": to_dict(run.config), "model": asdict(run.model_config)}, indent=2))
    run.tokenizer.save(out / TOKENIZER_FILE)
    metrics = out / "metrics.jsonl"
    if resume and metrics.exists():  # drop what the interrupted run logged past the checkpoint
        kept = [r for r in read_metrics(metrics) if r["step"] < run.step]
        atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in kept))


def train(config: TrainConfig) -> dict[str, Any]:
    """Train; returns the final figures (also the last line of ``metrics.jsonl``)."""
    env = init_distributed(config.device)
    try:
        return _train(config, env)
    finally:
        shutdown_distributed(env)


def _train(config: TrainConfig, env: DistEnv) -> dict[str, Any]:
    run = _Run(config, env)
    if config.resume:
        latest = run.checkpoints.latest()
        if latest is None:
            raise ConfigError(f"resume: {run.out} has no checkpoint to resume")
        run.restore(load_checkpoint(latest))
    _prepare_run_dir(run, config.resume)
    start_step = run.step

    sizes = token_bytes(run.tokenizer)
    validator = Validator(config.data, sizes, config.batch_size, run.seq_len,
                          config.eval_batches, env.device)
    baseline = unigram_bpb(config.data, sizes)
    log = MetricsLog(run.out, config.tensorboard) if env.is_main else None
    autocast = _autocast(config, env)
    peak = _peak_flops(config, env)
    tokens_per_step = config.batch_size * run.seq_len * config.grad_accum * env.world_size
    flops_per_token = run.model_config.flops_per_token(run.seq_len)
    eot = run.tokenizer.token_id(ENDOFTEXT)
    spike_cfg = run.detector.config
    val: dict[str, float] = {}

    def emit(record: dict[str, Any]) -> None:
        if log is not None:
            log.write(record)

    bar = progress_bar(config.progress and env.is_main, total=config.max_steps,
                       initial=run.step, desc="train", unit="step")
    started = time.perf_counter()
    budget = config.time_budget_minutes * 60
    while True:
        step = run.step
        lr_scale = spike_cfg.lr_factor if step < run.cooldown_until else 1.0
        lr = lr_at(step, config.lr, config.warmup_steps, config.max_steps,
                   config.min_lr_ratio) * lr_scale
        for group in run.optimizer.param_groups:
            group["lr"] = lr

        out_of_time = False
        if budget > 0:  # every rank stops together (no collective when there is no budget)
            out_of_time = time.perf_counter() - started > budget
            out_of_time = all_reduce_mean(float(out_of_time), env) > 0
        last = step == config.max_steps or out_of_time
        if step % config.eval_every == 0 or last:
            val = validator.run(run.compiled, autocast)
            emit({"step": step, "event": "eval", **val, "unigram_bpb": baseline})
            if config.sample_tokens:  # every rank: an FSDP forward gathers from all of them
                g = torch.Generator().manual_seed(config.seed + step)
                new = sample(unwrap(run.model), run.tokenizer.encode(config.sample_prompt),
                             config.sample_tokens, generator=g, stop=(eot,))
                text = config.sample_prompt + run.tokenizer.decode(new)
                emit({"step": step, "event": "sample", "text": text})
                if env.is_main:
                    with open(run.out / "samples.txt", "a", encoding="utf-8") as f:
                        f.write(f"--- step {step}\n{text}\n")
        if (step % config.save_every == 0 or last) and step != start_step:
            state = run.state(val.get("val_loss"))
            if env.is_main:
                run.checkpoints.save(state, step, val.get("val_loss"), run.detector.healthy)
        if last:
            break

        t0 = time.perf_counter()
        # summed on the device in float64 (as exact as Python floats): one host sync per step,
        # not one per micro-step
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        for micro in range(config.grad_accum):
            x, y = run.loader.next_batch()
            data_step = run.loader.step - 1
            if 0 <= config.inject_spike_at <= data_step < (config.inject_spike_at
                                                           + config.inject_spike_length):
                x, y = _corrupt(x, run.tokenizer.vocab_size, data_step)
            # DDP: all-reduce gradients only on the last micro-step.
            sync = (run.model.no_sync() if hasattr(run.model, "no_sync")
                    and micro < config.grad_accum - 1 else contextlib.nullcontext())
            with sync, autocast:
                loss = run.compiled(x, y) / config.grad_accum
            with sync:
                loss.backward()
            loss_sum += loss.detach()
        loss_avg = all_reduce_mean(loss_sum.item(), env)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            run.model.parameters(), config.grad_clip or float("inf")).item()

        verdict = run.detector.check(loss_avg, grad_norm)
        if verdict == "ok":
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        if verdict == "skip":
            emit({"step": step, "event": "skip", "loss": loss_avg, "grad_norm": grad_norm})
        elif verdict == "rollback":
            _roll_back(run, step, emit)
            bar.n = run.step
            continue

        run.step += 1
        dt = time.perf_counter() - t0
        tps = tokens_per_step / dt
        record = {"step": step, "loss": loss_avg, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tps}
        if peak:
            record["mfu"] = flops_per_token * tps / (peak * env.world_size)
        emit(record)
        bar.update(1)
        if step % config.log_every == 0:
            bar.set_postfix(loss=f"{loss_avg:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                            **({"mfu": f"{record['mfu']:.1%}"} if peak else {}))
    bar.close()
    summary = {"step": run.step, **val, "unigram_bpb": baseline,
               "params": run.model_config.num_params(), "rollbacks": run.rollbacks,
               "stopped_by_time_budget": run.step < config.max_steps}
    emit({"step": run.step, "event": "done", **summary})
    if log is not None:
        log.close()
        plot_loss_curve(run.out, baseline)
    return summary


def _roll_back(run: _Run, step: int, emit: Any) -> None:
    """Restore the latest clean checkpoint, skip the data read since, lower the LR a while."""
    cfg = run.detector.config
    if run.rollbacks >= cfg.max_rollbacks:
        raise TrainingError(f"loss spikes persisted through {cfg.max_rollbacks} rollbacks "
                            f"(step {step}); lower the learning rate or inspect the data near "
                            f"data step {run.loader.step}")
    target = run.checkpoints.latest(clean_only=True)
    if target is None:
        raise TrainingError(f"sustained loss spike at step {step} and no clean checkpoint to "
                            "roll back to; save checkpoints more often (--save-every)")
    data_position = run.loader.step
    rollbacks = run.rollbacks + 1
    run.restore(load_checkpoint(target))
    skipped = data_position - run.loader.step
    run.loader.step = data_position  # the batches since the checkpoint are not seen again
    run.rollbacks = rollbacks
    run.cooldown_until = run.step + cfg.cooldown_steps
    emit({"step": step, "event": "rollback", "to_step": run.step, "checkpoint": target.name,
          "skipped_batches": skipped, "lr_factor": cfg.lr_factor,
          "until_step": run.cooldown_until})

