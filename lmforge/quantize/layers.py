"""The quantized layers: :class:`Int8Linear` and :class:`Int4Linear`, and their weight formats.

Both hold integer codes plus floating-point scales in buffers and stand in for an ``nn.Linear``;
activations stay in floating point. How ``forward`` computes depends on the activations:

- **bf16 on CPU**: PyTorch's fused weight-only kernels, ``aten._weight_int8pack_mm`` and
  ``aten._weight_int4pack_mm_for_cpu``, multiply against the codes without materializing a float
  weight — a quarter (int8) or an eighth (int4) of fp32's weight traffic, which is what a
  batch-1 decode step is bound by. The int4 kernel wants its own tile layout; it is built on
  first use and cached (never saved: it is machine-specific) until the codes change.
- **anything else** (fp32 activations, where these kernels are slower than dequantizing; other
  devices, whose kernels are not wired in): dequantize to the activations' dtype, then
  ``F.linear``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError, InputError

Mode = Literal["int8", "int4"]
MODES = ("int8", "int4")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")


def _cpu_kernel_applies(x: Tensor) -> bool:
    """The fused CPU kernels are fast for bf16 activations; for float32 activations they are
    slower than dequantizing, and on other devices these layers dequantize too."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- int8


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: codes (out, in) int8 and scales (out,) float32,
    ``scale = max|w_row| / 127``, codes in [-127, 127]."""
    w = weight.detach().float()
    # An all-zero row would give scale 0 and 0/0 codes; any positive scale encodes it exactly.
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


class Int8Linear(nn.Module):
    """``y = (x @ codesᵀ) · scale + bias``: the per-row scale factors out of the matmul."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        module.weight, module.scales = quantize_int8(linear.weight)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def dequantize(self) -> Tensor:
        """The float32 weight (out, in) this layer computes with."""
        return self.weight.float() * self.scales[:, None]

    def forward(self, x: Tensor) -> Tensor:
        if _cpu_kernel_applies(x):
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features),
                                                   self.weight, self.scales.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            # int8 codes (|q| ≤ 127) are exact in bf16/fp16, so the cast loses nothing.
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


# ------------------------------------------------------------------------------------------- int4


