"""LoRA (arXiv:2106.09685) as a transform of a built model, like quantization.

:func:`apply_lora` swaps the named projections for :class:`LoraLinear` — the base layer, frozen,
plus a trainable low-rank update ``x @ Aᵀ @ Bᵀ · alpha/rank`` — and freezes everything else.
The base may be an ``nn.Linear`` or an int8/int4 layer (QLoRA-style: the base stays quantized,
only A and B train). B starts at zero, so an adapted model computes exactly what its base does.

Adapters are saved alone (:func:`save_adapter`, one small safetensors file carrying its config),
folded into the weights (:func:`merge_lora`), switched off in place (:func:`adapters_disabled`:
DPO's reference model without a second copy), or written in PEFT's format (:func:`export_peft`)
for a ``LlamaForCausalLM`` exported by :mod:`lmforge.export.hf`.

The LM head is never adapted: it is tied to the token embedding, which is a lookup.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.config import option
from lmforge.errors import ConfigError, InputError
from lmforge.files import atomic_path, atomic_write_text, check_output
from lmforge.quantize.layers import Int4Linear, Int8Linear

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORMAT = "lmforge-lora"
FORMAT_VERSION = 1
Base = nn.Linear | Int8Linear | Int4Linear


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class LoraConfig:
    """Which projections get adapters, and their shape. A parent config embeds these fields as
    ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``lora_targets``."""

    rank: int = option(8, "rank r of the update B·A; adapter size grows linearly with it")
    alpha: float = option(16.0, "the update is scaled by alpha / rank, so changing the rank "
                                "keeps the learning rate's meaning")
    dropout: float = option(0.0, "dropout on the adapters' input while training (0: off)")
    targets: tuple[str, ...] = option(PROJECTIONS, "projections to adapt, by their last name "
                                                   f"component: any of {', '.join(PROJECTIONS)}")

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank: must be an integer >= 1, got {self.rank!r}")
        if not (_is_number(self.alpha) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"alpha: must be a finite number > 0, got {self.alpha!r}")
        if not (_is_number(self.dropout) and 0 <= self.dropout < 1):
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets:
            raise ConfigError(f"targets: give at least one of {', '.join(PROJECTIONS)}")
        for name in targets:
            if name in ("lm_head", "embed_tokens"):
                raise ConfigError(f"targets: {name} cannot be adapted (the LM head is tied to "
                                  f"the token embedding); choose among {', '.join(PROJECTIONS)}")
            if name not in PROJECTIONS:
                raise ConfigError(f"targets: unknown projection {name!r}; choose among "
                                  f"{', '.join(PROJECTIONS)}")
        self.targets = tuple(dict.fromkeys(targets))  # lists (YAML, JSON) become tuples

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """``y = base(x) + dropout(x) @ Aᵀ @ Bᵀ · alpha/rank``; A (rank, in), B (out, rank).

    A and B are float32 for a quantized base, else in the base weight's dtype. ``disabled``
    skips the update (the base model's output)."""

    def __init__(self, base: Base, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        w = base.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.disabled = False
        self.train(base.training)  # a wrapped eval-mode model stays in eval mode (dropout off)
        # As PEFT: A as nn.Linear's default init, B zero, so the update starts at exactly 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        h = self.dropout(x).to(self.lora_A.weight.dtype)
        # scale the rank-r intermediate, not the full-width output: r/out_features the work
        return y + self.lora_B(self.lora_A(h) * self.scale).to(y.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base ``nn.Linear`` with ``scale · B @ A`` added to its weight (in float32)."""
        base = self.base_layer
        if not isinstance(base, nn.Linear):
            raise InputError(f"cannot merge an adapter into a quantized {type(base).__name__}; "
                             "call lmforge.quantize.rtn.dequantize_model(model) first")
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scale
        base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        return base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, disabled={self.disabled}"


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's adapted layers, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def _targets(model: nn.Module, config: LoraConfig) -> dict[str, Base]:
    """The layers ``config`` adapts, by qualified name; InputError when there are none."""
    if lora_modules(model):
        raise InputError("model already has LoRA adapters; merge_lora(model) first, or start "
                         "from the base model")
    found = {n: m for n, m in model.named_modules()
             if n.rsplit(".", 1)[-1] in config.targets and isinstance(m, Base)}
    if not found:
        raise InputError(f"no linear layer named {', '.join(config.targets)} in the model; "
                         f"LoRA targets must be among its projections ({', '.join(PROJECTIONS)})")
    return found


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap every target projection of ``model`` in a :class:`LoraLinear`, in place, and freeze
    every other parameter (embedding, norms, bases): only A and B train. Returns the wrapped
    layers' names."""
    targets = _targets(model, config)
    model.requires_grad_(False)
    for name, base in targets.items():
        model.set_submodule(name, LoraLinear(base, config.rank, config.alpha, config.dropout))
    return list(targets)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back, in place:
    a model with the base's module names and state-dict keys. A quantized base is refused
    (dequantize it first). Parameters stay frozen as :func:`apply_lora` left them."""
    adapted = lora_modules(model)
    for name, module in adapted.items():  # all checked before any layer is touched
        if not isinstance(module.base_layer, nn.Linear):
            raise InputError(f"merge_lora: {name} has a quantized base "
                             f"({type(module.base_layer).__name__}); call lmforge.quantize.rtn."
                             "dequantize_model(model) first, or save the adapter instead")
    for name, module in adapted.items():
        model.set_submodule(name, module.merged())
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """A and B of every adapter: what the optimizer should get."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A and B of every adapter, keyed like ``layers.0.self_attn.q_proj.lora_A.weight``."""
    return {f"{name}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight.detach()
            for name, m in lora_modules(model).items() for ab in "AB"}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes as its base (no adapter update)."""
    modules = list(lora_modules(model).values())
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(modules, previous, strict=True):
            m.disabled = was


def _check_matches(model: nn.Module, config: LoraConfig) -> None:
    adapted = lora_modules(model)
    if not adapted:
        raise InputError("model has no LoRA adapters; call apply_lora(model, config) first")
    for name, m in adapted.items():
        if (m.rank, m.alpha) != (config.rank, config.alpha) \
                or name.rsplit(".", 1)[-1] not in config.targets:
            raise InputError(f"{name}: adapter (rank {m.rank}, alpha {m.alpha}) was not made "
                             f"by this config (rank {config.rank}, alpha {config.alpha}, "
                             f"targets {list(config.targets)}); pass the config given to "
                             "apply_lora")


def save_adapter(model: nn.Module, config: LoraConfig, path: str | Path) -> Path:
    """Write the adapters (A and B only) to one safetensors file at ``path``, atomically, with
    ``config`` in its metadata; returns the path."""
    from safetensors.torch import save_file

    _check_matches(model, config)
    state = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    metadata = {"format": FORMAT, "version": str(FORMAT_VERSION),
                "lora_config": json.dumps(asdict(config))}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(path)


def _read_adapter(path: Path) -> tuple[LoraConfig, dict[str, Tensor]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise InputError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise InputError(f"{path}: not an lmforge LoRA adapter (a safetensors file "
                                 "written by save_adapter)")
            if meta.get("version") != str(FORMAT_VERSION):
                raise InputError(f"{path}: adapter format version {meta.get('version')!r}, "
                                 f"this lmforge reads version {FORMAT_VERSION}")
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as e:
        raise InputError(f"{path}: not a safetensors file ({e}); give a save_adapter file"
                         ) from None
    try:
        return LoraConfig(**json.loads(meta["lora_config"])), state
    except (KeyError, TypeError, ValueError) as e:  # ValueError: bad JSON or a ConfigError
        raise InputError(f"{path}: corrupt adapter config metadata ({e})") from None


def load_adapter(model: nn.Module, path: str | Path) -> LoraConfig:
    """Apply LoRA to the base ``model`` with the config saved in ``path`` and load its A and B;
    returns that config. A file that does not fit the model leaves the model untouched."""
    path = Path(path)
    config, state = _read_adapter(path)
    expected = {f"{n}.lora_{ab}.weight": shape for n, m in _targets(model, config).items()
                for ab, shape in (("A", (config.rank, m.in_features)),
                                  ("B", (m.out_features, config.rank)))}
    if state.keys() != expected.keys():
        missing, unexpected = sorted(expected.keys() - state), sorted(state.keys() - expected)
        raise InputError(f"{path}: adapter layers do not match the model (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}); was it saved from "
                         "another base model?")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise InputError(f"{path}: {key} has shape {tuple(state[key].shape)}, the model "
                             f"needs {shape}; the adapter was saved from another base model")
    apply_lora(model, config)
    with torch.no_grad():
        for key, value in lora_state_dict(model).items():
            value.copy_(state[key])
    return config


def peft_adapter_config(config: LoraConfig, base_model_name_or_path: str) -> dict[str, object]:
    """``adapter_config.json`` of a PEFT LoRA adapter with ``config``'s shape; PEFT fills in
    its defaults for the fields left out."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
            "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": list(config.targets), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "modules_to_save": None}


def export_peft(model: nn.Module, config: LoraConfig, out_dir: str | Path,
                base_model_name_or_path: str, force: bool = False) -> list[Path]:
    """Write the adapters as a PEFT LoRA directory (``adapter_config.json``,
    ``adapter_model.safetensors``) for the ``LlamaForCausalLM`` that
    :func:`lmforge.export.hf.export_hf` writes of the base; returns the files. A non-empty
    ``out_dir`` is refused unless ``force``."""
    from safetensors.torch import save_file

    _check_matches(model, config)
    out = Path(out_dir)
    check_output(out, force, directory=True)
    out.mkdir(parents=True, exist_ok=True)
    # PeftModel.base_model (LoraModel).model (LlamaForCausalLM).model (LlamaModel).layers…
    state = {f"base_model.model.model.{k}": v.contiguous().cpu()
             for k, v in lora_state_dict(model).items()}
    with atomic_path(out / "adapter_model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    config_json = peft_adapter_config(config, base_model_name_or_path)
    atomic_write_text(out / "adapter_config.json", json.dumps(config_json, indent=2))
    return [out / "adapter_config.json", out / "adapter_model.safetensors"]
