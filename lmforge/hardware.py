"""What the machine computes fast: the one place training, quantization and inference ask."""

from __future__ import annotations

from typing import Literal

import torch

from lmforge.errors import ConfigError

DType = Literal["fp32", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def native_bf16(device: torch.device) -> bool:
    """bf16 matmuls in hardware: any recent CUDA GPU; CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return True
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(dtype: DType | Literal["auto"], device: torch.device) -> DType:
    """``auto``: bf16 where the hardware has bf16 matmuls, else fp32."""
    if dtype != "auto":
        return dtype
    return "bf16" if native_bf16(device) else "fp32"


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA where available, else the CPU. A device this machine lacks is refused
    with a message, not at the first tensor moved there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device; use auto, cpu, cuda or cuda:N"
                          ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name} asked for, but this machine has no usable CUDA "
                              f"device (torch {torch.__version__}); use --device cpu or auto")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device: {name} asked for, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"device: {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device
