"""Opening a model: the one place that knows every kind of model file lmforge reads.

``lmforge.load(PATH)`` (= :func:`open_model`) accepts

- a **run directory** (``lmforge train`` or ``lmforge finetune``): its best checkpoint, else its
  latest; a directory that holds a run in ``train/`` (the quickstart's) is read as that run; a
  LoRA fine-tuning run opens as its base with the adapters merged in;
- a **checkpoint file** ``RUN/checkpoints/step_N.pt``, read with its run's tokenizer;
- a **quantized file** (``lmforge quantize``): self-contained safetensors with its tokenizer;
- a **Hugging Face Llama directory** (``config.json`` + safetensors + ``tokenizer.json``),

and says what it opened (:class:`Loaded`), so that a stage can refuse the wrong kind with a
message instead of misreading it (exporting INT4 codes as float weights, say).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.errors import ConfigError, InputError
from lmforge.hardware import DTYPES
from lmforge.rundir import TOKENIZER_FILE, RunDir
from lmforge.tokenizer import Tokenizer
from lmforge.vocab import check_vocab

Kind = Literal["run", "checkpoint", "quantized", "hf"]
KIND_NAMES = {"run": "run directory", "checkpoint": "checkpoint file",
              "quantized": "quantized model file", "hf": "Hugging Face model directory"}


@dataclass
class Loaded:
    """A model ready to run, its tokenizer, and what it was opened from.

    Unpacks as ``model, tokenizer = lmforge.load(PATH)``.
    """

    model: nn.Module
    tokenizer: Tokenizer
    kind: Kind
    source: Path  # the file the weights came from (for a run: the checkpoint chosen)
    run: RunDir | None  # the run directory, for runs and checkpoint files
    quantization: str | None  # "int8" / "int4" for quantized files

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer))

    @property
    def dtype(self) -> str:
        """The dtype of the model's floating-point weights ("fp32", "bf16", …)."""
        dtype = next(p.dtype for p in self.model.parameters())
        return next((name for name, d in DTYPES.items() if d == dtype), str(dtype))

    def describe(self) -> str:
        """One line: what was opened, from where, in which dtype."""
        what = KIND_NAMES[self.kind]
        where = self.run.path if self.run is not None else self.source
        detail = f" (checkpoint {self.source.name})" if self.kind == "run" else ""
        quant = f", {self.quantization} weights" if self.quantization else ""
        return f"{what} {where}{detail}, {self.dtype}{quant}"


