"""Training benchmark: lmforge's model against a nanoGPT-style GPT-2 reference, in one run.

1. **Throughput**: training tokens/s on CPU (forward, cross-entropy, backward, clip, AdamW step)
   of lmforge's ``tiny-cpu`` model and of a plain GPT-2 of the same width and depth written here
   (LayerNorm with bias, 4× GELU MLP, learned positions, multi-head attention through SDPA, tied
   embeddings — nanoGPT's architecture), on the same batches, interleaved step by step. lmforge
   runs as ``lmforge train`` does (``model(x, y)``: the chunked fused LM-head loss; ``dtype=auto``:
   bf16 autocast where the CPU has bf16 matmuls); the reference as nanoGPT does on CPU (fp32, full
   logits + ``F.cross_entropy``). Same-dtype rows show where the difference comes from, and the
   LM-head loss alone (fp32, one thread) is timed fused against full logits + cross-entropy.
   Target ≥ 1.2×.
2. **Sample efficiency**: validation bits per byte after the same token budget on the built-in
   corpus, each model with its usual recipe — lmforge: the ``tiny-cpu`` recipe (lr 3e-3, β2 0.95,
   warmup 10%, cosine to 10%); reference: nanoGPT's defaults (lr 6e-4, β2 0.95, cosine to 10%,
   weight decay 0.1 on matrices). An ablation trains the reference with lmforge's learning rate
   too, to separate recipe from architecture. Target ≤ 0.95×.

Data: the quickstart's prepared directory (``make quickstart`` makes it), or ``--data DIR``.

    python benchmarks/train_bench.py [--data runs/quickstart/data] [--tokens 1000000] [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.loader import TokenLoader
from lmforge.data.manifest import load_manifest
from lmforge.eval.bpb import Validator, token_bytes
from lmforge.fused_loss import linear_cross_entropy
from lmforge.hardware import native_bf16
from lmforge.model import ModelConfig, Transformer, lm_loss
from lmforge.tokenizer import Tokenizer
from lmforge.train.optim import build_optimizer, lr_at

# ---------------------------------------------------------------- the nanoGPT-style reference


class RefBlock(nn.Module):
    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
                   for t in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class RefGPT(nn.Module):
    """GPT-2 as nanoGPT builds it (no dropout), sized like an lmforge config."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(RefBlock(cfg.d_model, cfg.n_heads)
                                    for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(
                    ("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# ------------------------------------------------------------------------------- measurement

Recipe = dict[str, float]
LMFORGE_RECIPE: Recipe = {"lr": 3e-3, "warmup": 0.1, "min_ratio": 0.1, "beta2": 0.95}
NANOGPT_RECIPE: Recipe = {"lr": 6e-4, "warmup": 0.1, "min_ratio": 0.1, "beta2": 0.95}


def make_step(model: nn.Module, recipe: Recipe, total: int, bf16: bool = False
              ) -> Callable[[int, torch.Tensor, torch.Tensor], float]:
    """One optimizer step. lmforge models take the fused loss path ``model(x, y)``."""
    opt = build_optimizer(model, recipe["lr"], 0.1, (0.9, recipe["beta2"]))
    fused = isinstance(model, Transformer)

    def step(i: int, x: torch.Tensor, y: torch.Tensor) -> float:
        for g in opt.param_groups:
            g["lr"] = lr_at(i, recipe["lr"], int(recipe["warmup"] * total), total,
                            recipe["min_ratio"])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, y) if fused else lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


BF16 = native_bf16(torch.device("cpu"))  # what lmforge's dtype=auto picks on this CPU
VARIANTS = {  # name → (model class, bf16 autocast)
    "lmforge (as lmforge train runs it)": (Transformer, BF16),
    "nanoGPT-style (fp32, as nanoGPT on CPU)": (RefGPT, False),
    "lmforge fp32": (Transformer, False),
    "nanoGPT-style bf16": (RefGPT, True),
}
OURS, REF = "lmforge (as lmforge train runs it)", "nanoGPT-style (fp32, as nanoGPT on CPU)"


def throughput(cfg: ModelConfig, data: Path, batch: int, seq: int, steps: int) -> dict[str, float]:
    """Interleaved timing (A, B, C, D, A, …) so all see the same machine conditions."""
    loader = TokenLoader(data, "train", batch, seq, seed=0)
    batches = [loader.next_batch() for _ in range(4)]
    steppers = {}
    for name, (cls, bf16) in VARIANTS.items():
        torch.manual_seed(0)
        steppers[name] = make_step(cls(cfg), LMFORGE_RECIPE, 1000, bf16)
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for i in range(steps + 2):
        for name, step in steppers.items():
            x, y = batches[i % len(batches)]
            t = time.perf_counter()
            step(i, x, y)
            if i >= 2:  # warm-up steps excluded
                times[name].append(time.perf_counter() - t)
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = batch * seq / ts[len(ts) // 2]  # median step
    return out


def lm_head_speedup(cfg: ModelConfig, rows: int, steps: int) -> float:
    """Plain / fused time of the LM-head loss forward + backward (fp32, one thread, interleaved
    medians): ``F.cross_entropy(h @ W.T)`` against :func:`linear_cross_entropy`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = (0.02 * torch.randn(cfg.vocab_size, cfg.d_model)).requires_grad_()
    h = torch.randn(rows, cfg.d_model, requires_grad=True)
    t = torch.randint(0, cfg.vocab_size, (rows,))
    losses = {"fused": lambda: linear_cross_entropy(h, w, t),
              "plain": lambda: F.cross_entropy(h @ w.T, t)}
    times: dict[str, list[float]] = {k: [] for k in losses}
    for i in range(steps + 2):
        for name, loss in losses.items():
            start = time.perf_counter()
            loss().backward()
            if i >= 2:  # warm-up steps excluded
                times[name].append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return median["plain"] / median["fused"]


def train_to_budget(model: nn.Module, recipe: Recipe, data: Path, batch: int, seq: int,
                    tokens: int, validator: Validator, bf16: bool) -> dict[str, float]:
    steps = tokens // (batch * seq)
    loader = TokenLoader(data, "train", batch, seq, seed=0)  # the same batches for every model
    step = make_step(model, recipe, steps, bf16)
    t = time.perf_counter()
    for i in range(steps):
        step(i, *loader.next_batch())
    return {**validator.run(model, torch.autocast("cpu", enabled=False)), "steps": steps,
            "seconds": time.perf_counter() - t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/quickstart/data")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="sample-efficiency budget")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny budget")
    args = parser.parse_args()
    data = Path(args.data)
    tok = Tokenizer.load(load_manifest(data)["tokenizer"]["path"])
    cfg = ModelConfig.from_preset("tiny-cpu", vocab_size=tok.vocab_size)
    batch, seq = 16, 256
    print(f"# Training benchmark — tiny-cpu shape (d {cfg.d_model}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads), batch {batch}×{seq}, {torch.get_num_threads()} threads\n")

    params = {"lmforge": sum(p.numel() for p in Transformer(cfg).parameters()),
              "nanoGPT-style": sum(p.numel() for p in RefGPT(cfg).parameters())}
    print(f"params: lmforge {params['lmforge'] / 1e6:.2f}M, nanoGPT-style "
          f"{params['nanoGPT-style'] / 1e6:.2f}M; CPU bf16 matmuls: {BF16}\n")
    tp = throughput(cfg, data, batch, seq, steps=3 if args.quick else 12)
    print("| variant | tokens/s (median step) |\n|---|---|")
    for name, value in tp.items():
        print(f"| {name} | {value:,.0f} |")
    head = lm_head_speedup(cfg, batch * seq, steps=3 if args.quick else 12)
    print(f"\nthroughput ratio lmforge / nanoGPT-style, each as run by default: "
          f"**{tp[OURS] / tp[REF]:.2f}×** (target ≥ 1.2×); same dtype: fp32 "
          f"{tp['lmforge fp32'] / tp[REF]:.2f}×, bf16 "
          f"{tp[OURS] / tp['nanoGPT-style bf16']:.2f}×; the LM-head loss alone (fp32, 1 thread), "
          f"fused vs full logits: {head:.2f}×\n")

    budget = 40_000 if args.quick else args.tokens
    validator = Validator(data, token_bytes(tok), batch, seq, 20, torch.device("cpu"))
    ours, ref, ablation = ("lmforge (its recipe)", "nanoGPT-style (its recipe)",
                           "nanoGPT-style (lmforge's lr)")
    runs = {}
    for name, build, recipe, bf16 in ((ours, Transformer, LMFORGE_RECIPE, BF16),
                                      (ref, RefGPT, NANOGPT_RECIPE, False),
                                      (ablation, RefGPT, LMFORGE_RECIPE, False)):
        torch.manual_seed(0)
        runs[name] = train_to_budget(build(cfg), recipe, data, batch, seq, budget, validator,
                                     bf16)
        print(f"  trained {name}: {runs[name]}", flush=True)
    print("\n| model | tokens | val loss | val bpb | seconds |\n|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {budget:,} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | "
              f"{r['seconds']:.0f} |")
    bpb = {name: r["val_bpb"] for name, r in runs.items()}
    print(f"\nbpb ratio lmforge / nanoGPT-style (its recipe): **{bpb[ours] / bpb[ref]:.3f}×** "
          f"(target ≤ 0.95×); vs nanoGPT-style at lmforge's lr: {bpb[ours] / bpb[ablation]:.3f}×")


if __name__ == "__main__":
    main()
