"""AWQ: activation-aware scaling of a float model before it is quantized (arXiv:2306.00978).

A few input channels carry much larger activations than the rest, so their weights matter most
to the output, yet rounding treats them like any other. AWQ multiplies those weight columns by
s > 1 (so they round relatively finer) and the input by 1/s — W·diag(s)·(x/s) = W·x exactly —
then quantizes as usual. The 1/s is folded into the op that produces the input, so inference
costs nothing extra:

==================  ==========================  ============================================
linears             their input comes from      1/s is folded into
==================  ==========================  ============================================
q, k, v             input_layernorm             its weight
o                   attention over v            v_proj's rows (a kv head's channels scale
                                                with the same s in every query head it serves)
gate, up            post_attention_layernorm    its weight
down                silu(gate) · up             up_proj's rows
==================  ==========================  ============================================

Per group, s = mean|x|^α per input channel (normalized so max·min = 1), with α from the paper's
grid {0, 0.05, …, 0.95} chosen to minimize the group's output error ‖Q(W·diag(s))·(x/s) − W·x‖²
on calibration activations, Q being round to nearest in the target mode. α = 0 gives s = 1, plain
round to nearest, so on those activations the search never does worse. The paper measures the
error at the output of the enclosing module (attention, MLP) instead; on the quickstart model
that was no better (docs/inference.md) and needs whole sequences, so the layers' own outputs are
used. (The paper also searches a weight clipping range; not done here.) The model stays in
floating point: quantize it after with :func:`~lmforge.quantize.rtn.quantize_model` or GPTQ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lmforge.errors import InputError
from lmforge.evaluating import evaluating
from lmforge.model import Block, RMSNorm, Transformer
from lmforge.progress import progress_bar
from lmforge.quantize.calibration import run_calibration
from lmforge.quantize.layers import Mode, check_mode, fake_quantize
from lmforge.quantize.rtn import check_group_size_fits, quantizable_linears

GRID = 20  # α ∈ {0, 1/20, …, 19/20}
MAX_ROWS = 4096  # calibration rows (tokens) kept per group for the search; mean|x| uses all


@dataclass
class ScaleGroup:
    """Linears that read one input, and the module producing that input."""

    name: str
    prev: nn.Module  # RMSNorm (weight (in,)) or nn.Linear (rows = the input's channels)
    linears: list[nn.Linear]
    repeat: int = 1  # o_proj: each of v's channels feeds this many query heads' channels
    head_dim: int = 0  # o_proj: channels per head

    def expand(self, s: Tensor) -> Tensor:
        """Scales of ``prev``'s output channels (n,) → of the linears' input channels."""
        if self.repeat == 1:
            return s
        # (n_kv_heads, head_dim) → (n_kv_heads, repeat, head_dim): query head h reads kv head
        # h // repeat, as enable_gqa / repeat_interleave lays them out.
        return s.view(-1, 1, self.head_dim).expand(-1, self.repeat, -1).flatten()

    def reduce(self, m: Tensor) -> Tensor:
        """Per-input-channel statistics → one per ``prev`` output channel (inverse layout)."""
        return m if self.repeat == 1 else m.view(-1, self.repeat, self.head_dim).mean(1).flatten()


def scale_groups(block: Block, prefix: str) -> list[ScaleGroup]:
    """The four groups of a block, in the order their inputs are computed."""
    attn, mlp = block.self_attn, block.mlp
    return [ScaleGroup(f"{prefix}.qkv", block.input_layernorm,
                       [attn.q_proj, attn.k_proj, attn.v_proj]),
            ScaleGroup(f"{prefix}.o", attn.v_proj, [attn.o_proj],
                       attn.n_heads // attn.n_kv_heads, attn.head_dim),
            ScaleGroup(f"{prefix}.gate_up", block.post_attention_layernorm,
                       [mlp.gate_proj, mlp.up_proj]),
            ScaleGroup(f"{prefix}.down", mlp.up_proj, [mlp.down_proj])]


@dataclass
class _Inputs:
    """What the search needs of a group's input: mean|x| per channel over every row, and every
    ``stride``-th row (N, in) on CPU."""

    stride: int
    abs_sum: Tensor | float = 0.0
    n: int = 0
    rows: list[Tensor] = field(default_factory=list)

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (B·T, in)
        self.abs_sum = self.abs_sum + x.abs().sum(0)
        self.n += x.shape[0]
        self.rows.append(x[::self.stride].cpu())


def search_scale(group: ScaleGroup, inputs: _Inputs, mode: Mode, group_size: int
                 ) -> tuple[Tensor, float]:
    """The scales s (n,) of ``prev``'s output channels minimizing the group's output error
    after quantization, and their α. Runs on CPU in float32."""
    x = torch.cat(inputs.rows)  # (N, in)
    W = torch.cat([m.weight.detach().float().cpu() for m in group.linears])  # (Σout, in)
    ref = x @ W.T  # (N, Σout)
    mean_abs = group.reduce(inputs.abs_sum.cpu() / inputs.n)
    best: tuple[float, Tensor, float] = (math.inf, torch.ones_like(mean_abs), 0.0)
    for i in range(GRID):
        alpha = i / GRID
        s = mean_abs.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s_in = group.expand(s)
        # rows are quantized independently (per channel / per row group), so the concatenated
        # weight quantizes exactly as its layers would one by one
        w_q = fake_quantize(W * s_in, mode, group_size) / s_in
        err = (x @ w_q.T - ref).pow(2).mean().item()
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


@torch.no_grad()
def fold_scale(group: ScaleGroup, s: Tensor) -> None:
    """Multiply the linears' input columns by s and divide ``prev``'s output by it: the float
    model computes the same function (up to rounding)."""
    s = s.to(group.prev.weight.device)
    s_in = group.expand(s)
    for linear in group.linears:
        linear.weight.mul_(s_in)  # (out, in) · (in,)
    if isinstance(group.prev, RMSNorm):
        group.prev.weight.div_(s)
    else:
        group.prev.weight.div_(s[:, None])  # rows
        if group.prev.bias is not None:
            group.prev.bias.div_(s)


@torch.no_grad()
def awq_scale_model(model: Transformer, calibration: list[Tensor], mode: Mode,
                    group_size: int = 128, progress: bool = False) -> dict[str, float]:
    """Fold AWQ scales into ``model``'s float weights in place, block by block, calibrated on
    batches of token ids (B, T); returns the α chosen per group (``layers.3.gate_up``: 0.45).

    Each block's inputs are captured with one pass over the calibration set; since folding
    keeps the function, later blocks see the activations of the original model.
    """
    check_mode(mode)
    if not calibration:
        raise InputError("awq: calibration must be a non-empty list of token-id batches")
    if mode == "int4":
        check_group_size_fits(quantizable_linears(model), group_size)
    stride = max(1, math.ceil(sum(ids.numel() for ids in calibration) / MAX_ROWS))
    alphas: dict[str, float] = {}
    with (evaluating(model),
          progress_bar(progress, total=4 * len(model.layers), desc="awq", unit="group") as bar):
        for i, block in enumerate(model.layers):
            groups = scale_groups(block, f"layers.{i}")
            inputs = [_Inputs(stride) for _ in groups]
            run_calibration(model, calibration,
                            {g.linears[0]: x.add for g, x in zip(groups, inputs, strict=True)})
            for group, x in zip(groups, inputs, strict=True):
                s, alphas[group.name] = search_scale(group, x, mode, group_size)
                fold_scale(group, s)
                bar.update()
    return alphas
