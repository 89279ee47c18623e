"""Round-to-nearest quantization of a built model: swap its ``nn.Linear`` layers in place.

The model file knows nothing about this (gpt-fast style). The LM head and the embeddings stay in
floating point: the embedding is a lookup, not a matmul, and a tied LM head shares its matrix
with it (quantizing one copy would untie them).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.quantize.layers import Int4Linear, Int8Linear, Mode, check_group_size, check_mode

DEFAULT_SKIP = ("lm_head",)


def quantizable_linears(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP
                        ) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers to quantize, by qualified name: every one except those whose
    last name component is in ``skip`` and those sharing their weight with an embedding."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in skip
            and id(m.weight) not in embedding_weights}


def check_group_size_fits(linears: dict[str, nn.Linear], group_size: int) -> None:
    """ConfigError unless ``group_size`` divides every layer's input width — checked before
    any layer is touched, so a bad size leaves the model as it was."""
    for linear in linears.values():
        check_group_size(linear.in_features, group_size)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: Mode, group_size: int = 128,
                   skip: tuple[str, ...] = DEFAULT_SKIP) -> nn.Module:
    """Swap ``model``'s Linear layers in place for int8 or int4 ones (round to nearest) and
    return the model. The LM head (``skip``) and embeddings stay in floating point.

    ``group_size`` (int4 only) must divide every quantized layer's ``in_features``; a
    ConfigError leaves the model untouched.
    """
    check_mode(mode)
    linears = quantizable_linears(model, skip)
    if mode == "int4":
        check_group_size_fits(linears, group_size)
    for name, linear in linears.items():
        q = Int8Linear.from_linear(linear) if mode == "int8" else \
            Int4Linear.from_linear(linear, group_size)
        model.set_submodule(name, q.to(linear.weight.device))
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap ``model``'s int8/int4 layers back for float32 ``nn.Linear`` ones holding the weights
    they compute with, and cast the rest to float32: a plain float model (for export), which
    carries the quantization error. Returns the model."""
    for name, q in [(n, m) for n, m in model.named_modules()
                    if isinstance(m, Int8Linear | Int4Linear)]:
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None,
                           device=q.weight.device)
        linear.weight.copy_(q.dequantize())
        if q.bias is not None:
            linear.bias.copy_(q.bias)
        model.set_submodule(name, linear)
    return model.float()