def open_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: str | None = None, merge_adapters: bool = True) -> Loaded:
    """Open the model at ``path`` (any kind above) on ``device``. ``dtype`` ("fp32"/"bf16")
    casts the floating-point weights; None keeps them as stored (checkpoints: fp32; quantized
    files: the dtype they were evaluated in). A LoRA fine-tuning run's adapters are merged into
    its weights unless ``merge_adapters`` is False (to export them alone)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not str(path):  # Path("") would read as ".", the current directory
        raise ConfigError("checkpoint: required: a run directory, checkpoint file, quantized "
                          "model file or Hugging Face model directory")
    loaded = _open(Path(path), merge_adapters)
    loaded.model = loaded.model.to(device).eval()
    if dtype is not None:
        loaded.model = loaded.model.to(DTYPES[dtype])
    return loaded


def _open(path: Path, merge: bool) -> Loaded:
    from lmforge.quantize.io import open_quantized, quantized_metadata

    if not path.exists():
        raise InputError(f"{path}: no such checkpoint file, run directory, quantized model file "
                         "or Hugging Face model directory")
    if path.is_file():
        meta = quantized_metadata(path)
        if meta is not None:
            model, tok = open_quantized(path)
            return Loaded(model, tok, "quantized", path, None, meta.get("mode"))
        return _open_checkpoint(path, "checkpoint", merge)
    run = find_run(path)
    if run is not None:
        return _open_checkpoint(best_checkpoint(run), "run", merge)
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: neither a run directory (no checkpoints/ or {TOKENIZER_FILE})"
                         " nor a Hugging Face model directory (no config.json)")
    from lmforge.export.hf import load_hf_model

    model, tok = load_hf_model(path)
    tok_file = path / "tokenizer.json"
    check_vocab(tok.vocab_size, model.config.vocab_size, tok_file if tok_file.is_file() else path,
                path / "config.json")
    return Loaded(model, tok, "hf", path, None, None)


def find_run(path: str | Path) -> RunDir | None:
    """The run directory at ``path``, or in ``path/train`` (the quickstart's layout); None if
    ``path`` holds no run."""
    candidates = (RunDir(path), RunDir(Path(path) / "train"))
    # a run with checkpoints first: the quickstart's directory also holds a tokenizer file
    return (next((c for c in candidates if c.checkpoints.is_dir()), None)
            or next((c for c in candidates if c.exists()), None))


def best_checkpoint(run: RunDir) -> Path:
    """A run's best checkpoint by validation loss, else its latest."""
    from lmforge.train.checkpoint import Checkpoints

    ckpts = Checkpoints(run)
    found = ckpts.best() or ckpts.latest()
    if found is None:
        raise InputError(f"{run.path}: run directory has no checkpoints (has its training saved "
                         "one yet? checkpoints are written every --save-every steps)")
    return found


def _open_checkpoint(ckpt: Path, kind: Kind, merge: bool = True) -> Loaded:
    from lmforge.model import ModelConfig, Transformer
    from lmforge.train.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt)
    run = RunDir.of_checkpoint(ckpt)
    if not run.tokenizer.is_file():
        raise InputError(f"{ckpt}: its run's tokenizer {run.tokenizer} is missing (a checkpoint "
                         f"file is read with the {TOKENIZER_FILE} of its run directory)")
    tokenizer = Tokenizer.load(run.tokenizer)
    check_vocab(tokenizer.vocab_size, state["model_config"]["vocab_size"], run.tokenizer, ckpt)
    if tokenizer.fingerprint != state["tokenizer_fingerprint"]:
        raise InputError(f"{run.tokenizer}: tokenizer does not match the checkpoint {ckpt}")
    model = Transformer(ModelConfig(**state["model_config"]))
    record = state.get("config") or {}
    if record.get("lora"):
        model, quantization = _with_adapters(model, state, record, ckpt, merge)
        return Loaded(model, tokenizer, kind, ckpt, run, quantization)
    model.load_state_dict(state["model"])
    return Loaded(model, tokenizer, kind, ckpt, run, None)


def _with_adapters(model: nn.Module, state: dict[str, Any], record: dict[str, Any], ckpt: Path,
                   merge: bool) -> tuple[nn.Module, str | None]:
    """The model of a LoRA fine-tuning checkpoint: its base with the adapters, merged into the
    weights when ``merge`` and the base is float. A quantized base (QLoRA) is read again from
    the file the run recorded, since a checkpoint's tensors alone do not say how it was
    quantized; its adapters stay unmerged."""
    from lmforge.finetune.lora import LoraConfig, apply_lora, merge_lora

    quantization = (record.get("base") or {}).get("quantization")
    if quantization:
        from lmforge.quantize.io import load_quantized

        source = Path(record["base"]["source"])
        if not source.is_file():
            raise InputError(f"{ckpt}: this LoRA run's quantized base {source} is missing; "
                             "put it back or fine-tune again")
        model = load_quantized(source)
    apply_lora(model, LoraConfig(**record["lora"]))
    model.load_state_dict(state["model"])
    return (merge_lora(model) if merge and not quantization else model), quantization


def float_model(loaded: Loaded, action: str, notify: Callable[[str], None]) -> nn.Module:
    """``loaded``'s model with float weights for ``action`` (e.g. "export hf"): a quantized
    model is dequantized — and ``notify`` says so, since the result carries the quantization
    error, not the original weights."""
    if loaded.quantization is None:
        return loaded.model
    from lmforge.quantize.rtn import dequantize_model

    notify(f"note: {loaded.source} holds {loaded.quantization} weights; {action} writes them "
           "dequantized to float32 (the quantization error stays; export the float run or "
           "checkpoint for the original weights)")
    return dequantize_model(loaded.model)
