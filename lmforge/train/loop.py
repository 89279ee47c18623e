"""The training loop, one for every objective, in one visible ``while``.

    set LR → evaluate / sample / checkpoint → micro-steps (forward, backward) → clip
           → spike verdict (step, skip, or roll back) → log

:func:`fit` takes a built model, its optimizer, a source of batches and a loss function; what it
adds is the same for pretraining and every fine-tuning method: the warmup + cosine schedule,
gradient accumulation, bf16 autocast, clipping, loss-spike skip/rollback, atomic checkpoints with
bit-exact resume, metrics and plots, a time budget, and a clean stop on Ctrl-C or SIGTERM (a
checkpoint at the current step). It runs alone or under ``torchrun``: the builder applies DDP or
FSDP2 from outside the model with :func:`place` before it builds the optimizer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lmforge.config import build
from lmforge.errors import ConfigError, InputError, LmforgeError, TrainingInterrupted
from lmforge.files import atomic_write_text
from lmforge.hardware import resolve_dtype
from lmforge.model import ModelConfig
from lmforge.progress import progress_bar
from lmforge.rundir import RunDir
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import Checkpoints, load_checkpoint, rng_state, set_rng_state
from lmforge.train.config import LoopConfig
from lmforge.train.distributed import (
    DistEnv,
    all_reduce_mean,
    full_state,
    load_full_state,
    parallelize,
    unwrap,
)
from lmforge.train.metrics import MetricsLog, plot_loss_curve, read_metrics
from lmforge.train.optim import build_optimizer, lr_at
from lmforge.train.spikes import SpikeConfig, SpikeDetector

log = logging.getLogger(__name__)

# Known dense bf16 peaks (FLOP/s) for MFU: NVIDIA H100/H200 SXM datasheets, A100 datasheet.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class TrainingError(LmforgeError):
    """Training cannot go on (e.g. loss spikes keep coming back after every rollback)."""


class Batches(Protocol):
    """A source of training batches whose position a checkpoint records and restores."""

    step: int  # batches drawn so far; a rollback moves it past the data that caused a spike

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# (model, batch) → the micro-batch's mean loss, or (loss, figures) where ``figures`` (plain
# floats such as a reward or an accuracy) are averaged over the micro-steps and logged with it
LossFn = Callable[[nn.Module, Any], Tensor | tuple[Tensor, dict[str, float]]]


@dataclass
class RunInfo:
    """What is saved with the run: ``config`` (the resolved training config, written to
    ``config.json`` as ``train`` and into every checkpoint), the model's shape and its tokenizer
    (the run's copy; its fingerprint is checked on resume)."""

    config: dict[str, Any]
    model_config: ModelConfig
    tokenizer: Tokenizer


def place(model: nn.Module, config: LoopConfig, env: DistEnv) -> nn.Module:
    """``model`` on the run's device, wrapped for data parallelism when under torchrun."""
    return parallelize(model.to(env.device), config.parallel, env)


def optimizer_for(model: nn.Module, config: LoopConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters (frozen ones are left out)."""
    return build_optimizer(unwrap(model), config.lr, config.weight_decay,
                           (config.beta1, config.beta2), config.decay_embeddings)


class _State:
    """What a checkpoint holds and a rollback restores, around the model and optimizer."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, batches: Batches,
                 config: LoopConfig, info: RunInfo) -> None:
        self.model, self.optimizer, self.batches = model, optimizer, batches
        self.info = info
        self.detector = SpikeDetector(build(SpikeConfig, ("spike", config.spike)))
        self.step = 0
        self.cooldown_until = 0
        self.rollbacks = 0

    def state(self, val_loss: float | None) -> dict[str, Any]:
        model_state, optim_state = full_state(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optim_state, "step": self.step,
                "loader": self.batches.state_dict(), "detector": self.detector.state_dict(),
                "rng": rng_state(), "cooldown_until": self.cooldown_until,
                "rollbacks": self.rollbacks, "val_loss": val_loss, "config": self.info.config,
                "model_config": asdict(self.info.model_config),
                "tokenizer_fingerprint": self.info.tokenizer.fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        if state["tokenizer_fingerprint"] != self.info.tokenizer.fingerprint:
            raise ConfigError("checkpoint was trained with a different tokenizer than the data's")
        if state["model_config"] != asdict(self.info.model_config):
            raise ConfigError("checkpoint's model config differs from this run's; resume with "
                              "the same preset and model overrides")
        load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        self.step = state["step"]
        self.batches.load_state_dict(state["loader"])
        self.detector.load_state_dict(state["detector"])
        set_rng_state(state["rng"])
        self.cooldown_until = state["cooldown_until"]
        self.rollbacks = state["rollbacks"]


def autocast_for(config: LoopConfig, env: DistEnv) -> contextlib.AbstractContextManager:
    """bf16 autocast where ``config.dtype`` resolves to bf16 on the run's device, else nothing."""
    if resolve_dtype(config.dtype, env.device) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=env.device.type, dtype=torch.bfloat16)


def _peak_flops(config: LoopConfig, env: DistEnv) -> float:
    if config.peak_flops:
        return config.peak_flops
    if env.device.type == "cuda":
        name = torch.cuda.get_device_name(env.device)
        return next((v for k, v in PEAK_BF16.items() if k in name), 0.0)
    return 0.0


def _resume(state: _State, checkpoints: Checkpoints) -> None:
    """Restore the newest readable checkpoint; a damaged newer one is named and passed over."""
    entries = checkpoints.entries()
    if not entries:
        raise ConfigError(f"resume: {checkpoints.dir.parent} has no checkpoint to resume")
    for entry in reversed(entries):
        path = checkpoints.dir / entry["path"]
        try:
            saved = load_checkpoint(path)
        except InputError as e:
            log.warning("skipping an unreadable checkpoint: %s", e)
            continue
        if path.name != entries[-1]["path"]:
            log.warning("resuming from %s, the newest readable checkpoint", path)
        state.restore(saved)
        return
    raise ConfigError(f"resume: none of the checkpoints in {checkpoints.dir} is readable")


def _prepare_run_dir(run: RunDir, state: _State, config: LoopConfig, env: DistEnv) -> None:
    if not config.resume and Checkpoints(run).entries():
        raise ConfigError(f"out: {run.path} already holds a run; pass --resume to continue it "
                          "or choose another directory")
    if not env.is_main:
        return
    run.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.config, json.dumps(
        {"train": state.info.config, "model": asdict(state.info.model_config)}, indent=2))
    state.info.tokenizer.save(run.tokenizer)
    if config.resume and run.metrics.exists():  # drop what the interrupted run logged past it
        kept = [r for r in read_metrics(run.metrics) if r["step"] < state.step]
        atomic_write_text(run.metrics, "".join(json.dumps(r) + "\n" for r in kept))