def pack_int4(codes: Tensor) -> Tensor:
    """Unsigned 4-bit codes (..., n) with values 0..15, n even → bytes (..., n/2) uint8.

    Column 2j goes to the low nibble of byte j, column 2j+1 to the high nibble."""
    if codes.shape[-1] % 2:
        raise InputError(f"pack_int4: last dimension must be even, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: bytes (..., m) uint8 → codes (..., 2m) uint8 in 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)  # (..., m, 2) → (..., 2m)


def check_group_size(in_features: int, group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 \
            or group_size % 2:
        raise ConfigError(f"group_size: must be a positive even integer (32, 64, 128 are usual), "
                          f"got {group_size!r}")
    if in_features % group_size:
        raise ConfigError(f"group_size: in_features={in_features} is not divisible by "
                          f"group_size={group_size}; pick a group size that divides every "
                          "layer's input width (e.g. 32 or 64)")


def int4_group_scales(weight: Tensor) -> Tensor:
    """Symmetric scales for weight groups (..., group_size) → (...) float16: max|w| / 7.

    float16 adds only 2/group_size bytes per weight; codes are computed against the rounded
    scale, so the ``scale / 2`` error bound holds for the stored one."""
    amax = weight.detach().float().abs().amax(dim=-1)
    # float16's smallest subnormal is ~6e-8; an all-zero group still needs a nonzero scale.
    return (amax / 7).clamp(min=1e-7).to(torch.float16)


def int4_codes(weight: Tensor, scales: Tensor) -> Tensor:
    """Signed codes in [-8, 7] (as float) of ``weight`` (..., g) for ``scales`` (...)."""
    return torch.round(weight.float() / scales.float()[..., None]).clamp(-8, 7)


def _int4_round(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Round-to-nearest signed codes (out, in/group, group) as float, scales (out, in/group)."""
    out_features, in_features = weight.shape
    check_group_size(in_features, group_size)
    groups = weight.detach().float().view(out_features, in_features // group_size, group_size)
    scales = int4_group_scales(groups)
    return int4_codes(groups, scales), scales


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Group-wise symmetric int4: packed codes (out, in/2) uint8, scales (out, in/group) fp16.

    Codes in [-8, 7] are stored offset by +8 as 0..15, two per byte. Symmetric rather than
    asymmetric (zero points) for simplicity: trained weights are roughly zero-centred."""
    codes, scales = _int4_round(weight, group_size)
    return pack_int4((codes.flatten(1) + 8).to(torch.uint8)), scales


def fake_quantize(weight: Tensor, mode: Mode, group_size: int) -> Tensor:
    """The float32 weight (out, in) that round-to-nearest ``mode`` quantization of ``weight``
    would compute with — quantize then dequantize, without packing (for searches such as AWQ)."""
    if mode == "int8":
        codes, scales = quantize_int8(weight)
        return codes.float() * scales[:, None]
    codes, scales = _int4_round(weight, group_size)
    return (codes * scales.float()[..., None]).flatten(1)


class Int4Linear(nn.Module):
    """``weight = (codes - 8) · scale[group]``, fused into the matmul on CPU with bf16
    activations, else dequantized and passed to ``F.linear``."""

    def __init__(self, in_features: int, out_features: int, group_size: int,
                 bias: bool = False) -> None:
        super().__init__()
        check_group_size(in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2,
                                                   dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, in_features // group_size,
                                                  dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._cpu_kernel_weights: tuple[Tensor, Tensor] | None = None
        self.register_load_state_dict_post_hook(Int4Linear._drop_kernel_weights)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int,
                    quantized: tuple[Tensor, Tensor] | None = None) -> Int4Linear:
        """The int4 stand-in for ``linear``: its weight rounded to nearest, or ``quantized``
        (packed codes, scales) chosen by another method (GPTQ)."""
        module = cls(linear.in_features, linear.out_features, group_size,
                     linear.bias is not None)
        module.set_quantized(*(quantized or quantize_int4(linear.weight, group_size)))
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def set_quantized(self, weight: Tensor, scales: Tensor) -> None:
        """Install packed codes (out, in/2) uint8 and group scales (out, in/group) float16."""
        self.weight, self.scales = weight, scales
        self._cpu_kernel_weights = None

    def _drop_kernel_weights(self, *_: object) -> None:
        # load_state_dict overwrote the codes in place: the kernel layout is stale.
        self._cpu_kernel_weights = None

    def _kernel_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The CPU kernel's operands, built on first use and kept: the codes repacked into its
        tile layout, and (in/group, out, 2) scales and zero points — zero, as the codes are
        symmetric — in the activations' dtype."""
        cached = self._cpu_kernel_weights
        if cached is None or cached[1].dtype != dtype:
            codes = unpack_int4(self.weight).to(torch.int32)  # (out, in), 0..15
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            scales = self.scales.t().to(dtype)  # (in/group, out)
            cached = (packed, torch.stack([scales, torch.zeros_like(scales)], dim=-1))
            self._cpu_kernel_weights = cached
        return cached

    def dequantize(self) -> Tensor:
        """The float32 weight (out, in) this layer computes with."""
        out, n_groups = self.scales.shape
        codes = unpack_int4(self.weight).float() - 8  # (out, in)
        w = codes.view(out, n_groups, self.group_size) * self.scales.float()[..., None]
        return w.view(out, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not _cpu_kernel_applies(x):
            return F.linear(x, self.dequantize().to(x.dtype), bias)
        weight, scales_and_zeros = self._kernel_weights(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), weight,
                                                       self.group_size, scales_and_zeros)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4, group_size={self.group_size}")
