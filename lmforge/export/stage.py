"""``lmforge export hf|gguf|peft``: write any model ``lmforge.load`` opens in another format, or a
LoRA run's adapters in PEFT's format beside its base."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.config import option
from lmforge.errors import ConfigError
from lmforge.files import check_output

Format = Literal["hf", "gguf", "peft"]


@dataclass
class ExportConfig:
    """What ``lmforge export`` reads and writes."""

    checkpoint: str = option("", "the model: run directory, checkpoint file, quantized file "
                                 "(written dequantized) or Hugging Face directory")
    out: str = option("", "hf, peft: the directory to write; gguf: the .gguf file to write")
    force: bool = option(False, "replace an existing output")

    def __post_init__(self) -> None:
        for name in ("checkpoint", "out"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required")


def export_model(config: ExportConfig, fmt: Format, notify: Callable[[str], None]
                 ) -> list[Path]:
    """Open ``config.checkpoint`` and write it as ``fmt``; returns the files written. A quantized
    model is dequantized first, and ``notify`` says so."""
    from lmforge.loading import float_model, open_model

    check_output(config.out, config.force, directory=fmt != "gguf")
    if fmt == "peft":
        return export_adapter(config)
    loaded = open_model(config.checkpoint)
    model = float_model(loaded, f"export {fmt}", notify)
    if fmt == "hf":
        from lmforge.export.hf import export_hf

        return export_hf(model, loaded.tokenizer, config.out)
    from lmforge.export.gguf import export_gguf

    return [export_gguf(model, loaded.tokenizer, config.out)]


def export_adapter(config: ExportConfig) -> list[Path]:
    """A LoRA run as PEFT reads it: ``OUT/adapter_config.json`` and
    ``OUT/adapter_model.safetensors``, with the base model (the weights under the adapters) as a
    Hugging Face directory in ``OUT/base``, which the adapter config names by its absolute path:
    ``peft.AutoPeftModelForCausalLM.from_pretrained(OUT)`` loads both."""
    import copy

    from lmforge.export.hf import export_hf
    from lmforge.finetune.lora import LoraConfig, export_peft, lora_modules
    from lmforge.loading import open_model

    loaded = open_model(config.checkpoint, merge_adapters=False)
    adapters = lora_modules(loaded.model)
    if not adapters or loaded.run is None:
        raise ConfigError(f"checkpoint: {config.checkpoint} is not a LoRA fine-tuning run; "
                          "export peft writes adapters (export hf writes whole models)")
    if loaded.quantization:
        raise ConfigError(f"checkpoint: {config.checkpoint} has a {loaded.quantization} base, "
                          "which PEFT cannot load as such; export hf writes it dequantized with "
                          "the adapters merged")
    lora = LoraConfig(**loaded.run.recorded_config()["train"]["lora"])
    base = copy.deepcopy(loaded.model)
    for name, module in lora_modules(base).items():
        base.set_submodule(name, module.base_layer)
    out = Path(config.out)
    written = export_hf(base, loaded.tokenizer, out / "base")
    return [*export_peft(loaded.model, lora, out, str((out / "base").resolve()),
                         force=True), *written]