@contextlib.contextmanager
def _stop_requests() -> Iterator[dict[str, str]]:
    """While training, Ctrl-C and SIGTERM (what Slurm and Kubernetes send before preemption)
    only ask the loop to stop after the current step; a second Ctrl-C stops at once."""
    requested: dict[str, str] = {}
    if threading.current_thread() is not threading.main_thread():
        yield requested  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and "signal" in requested:
            raise KeyboardInterrupt
        requested["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Batches, loss_fn: LossFn,
        config: LoopConfig, env: DistEnv, info: RunInfo, *, batch_size: int, seq_len: int,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        sample: Callable[[nn.Module, int], str] | None = None,
        count_tokens: Callable[[Any], int] | None = None) -> dict[str, Any]:
    """Train ``model`` (placed with :func:`place`) on ``batches`` under ``loss_fn`` until
    ``config.max_steps`` or the time budget; returns the final figures (also the last line of
    ``metrics.jsonl``). ``evaluate(model)`` gives validation figures (``val_loss`` ranks the
    checkpoints); ``sample(model, step)`` a text written to ``samples.txt`` at each
    evaluation. ``batch_size`` × ``seq_len`` (a micro-batch's shape) count the throughput and,
    with the model's FLOPs per token, the MFU — or ``count_tokens(batch)``, for batches that are
    padded (fine-tuning: the real tokens of each batch)."""
    run = RunDir(config.out)
    state = _State(model, optimizer, batches, config, info)
    checkpoints = Checkpoints(run, config.keep_last)
    if config.resume:
        _resume(state, checkpoints)
    _prepare_run_dir(run, state, config, env)
    with _stop_requests() as stop:
        return _loop(state, loss_fn, config, env, run, checkpoints, stop, batch_size * seq_len,
                     state.info.model_config.flops_per_token(seq_len), evaluate, sample,
                     count_tokens)


