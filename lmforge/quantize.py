"""Weight-only post-training quantization of a built model (gpt-fast style).

The model file knows nothing about this: :func:`quantize_model` walks a built
:class:`~lmforge.model.Transformer` and swaps its ``nn.Linear`` layers in place for
:class:`Int8Linear` or :class:`Int4Linear`, which hold integer weights plus floating-point scales
and dequantize on the fly in ``forward``. Activations stay in floating point.

- **int8**: one symmetric scale per output channel, ``scale = max|w_row| / 127``, codes in
  [-127, 127]. The per-element weight error is at most ``scale / 2``.
- **int4**: one symmetric scale per group of ``group_size`` consecutive input columns of a row,
  ``scale = max|w_group| / 7``, codes in [-8, 7] stored offset by +8 as 0..15, two codes per byte
  (low nibble = even column). Scales are kept in float16 so they add only 2/group_size bytes per
  weight; the codes are computed against the float16-rounded scale, so the ``scale / 2`` error
  bound holds for the stored scale. Symmetric rather than asymmetric (zero points) for
  simplicity: trained weights are roughly zero-centred.
- **GPTQ** (:func:`gptq_quantize_model`, arXiv:2210.17323) produces the same int4 layout but
  chooses the codes column by column, folding each column's rounding error into the columns not
  yet quantized so that the layer's *output* on calibration activations moves as little as
  possible.

The LM head and the embeddings are left in floating point: the embedding is a lookup, not a
matmul, and a tied LM head shares its matrix with it (quantizing one copy would untie them).

:func:`save_quantized` / :func:`load_quantized` round-trip a quantized model with its
:class:`~lmforge.model.ModelConfig`; :func:`size_report` says how many bytes the weights take.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError, InputError
from lmforge.files import atomic_path
from lmforge.model import ModelConfig, Transformer

Mode = Literal["int8", "int4"]
MODES = ("int8", "int4")
FORMAT = "lmforge-quantized"
FORMAT_VERSION = 1
DEFAULT_SKIP = ("lm_head",)

# ------------------------------------------------------------------------------------------- int8


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: codes (out, in) int8 and scales (out,) float32."""
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
    """Symmetric scales for weight groups (..., group_size) → (...) float16: max|w| / 7."""
    amax = weight.detach().float().abs().amax(dim=-1)
    # float16's smallest subnormal is ~6e-8; an all-zero group still needs a nonzero scale.
    return (amax / 7).clamp(min=1e-7).to(torch.float16)


