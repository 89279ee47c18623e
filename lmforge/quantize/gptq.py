"""GPTQ (arXiv:2210.17323): int4 codes chosen to keep each layer's *output* on calibration data.

Same layout as round-to-nearest :class:`~lmforge.quantize.layers.Int4Linear`, but the codes are
chosen column by column, each column's rounding error folded into the columns not yet quantized,
so that the layer's output on calibration activations moves as little as possible.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.errors import ConfigError, InputError
from lmforge.evaluating import evaluating
from lmforge.model import Transformer
from lmforge.progress import progress_bar
from lmforge.quantize.calibration import run_calibration
from lmforge.quantize.layers import (
    Int4Linear,
    check_group_size,
    int4_codes,
    int4_group_scales,
    pack_int4,
)
from lmforge.quantize.rtn import (
    DEFAULT_SKIP,
    check_group_size_fits,
    quantizable_linears,
)


def gptq_quantize_weight(weight: Tensor, hessian: Tensor, group_size: int,
                         damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """GPTQ (Algorithm 1) for one weight (out, in) with H = 2XᵀX/n (in, in).

    Columns are quantized left to right; column i's error, divided by [H⁻¹]ᵢᵢ from the upper
    Cholesky factor of H⁻¹, is subtracted from the later columns weighted by that factor's row i
    — the optimal brain surgeon update restricted to the not-yet-quantized columns. Each group's
    scale is taken from the error-updated weights when the group is reached. ``damp`` adds
    damp·mean(diag H) to the diagonal so that H is safely positive definite.

    Returns (packed codes (out, in/2) uint8, scales (out, in/group) float16), as
    :func:`~lmforge.quantize.layers.quantize_int4`. Unblocked: O(out·in²) time, fine for the
    small layers here.
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

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()  # (N, in)
        n_new = self.n + x.shape[0]
        self.H.mul_(self.n / n_new).add_(x.T @ x, alpha=2.0 / n_new)
        self.n = n_new


@torch.no_grad()
def gptq_quantize_model(model: Transformer, calibration: list[Tensor], group_size: int = 128,
                        damp: float = 0.01, skip: tuple[str, ...] = DEFAULT_SKIP,
                        progress: bool = False) -> Transformer:
    """Int4-quantize ``model`` in place with GPTQ, calibrated on batches of token ids (B, T).

    Block by block: forward hooks capture the inputs of the block's Linear layers while the
    whole calibration set runs through the model — whose earlier blocks are already quantized,
    so each block is fitted to the activations it will really see — then each layer is
    quantized from H = 2XᵀX/n and swapped for an :class:`Int4Linear`. Layers outside
    ``model.layers`` (other than ``skip`` and tied heads) are quantized last the same way.
    Costs one pass over the calibration set per block.
    """
    if not calibration:
        raise InputError("gptq: calibration must be a non-empty list of token-id batches")
    linears = quantizable_linears(model, skip)
    check_group_size_fits(linears, group_size)
    stages: list[list[str]] = [[n for n in linears if n.startswith(f"layers.{i}.")]
                               for i in range(len(model.layers))]
    staged = {n for stage in stages for n in stage}
    stages.append([n for n in linears if n not in staged])
    with (evaluating(model),
          progress_bar(progress, total=len(linears), desc="gptq", unit="layer") as bar):
        for stage in filter(None, stages):
            hessians = {n: _Hessian(linears[n].in_features) for n in stage}
            run_calibration(model, calibration, {linears[n]: hessians[n].add for n in stage})
            for n in stage:
                linear = linears[n]
                codes = gptq_quantize_weight(linear.weight.cpu(), hessians[n].H, group_size,
                                             damp)
                q = Int4Linear.from_linear(linear, group_size, codes)
                model.set_submodule(n, q.to(linear.weight.device))
                bar.update()
    return model