def _loop(state: _State, loss_fn: LossFn, config: LoopConfig, env: DistEnv, run: RunDir,
          checkpoints: Checkpoints, stop: dict[str, str], tokens_per_batch: int,
          flops_per_token: int, evaluate: Callable[[nn.Module], dict[str, float]] | None,
          sample: Callable[[nn.Module, int], str] | None,
          count_tokens: Callable[[Any], int] | None) -> dict[str, Any]:
    start_step = state.step
    metrics = MetricsLog(run.path, config.tensorboard) if env.is_main else None
    compiled = torch.compile(state.model) if config.compile else state.model
    autocast = autocast_for(config, env)
    peak = _peak_flops(config, env)
    spike_cfg = state.detector.config
    val: dict[str, float] = {}

    def emit(record: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(record)

    bar = progress_bar(config.progress and env.is_main, total=config.max_steps,
                       initial=state.step, desc="train", unit="step")
    started = time.perf_counter()
    budget = config.time_budget_minutes * 60
    while True:
        step = state.step
        lr_scale = spike_cfg.lr_factor if step < state.cooldown_until else 1.0
        lr = lr_at(step, config.lr, config.warmup_steps, config.max_steps,
                   config.min_lr_ratio) * lr_scale
        for group in state.optimizer.param_groups:
            group["lr"] = lr

        # Every rank stops at the same step: what each saw is all-reduced (no collective on a
        # single process, nor for the budget when there is none).
        out_of_time = budget > 0 and time.perf_counter() - started > budget
        signalled = bool(stop)
        if budget > 0:
            out_of_time = all_reduce_mean(float(out_of_time), env) > 0
        if env.world_size > 1:
            signalled = all_reduce_mean(float(signalled), env) > 0
        interrupted = signalled and not out_of_time and step != start_step
        last = step == config.max_steps or out_of_time
        if (step % config.eval_every == 0 or last) and not interrupted:
            if evaluate is not None:
                val = evaluate(compiled)
                emit({"step": step, "event": "eval", **val})
            if sample is not None:  # every rank: an FSDP forward gathers from all of them
                text = sample(unwrap(state.model), step)
                emit({"step": step, "event": "sample", "text": text})
                if env.is_main:
                    with open(run.samples, "a", encoding="utf-8") as f:
                        f.write(f"--- step {step}\n{text}\n")
        if (step % config.save_every == 0 or last or interrupted) and step != start_step:
            saved = state.state(val.get("val_loss") if not interrupted else None)
            if env.is_main:
                checkpoints.save(saved, step, saved["val_loss"], state.detector.healthy)
        if interrupted:
            bar.close()
            emit({"step": step, "event": "interrupted", "signal": stop.get("signal", "")})
            if metrics is not None:
                metrics.close()
            raise TrainingInterrupted(
                f"{stop.get('signal', 'a stop request')}: saved a checkpoint at step {step} in "
                f"{checkpoints.dir}; continue with the same command and --resume")
        if last:
            break

        t0 = time.perf_counter()
        # summed on the device in float64 (as exact as Python floats): one host sync per step,
        # not one per micro-step
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        figures: dict[str, float] = {}  # the objective's own, averaged over micro-steps
        tokens = 0
        for micro in range(config.grad_accum):
            batch = state.batches.next_batch()
            tokens += count_tokens(batch) if count_tokens else tokens_per_batch
            # DDP: all-reduce gradients only on the last micro-step.
            sync = (state.model.no_sync() if hasattr(state.model, "no_sync")
                    and micro < config.grad_accum - 1 else contextlib.nullcontext())
            with sync, autocast:
                loss = loss_fn(compiled, batch)
            if isinstance(loss, tuple):
                loss, extra = loss
                for name, value in extra.items():
                    figures[name] = figures.get(name, 0.0) + float(value) / config.grad_accum
            loss = loss / config.grad_accum
            with sync:
                loss.backward()
            loss_sum += loss.detach()
        loss_avg = all_reduce_mean(loss_sum.item(), env)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            state.model.parameters(), config.grad_clip or float("inf")).item()

        verdict = state.detector.check(loss_avg, grad_norm)
        if verdict == "ok":
            state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        if verdict == "skip":
            emit({"step": step, "event": "skip", "loss": loss_avg, "grad_norm": grad_norm})
        elif verdict == "rollback":
            _roll_back(state, checkpoints, step, emit)
            bar.n = state.step
            continue

        state.step += 1
        dt = time.perf_counter() - t0
        tps = tokens * env.world_size / dt
        record = {"step": step, "loss": loss_avg, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tps, **figures}
        if peak:
            record["mfu"] = flops_per_token * tps / (peak * env.world_size)
        emit(record)
        bar.update(1)
        if step % config.log_every == 0:
            bar.set_postfix(loss=f"{loss_avg:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                            **({"mfu": f"{record['mfu']:.1%}"} if peak else {}),
                            refresh=False)  # shown at the next redraw: lines stay throttled
    bar.close()
    summary = {"step": state.step, **val, "params": state.info.model_config.num_params(),
               "rollbacks": state.rollbacks,
               "stopped_by_time_budget": state.step < config.max_steps}
    emit({"step": state.step, "event": "done", **summary})
    if metrics is not None:
        metrics.close()
        plot_loss_curve(run.path, val.get("unigram_bpb"))
    return summary


