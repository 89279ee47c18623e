"""``lmforge quantize``: quantize a trained model, measure what it cost, write one file.

Load the checkpoint → validation bpb of the float model → quantize (rtn / gptq / awq / awq-gptq)
→ save a self-contained file → load that file as ``lmforge.load`` would → validation bpb again.
Both measurements run in the dtype the model will run in (bf16 on CPU exercises the fused
kernels), on the first ``eval_batches`` validation windows — the ones training validated on —
while calibration takes the last windows of the split (see :mod:`.calibration`).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from lmforge.config import check_at_least, option
from lmforge.data.manifest import load_manifest
from lmforge.errors import ConfigError, InputError
from lmforge.files import check_output
from lmforge.hardware import DTYPES, resolve_device, resolve_dtype
from lmforge.model import Transformer
from lmforge.quantize.awq import awq_scale_model
from lmforge.quantize.calibration import calibration_batches
from lmforge.quantize.gptq import gptq_quantize_model
from lmforge.quantize.io import save_quantized, size_report
from lmforge.quantize.layers import MODES, Mode, check_group_size
from lmforge.quantize.rtn import quantize_model
from lmforge.tokenizer import Tokenizer

Method = Literal["rtn", "gptq", "awq", "awq-gptq"]
METHODS = ("rtn", "gptq", "awq", "awq-gptq")


@dataclass
class QuantizeConfig:
    """Post-training weight-only quantization of a trained model (``lmforge quantize``)."""

    checkpoint: str = option("", "the float model: run directory (its best checkpoint), "
                                 "checkpoint file or Hugging Face directory")
    out: str = option("", "quantized model file to write, e.g. model.int4.safetensors")
    mode: Mode = option("int4", "int8: one scale per output channel; int4: one scale per "
                                "group_size input columns, two codes per byte")
    group_size: int = option(128, "int4: input columns sharing a scale (32, 64 or 128); must "
                                  "divide every quantized layer's input width")
    method: Method = option(
        "rtn", "rtn: round to nearest; gptq: error-compensating rounding (int4 only, "
               "arXiv:2210.17323); awq: activation-aware scaling, then rtn (arXiv:2306.00978); "
               "awq-gptq: activation-aware scaling, then gptq")
    data: str = option("", "prepared data directory whose validation split calibrates and "
                           "evaluates (default: the `data` of the run's config.json); it "
                           "must be tokenized with the model's tokenizer")
    batch_size: int = option(16, "sequences per evaluation and calibration batch")
    seq_len: int = option(0, "tokens per evaluation sequence (0: the model's context)")
    eval_batches: int = option(20, "validation batches bpb is measured on, from the start of the "
                                   "split (the windows training validated on)")
    calibration_batches: int = option(8, "gptq/awq calibration batches, from the end of the "
                                         "validation split, disjoint from the evaluation ones")
    calibration_seq_len: int = option(0, "tokens per calibration sequence (0: the model's "
                                         "context)")
    damp: float = option(0.01, "gptq: add damp·mean(diag H) to the Hessian's diagonal")
    device: str = option("cpu", "cpu, cuda or cuda:N (the fused int8/int4 kernels are CPU ones)")
    dtype: Literal["auto", "fp32", "bf16"] = option(
        "auto", "dtype the model runs in — evaluated in, and recorded in the file for "
                "lmforge.load: auto = bf16 where the hardware has bf16 matmuls (on CPU that runs "
                "the fused int8/int4 kernels), else fp32")
    progress: bool = option(True, "show progress bars")
    force: bool = option(False, "replace an existing output file")

    def __post_init__(self) -> None:
        for name in ("checkpoint", "out"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required")
        if self.mode not in MODES:
            raise ConfigError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method: must be one of {', '.join(METHODS)}, "
                              f"got {self.method!r}")
        if self.method.endswith("gptq") and self.mode != "int4":
            raise ConfigError(f"method: {self.method} writes int4 codes; use --mode int4, or "
                              "--method rtn / awq for int8")
        check_group_size(self.group_size, self.group_size)  # validity; the model checks fit
        check_at_least(self, 1, "batch_size", "eval_batches", "calibration_batches")
        check_at_least(self, 0, "seq_len", "calibration_seq_len")
        if not self.damp > 0:
            raise ConfigError(f"damp: must be > 0, got {self.damp}")
        if self.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"dtype: must be auto, fp32 or bf16, got {self.dtype!r}")


def apply_method(model: Transformer, calibration: list[Tensor], config: QuantizeConfig
                 ) -> dict[str, float]:
    """Quantize the float ``model`` in place with ``config``'s method, mode and group size;
    returns the α AWQ chose per group (empty for rtn and gptq)."""
    alphas: dict[str, float] = {}
    if config.method.startswith("awq"):
        alphas = awq_scale_model(model, calibration, config.mode, config.group_size,
                                 config.progress)
    if config.method.endswith("gptq"):
        gptq_quantize_model(model, calibration, config.group_size, config.damp,
                            progress=config.progress)
    else:
        quantize_model(model, config.mode, config.group_size)
    return alphas


def quantize(config: QuantizeConfig) -> dict[str, Any]:
    """Quantize ``config.checkpoint`` into ``config.out`` and report sizes and bpb before and
    after (a JSON-able dict; see docs/inference.md)."""
    from lmforge.eval.bpb import Validator, token_bytes
    from lmforge.loading import open_model

    start = time.perf_counter()
    check_output(config.out, config.force)
    device = resolve_device(config.device)
    loaded = open_model(config.checkpoint, device)
    if loaded.quantization is not None:
        raise InputError(f"{loaded.source}: already quantized ({loaded.quantization}); give the "
                         "float run, checkpoint or Hugging Face directory")
    model, tok = loaded
    data = config.data or (loaded.run.data_dir() if loaded.run is not None else None)
    if not data:
        raise ConfigError(f"data: {config.checkpoint} records no prepared data directory "
                          "(a run's config.json does); give --data")
    if not Path(data, "manifest.json").is_file():
        raise InputError(f"{data}: not a prepared data directory (no manifest.json)"
                         + ("" if config.data else f", as recorded in {loaded.run.config}; "
                            "give --data"))
    check_data_tokenizer(data, tok, loaded.source)
    seq_len = config.seq_len or model.config.context
    validator = Validator(data, token_bytes(tok), config.batch_size, seq_len,
                          config.eval_batches, device)
    if validator.batches < config.eval_batches:
        raise InputError(f"{data}: the validation split holds only {validator.batches} batches "
                         f"of {config.batch_size}×{seq_len}, not eval_batches="
                         f"{config.eval_batches}")
    eval_end = validator.batches * config.batch_size * seq_len + 1  # + the last target
    calibration: list[Tensor] = []
    calibration_range = None
    if config.method != "rtn":
        calibration, calibration_range = calibration_batches(
            data, config.batch_size, config.calibration_seq_len or model.config.context,
            config.calibration_batches, eval_end, device)
    dtype = resolve_dtype(config.dtype, device)
    no_autocast = contextlib.nullcontext()
    before = validator.run(copy.deepcopy(model).to(DTYPES[dtype]), no_autocast)
    fp32_bytes = size_report(model).total_bytes

    t = time.perf_counter()
    alphas = apply_method(model, calibration, config)
    quantize_seconds = time.perf_counter() - t
    sizes = size_report(model)
    out = save_quantized(model, config.out, tok, dtype,
                         info={"method": config.method, "source": str(loaded.source)})
    quantized = open_model(out, device).model  # measure what lmforge.load gives
    after = validator.run(quantized, no_autocast)
    file_bytes = out.stat().st_size

    report = {
        "out": str(out), "checkpoint": str(loaded.source), "kind": loaded.kind,
        "mode": config.mode, "method": config.method,
        "group_size": config.group_size if config.mode == "int4" else None, "dtype": dtype,
        "device": str(device), "data": str(data),
        "eval_tokens": [0, eval_end], "calibration_tokens": calibration_range,
        "val_bpb_before": round(before["val_bpb"], 5), "val_bpb_after": round(after["val_bpb"], 5),
        "bpb_change_pct": round(100 * (after["val_bpb"] / before["val_bpb"] - 1), 3),
        "val_loss_before": round(before["val_loss"], 5),
        "val_loss_after": round(after["val_loss"], 5),
        "file_bytes": file_bytes, "fp32_weights_bytes": fp32_bytes,
        "checkpoint_file_bytes": _bytes_on_disk(loaded.source),
        "file_vs_fp32": round(file_bytes / fp32_bytes, 4),
        "quantized_layers_bytes": sizes.quantized_bytes,
        "quantized_layers_fp32_bytes": sizes.quantized_fp32_bytes,
    }
    if alphas:  # α per group kind, averaged over blocks
        by_kind: dict[str, list[float]] = {}
        for name, alpha in alphas.items():
            by_kind.setdefault(name.rsplit(".", 1)[1], []).append(alpha)
        report["awq_mean_alpha"] = {k: round(sum(v) / len(v), 3) for k, v in by_kind.items()}
    report["quantize_seconds"] = round(quantize_seconds, 2)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def check_data_tokenizer(data: str | Path, tokenizer: Tokenizer, model_source: Path) -> None:
    """Refuse prepared data tokenized with another tokenizer than the model's: its bpb would
    be meaningless."""
    manifest = load_manifest(data)
    if manifest["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
        raise InputError(f"{data}: prepared with the tokenizer {manifest['tokenizer']['path']}, "
                         f"not the one of {model_source}; prepare the data with the model's "
                         "tokenizer, or give --data of the run it was trained on")


def _bytes_on_disk(source: Path) -> int:
    """Size of a model file, or of a directory's weight files."""
    if source.is_file():
        return source.stat().st_size
    return sum(p.stat().st_size for p in source.glob("*.safetensors"))