def int4_codes(weight: Tensor, scales: Tensor) -> Tensor:
    """Signed codes in [-8, 7] (as float) of ``weight`` (..., g) for ``scales`` (...)."""
    return torch.round(weight.float() / scales.float()[..., None]).clamp(-8, 7)


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Group-wise symmetric int4: packed codes (out, in/2) uint8, scales (out, in/group) fp16."""
    out_features, in_features = weight.shape
    check_group_size(in_features, group_size)
    groups = weight.detach().float().view(out_features, in_features // group_size, group_size)
    scales = int4_group_scales(groups)
    codes = int4_codes(groups, scales).view(out_features, in_features)
    return pack_int4((codes + 8).to(torch.uint8)), scales


class Int4Linear(nn.Module):
    """Dequantize-then-matmul: ``weight = (codes - 8) · scale[group]``, then ``F.linear``."""

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

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        module = cls(linear.in_features, linear.out_features, group_size,
                     linear.bias is not None)
        module.weight, module.scales = quantize_int4(linear.weight, group_size)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def dequantize(self) -> Tensor:
        """The float32 weight (out, in) this layer computes with."""
        out, n_groups = self.scales.shape
        codes = unpack_int4(self.weight).float() - 8  # (out, in)
        w = codes.view(out, n_groups, self.group_size) * self.scales.float()[..., None]
        return w.view(out, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4, group_size={self.group_size}")


# ------------------------------------------------------------------------------ model transforms


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")


def quantizable_linears(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP
                        ) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers to quantize, by qualified name: every one except those whose
    last name component is in ``skip`` and those sharing their weight with an embedding."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in skip
            and id(m.weight) not in embedding_weights}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: Mode, group_size: int = 128,
                   skip: tuple[str, ...] = DEFAULT_SKIP) -> nn.Module:
    """Swap ``model``'s Linear layers in place for int8 or int4 ones (round to nearest) and
    return the model. The LM head (``skip``) and embeddings stay in floating point.

    ``group_size`` (int4 only) must divide every quantized layer's ``in_features``; this is
    checked for all layers before any is swapped, so a ConfigError leaves the model untouched.
    """
    _check_mode(mode)
    linears = quantizable_linears(model, skip)
    if mode == "int4":
        for linear in linears.values():
            check_group_size(linear.in_features, group_size)
    for name, linear in linears.items():
        q = Int8Linear.from_linear(linear) if mode == "int8" else \
            Int4Linear.from_linear(linear, group_size)
        _set_submodule(model, name, q.to(linear.weight.device))
    return model


# ------------------------------------------------------------------------------------------- GPTQ


def gptq_quantize_weight(weight: Tensor, hessian: Tensor, group_size: int,
                         damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """GPTQ (arXiv:2210.17323, Algorithm 1) for one weight (out, in) with H = 2XᵀX/n (in, in).

    Columns are quantized left to right; column i's error, divided by [H⁻¹]ᵢᵢ from the upper
    Cholesky factor of H⁻¹, is subtracted from the later columns weighted by that factor's row i
    — the optimal brain surgeon update restricted to the not-yet-quantized columns. Each group's
    scale is taken from the error-updated weights when the group is reached. ``damp`` adds
    damp·mean(diag H) to the diagonal so that H is safely positive definite.

    Returns (packed codes (out, in/2) uint8, scales (out, in/group) float16), as
    :func:`quantize_int4`. Unblocked: O(out·in²) time, fine for the small layers here.
    """
    out_features, in_features = weight.shape
    check_group_size(in_features, group_size)
    if not damp > 0:
        raise ConfigError(f"damp: must be > 0, got {damp!r}")
    W = weight.detach().float().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(in_features, dtype=H.dtype)
    # U upper-triangular with H⁻¹ = UᵀU; row i of U past the diagonal spreads column i's error.
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    codes = torch.empty(out_features, in_features)
    scales = torch.empty(out_features, in_features // group_size, dtype=torch.float16)
    for i in range(in_features):
        g = i // group_size
        if i % group_size == 0:
            scales[:, g] = int4_group_scales(W[:, i:i + group_size])
        s = scales[:, g].float()
        q = int4_codes(W[:, i:i + 1], scales[:, g]).squeeze(1)
        codes[:, i] = q
        err = (W[:, i] - q * s) / U[i, i]
        W[:, i + 1:] -= err[:, None] * U[i, i + 1:][None, :]
    return pack_int4((codes + 8).to(torch.uint8)), scales


class _Hessian:
    """Running H = 2XᵀX/n over the inputs X (n, in) a Linear layer sees, in float64 on CPU."""

    def __init__(self, in_features: int) -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def hook(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()  # (N, in)
        n_new = self.n + x.shape[0]
        self.H.mul_(self.n / n_new).add_(x.T @ x, alpha=2.0 / n_new)
        self.n = n_new


@torch.no_grad()
def gptq_quantize_model(model: Transformer, calibration: list[Tensor], group_size: int = 128,
                        damp: float = 0.01, skip: tuple[str, ...] = DEFAULT_SKIP) -> Transformer:
    """Int4-quantize ``model`` in place with GPTQ, calibrated on batches of token ids (B, T).

    Block by block: forward hooks capture the inputs of the block's Linear layers while the
    whole calibration set runs through the model — whose earlier blocks are already quantized,
    so each block is fitted to the activations it will really see — then each layer is
    quantized from
    H = 2XᵀX/n and swapped for an :class:`Int4Linear`. Layers outside ``model.layers`` (other
    than ``skip`` and tied heads) are quantized last the same way. Costs one pass over the
    calibration set per block.
    """
    if not calibration:
        raise InputError("gptq: calibration must be a non-empty list of token-id batches")
    linears = quantizable_linears(model, skip)
    for linear in linears.values():
        check_group_size(linear.in_features, group_size)
    stages: list[list[str]] = [[n for n in linears if n.startswith(f"layers.{i}.")]
                               for i in range(len(model.layers))]
    staged = {n for stage in stages for n in stage}
    stages.append([n for n in linears if n not in staged])
    was_training = model.training
    model.eval()
    for stage in stages:
        if not stage:
            continue
        hessians = {n: _Hessian(linears[n].in_features) for n in stage}
        handles = [linears[n].register_forward_pre_hook(hessians[n].hook) for n in stage]
        try:
            for ids in calibration:
                model(ids)
        finally:
            for h in handles:
                h.remove()
        for n in stage:
            linear = linears[n]
            q = Int4Linear(linear.in_features, linear.out_features, group_size,
                           linear.bias is not None)
            q.weight, q.scales = gptq_quantize_weight(linear.weight.cpu(), hessians[n].H,
                                                      group_size, damp)
            if linear.bias is not None:
                q.bias = linear.bias.detach().clone()
            _set_submodule(model, n, q.to(linear.weight.device))
    model.train(was_training)
    return model


# ----------------------------------------------------------------------------------- save / load


def quantization_of(model: nn.Module) -> tuple[str, int | None, list[str]]:
    """(mode, group_size, names of quantized layers) of a quantized model."""
    int8 = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    int4 = {n: m.group_size for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    if int8 and int4:
        raise InputError("model mixes int8 and int4 layers; save_quantized expects one mode")
    if int8:
        return "int8", None, int8
    if int4:
        sizes = set(int4.values())
        if len(sizes) > 1:
            raise InputError(f"model mixes int4 group sizes {sorted(sizes)}")
        return "int4", sizes.pop(), list(int4)
    raise InputError("model has no quantized layers; call quantize_model first")


def save_quantized(model: Transformer, path: str | Path) -> Path:
    """Write model config, quantization mode, group size, quantized layer names and the state
    dict to ``path`` (torch.save), atomically. Returns the path."""
    mode, group_size, names = quantization_of(model)
    payload = {"format": FORMAT, "version": FORMAT_VERSION,
               "model_config": asdict(model.config), "mode": mode, "group_size": group_size,
               "quantized": names, "state_dict": model.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Rebuild the model saved by :func:`save_quantized`, quantized layers and all."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such quantized model file")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise InputError(f"{path}: not a readable torch file ({e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path}: not an lmforge quantized model (format {FORMAT!r})")
    if payload.get("version") != FORMAT_VERSION:
        raise InputError(f"{path}: format version {payload.get('version')!r}, this lmforge "
                         f"reads version {FORMAT_VERSION}")
    model = Transformer(ModelConfig(**payload["model_config"])).to(device)
    mode, group_size = payload["mode"], payload["group_size"]
    _check_mode(mode)
    for name in payload["quantized"]:
        linear = model.get_submodule(name)
        if mode == "int8":
            q = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None)
        else:
            q = Int4Linear(linear.in_features, linear.out_features, group_size,
                           linear.bias is not None)
        _set_submodule(model, name, q.to(device))
    model.load_state_dict(payload["state_dict"])
    return model


# ------------------------------------------------------------------------------------------- size


@dataclass
class SizeReport:
    """Bytes of a model's weights, counting a tied matrix once."""

    quantized_bytes: int  # codes + scales (+ biases) of the quantized layers
    quantized_fp32_bytes: int  # what those layers' weights would take in float32
    other_bytes: int  # everything else (embeddings, norms, LM head), as stored

    @property
    def ratio(self) -> float:
        """Quantized layers' size over their float32 size (int8 ≈ 1/4, int4 ≈ 1/8)."""
        return self.quantized_bytes / max(self.quantized_fp32_bytes, 1)

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes

    def __str__(self) -> str:
        mib = 1 << 20
        return (f"quantized layers {self.quantized_bytes / mib:.2f} MiB "
                f"(fp32 {self.quantized_fp32_bytes / mib:.2f} MiB, ratio {self.ratio:.3f}); "
                f"other {self.other_bytes / mib:.2f} MiB; total {self.total_bytes / mib:.2f} MiB")


def size_report(model: nn.Module) -> SizeReport:
    """How many bytes ``model``'s persistent tensors take, split into quantized layers and the
    rest (see :class:`SizeReport`)."""
    quantized, fp32, other = 0, 0, 0
    seen: set[int] = set()
    for module in model.modules():
        tensors = [t for t in [*module.parameters(recurse=False),
                               *(b for n, b in module.named_buffers(recurse=False)
                                 if n not in module._non_persistent_buffers_set)]
                   if t is not None and id(t) not in seen]
        seen.update(id(t) for t in tensors)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if isinstance(module, Int8Linear | Int4Linear):
            quantized += nbytes
            fp32 += module.in_features * module.out_features * 4
        else:
            other += nbytes
    return SizeReport(quantized, fp32, other)


def file_size(path: str | Path) -> int:
    """Size of a saved model file in bytes."""
    return Path(path).stat().st_size
