"""The language model: a decoder-only, pre-norm transformer in the Llama layout.

Reads top to bottom: config → RMSNorm → RoPE → Attention → MLP → Block → Model. Token embedding →
``n_layers`` × (RMSNorm → causal self-attention → residual; RMSNorm → SwiGLU MLP → residual) →
final RMSNorm → LM head. Submodules carry Hugging Face Llama's names, so a state dict maps onto
``LlamaForCausalLM`` by prefixing ``model.`` to every key except ``lm_head.weight`` — no weight
permutation, because RoPE uses the same half-split ``rotate_half`` layout.

Nothing here knows about parallelism, compilation, quantization or adapters: those transform a
built model from the outside. There is no KV cache either; incremental decoding lives in
``inference/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import build, option
from lmforge.errors import ConfigError, InputError
from lmforge.fused_loss import linear_cross_entropy

# ----------------------------------------------------------------------------------------- config


@dataclass
class ModelConfig:
    """The architecture. Defaults are the ``tiny-cpu`` preset; sizes not listed are derived."""

    vocab_size: int = option(8192, "token ids are 0 .. vocab_size-1; match the tokenizer")
    d_model: int = option(128, "width of the residual stream")
    n_layers: int = option(6, "number of transformer blocks")
    n_heads: int = option(4, "query heads; head_dim = d_model // n_heads")
    n_kv_heads: int = option(2, "key/value heads shared by groups of query heads "
                                "(1: multi-query, n_heads: multi-head; GQA, arXiv:2305.13245)")
    context: int = option(256, "maximum sequence length (RoPE tables are built for this many)")
    rope_theta: float = option(10_000.0, "RoPE base θ; larger bases suit longer contexts")
    norm_eps: float = option(1e-5, "RMSNorm epsilon, added to the mean square before the rsqrt")
    tie_embeddings: bool = option(True, "share one matrix between token embedding and LM head")
    mlp_multiple: int = option(64, "round the derived SwiGLU width up to a multiple of this")
    ffn_dim: int | None = option(None, "explicit SwiGLU width; None derives it as "
                                       "round_up(8/3 · d_model, mlp_multiple) (Llama)")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "context",
                     "mlp_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        if self.ffn_dim is not None and (not isinstance(self.ffn_dim, int) or self.ffn_dim <= 0):
            raise ConfigError(f"ffn_dim: must be a positive integer or None, got {self.ffn_dim!r}")
        for name in ("rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"n_heads: d_model={self.d_model} is not divisible by "
                              f"n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_kv_heads: n_heads={self.n_heads} is not divisible by "
                              f"n_kv_heads={self.n_kv_heads}; each kv head serves a whole "
                              "group of query heads")
        if self.head_dim % 2:
            raise ConfigError(f"n_heads: head_dim = d_model // n_heads = {self.head_dim} must be "
                              "even, since RoPE rotates pairs of channels")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_width(self) -> int:
        """The SwiGLU hidden width actually used: ``ffn_dim`` or the Llama rule."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        m = self.mlp_multiple
        return -(-(8 * self.d_model // 3) // m) * m

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> ModelConfig:
        """The preset ``name`` from :data:`PRESETS` with some fields replaced."""
        if name not in PRESETS:
            raise ConfigError(f"preset: unknown model preset {name!r}; known: "
                              f"{', '.join(PRESETS)}")
        return build(cls, (f"preset {name}", PRESETS[name]), ("overrides", overrides))

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, from the config alone (no model is built).

        ``non_embedding`` leaves out the token-embedding lookup table but keeps the LM head,
        which is a matmul that costs compute (nanoGPT's convention). With tied embeddings the
        shared matrix is the LM head, so both counts agree.
        """
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        attention = d * d + 2 * d * kv + d * d  # q, k, v, o
        mlp = 3 * d * self.ffn_width  # gate, up, down
        block = attention + mlp + 2 * d  # + two RMSNorm weights
        head = self.vocab_size * d
        embedding = 0 if self.tie_embeddings else self.vocab_size * d
        n = self.n_layers * block + d + head  # + final norm
        return n if non_embedding else n + embedding

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at sequence length ``seq_len``.

        6·N + 12·n_layers·d_model·seq_len (PaLM, arXiv:2204.02311 appendix B; nanoGPT's
        estimate_mfu): every matmul weight, LM head included, costs 2 FLOPs forward and 4
        backward per token; attention scores and the weighted sum of values add
        2·2·d_model·seq_len forward per layer, ×3 for fwd+bwd. N = num_params(non_embedding=True).
        The causal mask's skipped half is not subtracted, as in the papers.
        """
        return 6 * self.num_params(non_embedding=True) + 12 * self.n_layers * self.d_model * seq_len


# Named architectures; ModelConfig.from_preset(name, **overrides) builds one.
PRESETS: dict[str, dict] = {
    # ~2.2M params (half of them the tied vocabulary matrix) for the 15-minute quickstart on a
    # 2-core CPU: a 16×256-token forward+backward takes ~0.6 s in fp32 (d_model 256 took ~1.05 s;
    # at this budget a smaller model sees more tokens per parameter). Vocab as the quickstart's.
    "tiny-cpu": dict(vocab_size=8192, d_model=128, n_layers=6, n_heads=4, n_kv_heads=2,
                     context=256),
    # TinyStories-scale (arXiv:2305.07759): ~17.6M params with tied embeddings.
    "tinystories-17m": dict(vocab_size=10_000, d_model=512, n_layers=4, n_heads=16,
                            n_kv_heads=16, context=256, ffn_dim=1344, rope_theta=10_000.0),
    # GPT-2 small's shape (vocab padded to a multiple of 64, as nanoGPT): ~124M params; the
    # derived SwiGLU width 2048 has as many weights as GPT-2's 4·d_model GELU MLP.
    "gpt2-124m": dict(vocab_size=50_304, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                      context=1024),
    # Llama 3.2 1B's body (d 2048, 16 layers, 32/8 heads, SwiGLU 8192) with a 32k vocabulary:
    # ~1.04B params; sized for multi-GPU training.
    "llama-1b": dict(vocab_size=32_000, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                     context=2048, ffn_dim=8192, rope_theta=500_000.0),
}

# ---------------------------------------------------------------------------------------- RMSNorm


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight (arXiv:1910.07467), computed in float32 as in Llama."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ------------------------------------------------------------------------------------------- RoPE


def rope_tables(head_dim: int, context: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of position·frequency, each (context, head_dim), in float32 (arXiv:2104.09864).

    Half-split layout (Hugging Face Llama): channel i and i + head_dim/2 form a rotated pair,
    so both halves of a row repeat the same head_dim/2 angles.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (context, head_dim)
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] → [-x2, x1] over the last dimension's two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, heads, T, head_dim) by position; cos/sin (T, head_dim). Math in float32."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


# -------------------------------------------------------------------------------------- Attention


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads and RoPE on queries and keys."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.head_dim
        d, kv = config.d_model, config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_proj(x).view(B, T, KV, D).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.v_proj(x).view(B, T, KV, D).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # enable_gqa lets each kv head serve n_heads // n_kv_heads query heads without copying
        # (measured on CPU: as fast or faster than repeat_interleave). Only asked for when the
        # head counts differ, since not every fused kernel accepts it.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KV != H)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, d_model)
        return self.o_proj(y)


# -------------------------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) · up(x)) (arXiv:2002.05202)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, h = config.d_model, config.ffn_width
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ------------------------------------------------------------------------------------------ Block


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


# ------------------------------------------------------------------------------------------ Model

INIT_STD = 0.02  # GPT-2 / Llama initializer range


class Transformer(nn.Module):
    """The decoder: ``model(ids)`` maps token ids (B, T) to next-token logits (B, T, vocab)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # RoPE tables, filled by init_weights: derived from the config, so not saved with the
        # weights; float32 even when the weights are not (though .to(dtype) casts them too).
        self.register_buffer("rope_cos", torch.empty(config.context, config.head_dim),
                             persistent=False)
        self.register_buffer("rope_sin", torch.empty(config.context, config.head_dim),
                             persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, 0.02) for every Linear and Embedding; the residual-branch outputs (o_proj,
        down_proj) N(0, 0.02/√(2·n_layers)) so the residual stream's variance does not grow
        with depth (GPT-2); RMSNorm weights 1. Also computes the RoPE tables, so a model built
        on the meta device and materialized with ``to_empty`` is complete after calling this."""
        if self.config.tie_embeddings:  # again: to_empty() gives each module its own storage
            self.lm_head.weight = self.embed_tokens.weight
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else INIT_STD
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        cos, sin = rope_tables(self.config.head_dim, self.config.context, self.config.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, ids: Tensor, targets: Tensor | None = None,
                reduction: Literal["mean", "none"] = "mean") -> Tensor:
        """Logits (B, T, vocab_size) for int64 ids (B, T), T ≤ config.context; position t only
        sees ids[:, :t+1]. Under autocast the logits come out in the autocast dtype.

        With ``targets`` (B, T) it returns the mean next-token cross-entropy instead (equal to
        ``lm_loss(model(ids), targets)``), computed chunk by chunk without materializing the
        logits — the training path. It stays inside ``forward`` so that DDP/FSDP hooks run.
        With ``reduction="none"``: each position's cross-entropy (B, T), float32, 0 where the
        target is -100 — only the scored positions go through the LM head (DPO, GRPO)."""
        if ids.shape[1] > self.config.context:
            raise InputError(f"sequence length {ids.shape[1]} exceeds the model's context "
                             f"{self.config.context}")
        T = ids.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, head_dim)
        x = self.embed_tokens(ids)  # (B, T, d_model)
        for layer in self.layers:
            x = layer(x, cos, sin)
        h = self.norm(x)  # (B, T, d_model)
        if targets is not None and reduction == "none":
            scored = targets != -100
            nll = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
            nll[scored] = F.cross_entropy(self.lm_head(h[scored]).float(), targets[scored],
                                          reduction="none")
            return nll
        if targets is not None:
            return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())
        return self.lm_head(h)  # (B, T, vocab_size)


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) against targets (B, T), in float32;
    positions whose target is ``ignore_index`` (padding, prompts) do not count."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=ignore_index)
