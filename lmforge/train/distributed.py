"""Data parallelism applied from outside the model: DDP or FSDP2 (``fully_shard``) under torchrun.

The model file knows nothing of this: :func:`parallelize` wraps a built model. Checkpoints always
hold *full* state dicts (gathered to CPU), so a run trained with FSDP on 8 GPUs resumes, evaluates
or exports on one CPU. Rank 0 logs and writes; every rank computes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from lmforge.errors import ConfigError
from lmforge.hardware import resolve_device


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # this process created the process group, so it must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group that torchrun describes (``WORLD_SIZE`` > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, local, world, dev, owns)


def shutdown_distributed(env: DistEnv) -> None:
    """Tear down the process group we created, once every rank is done (rank 0 still writes the
    last checkpoint and plot after the final collective). A rank that exits while a peer's
    connection is open, or with the group alive, can abort ("terminate called without an active
    exception")."""
    if env.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def parallelize(model: nn.Module, strategy: str, env: DistEnv) -> nn.Module:
    """Wrap for data parallelism: ``ddp`` replicates, ``fsdp`` shards each block and the root."""
    if strategy == "auto":
        strategy = "ddp" if env.world_size > 1 else "none"
    if strategy == "none":
        return model
    if env.world_size == 1:
        raise ConfigError(f"parallel: {strategy!r} needs several processes; launch with torchrun")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:  # type: ignore[attr-defined]
            fully_shard(block)
        fully_shard(model)
        return model
    raise ConfigError(f"parallel: unknown strategy {strategy!r}")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state as plain CPU tensors keyed by parameter name (all ranks call)."""
    return get_state_dict(model, optimizer, options=_FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                    model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict=optim_state, options=StateDictOptions(full_state_dict=True))
    for group in optimizer.param_groups:  # the flattened state dict stores tuples as lists
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])


def all_reduce_mean(value: float, env: DistEnv) -> float:
    if env.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.item() / env.world_size
