"""Quantized model files, and how many bytes a quantized model takes.

A quantized file is one safetensors file, self-contained: the model's tensors (integer codes,
scales; the embedding and norms in the dtype the model runs in; a tied LM head once) and, in the
header's string metadata, the :class:`~lmforge.model.ModelConfig`, the quantization (mode, group
size, which layers), that dtype and — when given — the tokenizer's JSON. So
``lmforge.load("model.int4.safetensors")`` needs no other file, and recognizing one costs a
read of its header, not of the weights (and no unpickling).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmforge.errors import ConfigError, InputError
from lmforge.files import atomic_path
from lmforge.hardware import DTYPES, DType
from lmforge.model import ModelConfig, Transformer
from lmforge.quantize.layers import MODES, Int4Linear, Int8Linear
from lmforge.vocab import check_vocab

if TYPE_CHECKING:
    from lmforge.tokenizer import Tokenizer

FORMAT = "lmforge-quantized"
FORMAT_VERSION = 2  # 2: safetensors + JSON metadata (1 was a torch.save pickle)


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


def save_quantized(model: Transformer, path: str | Path, tokenizer: Tokenizer | None = None,
                   dtype: DType = "fp32", info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (quantized) to one safetensors file at ``path``, atomically; returns it.

    ``tokenizer`` is embedded so that :func:`open_quantized` (and ``lmforge.load``) need nothing
    else; ``dtype`` is what :func:`open_quantized` casts the model to (bf16 on CPU runs the
    fused int8/int4 kernels), and the float parameters (embedding, norms) are stored in it —
    bf16 halves them at no cost to the model as it runs; ``info`` is free-form provenance
    (method, source checkpoint)."""
    from safetensors.torch import save_model

    if dtype not in DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    mode, group_size, names = quantization_of(model)
    if DTYPES[dtype] != torch.float32:
        model = copy.deepcopy(model)
        for p in model.parameters():  # the quantized layers hold buffers, not parameters
            p.data = p.data.to(DTYPES[dtype])
    metadata = {"format": FORMAT, "version": str(FORMAT_VERSION),
                "model_config": json.dumps(asdict(model.config)), "mode": mode,
                "group_size": json.dumps(group_size), "quantized": json.dumps(names),
                "dtype": dtype, "info": json.dumps(info or {})}
    if tokenizer is not None:
        metadata["tokenizer"] = tokenizer.to_json()
    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata)  # stores a tied matrix once
    return Path(path)


def quantized_metadata(path: str | Path) -> dict[str, str] | None:
    """The header metadata of an lmforge quantized file, or None when ``path`` is something
    else (a training checkpoint, another safetensors file, …). Reads only the header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)  # safetensors: little-endian u64 header length, then the JSON header
        length = int.from_bytes(head, "little")
        if len(head) < 8 or length > size - 8:
            return None
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _load(path: str | Path, device: str | torch.device) -> tuple[Transformer, dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such quantized model file")
    meta = quantized_metadata(path)
    if meta is None:
        raise InputError(f"{path}: not an lmforge quantized model (a safetensors file with "
                         f"\"format\": \"{FORMAT}\" metadata, written by lmforge quantize)")
    if meta.get("version") != str(FORMAT_VERSION):
        raise InputError(f"{path}: quantized format version {meta.get('version')!r}, this "
                         f"lmforge reads version {FORMAT_VERSION}")
    try:
        config = ModelConfig(**json.loads(meta["model_config"]))
        mode, group_size = meta["mode"], json.loads(meta["group_size"])
        names = json.loads(meta["quantized"])
    except (KeyError, TypeError, ValueError) as e:  # ValueError: bad JSON or a ConfigError
        raise InputError(f"{path}: corrupt quantized model metadata ({type(e).__name__}: {e})"
                         ) from None
    if mode not in MODES or meta.get("dtype", "fp32") not in DTYPES:
        raise InputError(f"{path}: unknown mode {mode!r} or dtype {meta.get('dtype')!r} in the "
                         f"metadata (expected one of {MODES} and {tuple(DTYPES)})")
    model = Transformer(config)
    for name in names:
        try:
            linear = model.get_submodule(name)
            q = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None) \
                if mode == "int8" else Int4Linear(linear.in_features, linear.out_features,
                                                  group_size, linear.bias is not None)
        except (AttributeError, ConfigError) as e:
            raise InputError(f"{path}: quantized layer {name!r} does not fit the model config "
                             f"({e})") from None
        model.set_submodule(name, q)
    try:
        load_model(model, str(path))
    except (RuntimeError, SafetensorError) as e:
        reason = (str(e).strip().splitlines() or [""])[-1].strip()
        raise InputError(f"{path}: tensors do not match the metadata ({reason})") from None
    return model.to(device), meta


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """The model saved by :func:`save_quantized`, quantized layers and all, its floating-point
    tensors as they were saved."""
    return _load(path, device)[0]


def open_quantized(path: str | Path, device: str | torch.device = "cpu"
                   ) -> tuple[Transformer, Tokenizer]:
    """``(model, tokenizer)`` ready to run, from a file :func:`save_quantized` wrote with a
    tokenizer: the model in eval mode and in its recorded dtype. What ``lmforge.load`` uses."""
    from lmforge.tokenizer import Tokenizer

    model, meta = _load(path, device)
    if "tokenizer" not in meta:
        raise InputError(f"{path}: saved without a tokenizer; save it with "
                         "save_quantized(model, path, tokenizer) or `lmforge quantize`")
    tokenizer = Tokenizer.from_json(meta["tokenizer"], f"{path} (embedded tokenizer)")
    check_vocab(tokenizer.vocab_size, model.config.vocab_size, path, path)
    return model.to(DTYPES[meta.get("dtype", "fp32")]).eval(), tokenizer


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
