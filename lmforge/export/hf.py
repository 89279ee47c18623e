"""Hugging Face Llama format: ``config.json``, ``model.safetensors``, ``generation_config.json``,
``tokenizer.json`` + ``tokenizer_config.json`` — loadable by ``transformers.AutoModelForCausalLM``
and ``AutoTokenizer`` with the same logits and ids as lmforge (tested, fp32 max |Δ| < 1e-4).

lmforge's modules carry Llama's names and RoPE layout, so the weights only gain a ``model.``
prefix (``lm_head.weight`` excepted); nothing is permuted. The reverse, :func:`load_hf_model`,
reads a Llama directory saved by transformers (one ``model.safetensors`` or an index of shards).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import InputError
from lmforge.files import atomic_path, atomic_write_text
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import ENDOFTEXT, PAD, Tokenizer
from lmforge.tokenizer.hf import load_hf, save_hf
from lmforge.vocab import check_vocab


def hf_config(cfg: ModelConfig, tok: Tokenizer) -> dict[str, Any]:
    """``config.json`` of a ``LlamaForCausalLM`` with ``cfg``'s shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_width,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context,
        "rms_norm_eps": cfg.norm_eps,
        # Older transformers read the top-level key, 5.x reads rope_parameters: write both.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": tok.special_tokens.get(ENDOFTEXT),
        "pad_token_id": tok.special_tokens.get(PAD),
    }


def export_hf(model: Transformer, tok: Tokenizer, out_dir: str | Path) -> list[Path]:
    """Write ``model`` and ``tok`` as a Hugging Face Llama directory; returns the files."""
    from safetensors.torch import save_file

    cfg = model.config
    check_vocab(tok.vocab_size, cfg.vocab_size, "tokenizer", "model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k if k == "lm_head.weight" else f"model.{k}": v.detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:  # one tensor, stored once; HF re-ties it from the config
        state.pop("lm_head.weight")
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(hf_config(cfg, tok), indent=2))
    generation = {"eos_token_id": tok.special_tokens.get(ENDOFTEXT),
                  "pad_token_id": tok.special_tokens.get(PAD), "do_sample": True,
                  "temperature": 0.8, "top_k": 50}
    atomic_write_text(out / "generation_config.json", json.dumps(generation, indent=2))
    save_hf(tok, out, model_max_length=cfg.context)
    names = ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
             "tokenizer_config.json"]
    return [out / n for n in names]


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        raise InputError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(directory / shard)))
    return state


def load_hf_model(directory: str | Path) -> tuple[Transformer, Tokenizer]:
    """A Llama-architecture directory saved by transformers, as an lmforge model + tokenizer."""
    directory = Path(directory)
    try:
        hf = json.loads((directory / "config.json").read_text())
    except FileNotFoundError:
        raise InputError(f"{directory}: no config.json (not a Hugging Face model directory)"
                         ) from None
    if hf.get("model_type") != "llama":
        raise InputError(f"{directory}: model_type {hf.get('model_type')!r} is not supported "
                         "(lmforge reads the Llama architecture)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise InputError(f"{directory}: biased attention/MLP projections are not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise InputError(f"{directory}: RoPE scaling {rope.get('rope_type')!r} is not supported")
    heads = hf["num_attention_heads"]
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        context=hf["max_position_embeddings"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings")),
        ffn_dim=hf["intermediate_size"])
    if hf.get("head_dim", cfg.head_dim) != cfg.head_dim:
        raise InputError(f"{directory}: head_dim {hf['head_dim']} differs from hidden_size / "
                         "num_attention_heads, which lmforge's attention assumes")
    state = {k.removeprefix("model."): v.float() for k, v in _read_weights(directory).items()
             if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{directory}: weights do not match a Llama of this config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), load_hf(directory)
