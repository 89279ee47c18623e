"""``lmforge export hf|gguf``: write any model ``lmforge.load`` opens in another format."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.config import option
from lmforge.errors import ConfigError
from lmforge.files import check_output

Format = Literal["hf", "gguf"]


@dataclass
class ExportConfig:
    """What ``lmforge export`` reads and writes."""

    checkpoint: str = option("", "the model: run directory, checkpoint file, quantized file "
                                 "(written dequantized) or Hugging Face directory")
    out: str = option("", "hf: the directory to write; gguf: the .gguf file to write")
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

    check_output(config.out, config.force, directory=fmt == "hf")
    loaded = open_model(config.checkpoint)
    model = float_model(loaded, f"export {fmt}", notify)
    if fmt == "hf":
        from lmforge.export.hf import export_hf

        return export_hf(model, loaded.tokenizer, config.out)
    from lmforge.export.gguf import export_gguf

    return [export_gguf(model, loaded.tokenizer, config.out)]
