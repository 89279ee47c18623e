"""What the machine computes fast: the one place training, quantization and inference ask."""

from __future__ import annotations

from typing import Literal

import torch

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