def _roll_back(state: _State, checkpoints: Checkpoints, step: int,
               emit: Callable[[dict[str, Any]], None]) -> None:
    """Restore the latest clean checkpoint, skip the data read since, lower the LR a while.

    Without a clean checkpoint yet (early in a run), the weights stay as they are — the
    outlier steps were skipped, so they are the last good ones — and only the LR is lowered."""
    cfg = state.detector.config
    if state.rollbacks >= cfg.max_rollbacks:
        raise TrainingError(f"loss spikes persisted through {cfg.max_rollbacks} rollbacks "
                            f"(step {step}); lower the learning rate or inspect the data near "
                            f"data step {state.batches.step}")
    target = checkpoints.latest(clean_only=True)
    data_position = state.batches.step
    rollbacks = state.rollbacks + 1
    if target is not None:
        state.restore(load_checkpoint(target))
    else:
        state.detector.consecutive = 0
    skipped = data_position - state.batches.step
    state.batches.step = data_position  # the batches since the checkpoint are not seen again
    state.rollbacks = rollbacks
    state.cooldown_until = state.step + cfg.cooldown_steps
    emit({"step": step, "event": "rollback",
          "to_step": state.step, "checkpoint": target.name if target else None,
          "skipped_batches": skipped, "lr_factor": cfg.lr_factor,
          "until_step": state.cooldown_until})
    if target is None:
        log.warning("loss spike at step %d and no clean checkpoint yet: kept the weights from "
                    "before it (its steps were skipped) and lowered the learning rate ×%g for "
                    "%d steps", step, cfg.lr_factor, cfg.cooldown_steps)
