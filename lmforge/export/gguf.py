"""GGUF export for llama.cpp, through the ``gguf`` package (``pip install gguf``).

Architecture ``llama``: hyperparameters under ``llama.*``, the byte-level BPE tokenizer under
``tokenizer.ggml.*`` (model ``gpt2``; pre-tokenizer ``llama-bpe``, which is the cl100k/Llama 3
split, or ``gpt-2``), and the tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q``,
…, ``output_norm``, ``output`` unless tied). One transformation: llama.cpp's Llama applies RoPE to
*adjacent* channel pairs, while lmforge (like Hugging Face) rotates the two *halves* of each head,
so the rows of ``q_proj``/``k_proj`` are permuted per head from [x₀…x_{d/2-1}, y₀…] to
[x₀, y₀, x₁, y₁, …] — the inverse of the permutation transformers' Llama converter applies.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import ConfigError
from lmforge.files import atomic_path
from lmforge.model import Transformer
from lmforge.tokenizer import ENDOFTEXT, GPT2_PATTERN, GPT4_PATTERN, PAD, Tokenizer
from lmforge.tokenizer.bytelevel import bytes_to_str
from lmforge.vocab import check_vocab

_PRE = {GPT4_PATTERN: "llama-bpe", GPT2_PATTERN: "gpt-2"}
_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from half-split to adjacent-pair RoPE order, head by head."""
    out, d_in = weight.shape
    half = out // n_heads // 2
    return weight.reshape(n_heads, 2, half, d_in).transpose(1, 2).reshape(out, d_in)


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """llama.cpp tensor name → weight (float32, on CPU)."""
    cfg = model.config
    tensors = {"token_embd.weight": model.embed_tokens.weight,
               "output_norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        tensors["output.weight"] = model.lm_head.weight
    for i, block in enumerate(model.layers):
        for ours, theirs in _NAMES.items():
            w = block.get_submodule(ours).weight
            if ours == "self_attn.q_proj":
                w = interleave_rope_rows(w, cfg.n_heads)
            elif ours == "self_attn.k_proj":
                w = interleave_rope_rows(w, cfg.n_kv_heads)
            tensors[f"blk.{i}.{theirs}.weight"] = w
    return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}


def export_gguf(model: Transformer, tok: Tokenizer, path: str | Path) -> Path:
    """Write ``model`` and ``tok`` to one GGUF file (float32 tensors), atomically."""
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the gguf package (pip install gguf)") from None
    if tok.pattern not in _PRE:
        raise ConfigError("GGUF export supports the gpt4 (cl100k) and gpt2 split patterns; this "
                          "tokenizer uses a custom one that llama.cpp would not reproduce")
    cfg = model.config
    check_vocab(tok.vocab_size, cfg.vocab_size, "tokenizer", "model")
    specials = set(tok.special_tokens.values())
    vocab = tok.vocab
    # GGUF lists one token per embedding row: the rows of a padded vocabulary get unused
    # placeholder tokens, as llama.cpp's own converter writes them.
    tokens = [tok.decode_bytes([i]).decode() if i in specials else bytes_to_str(vocab[i])
              if i in vocab else f"[PAD{i}]" for i in range(cfg.vocab_size)]
    types = [gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL if i in vocab
             else gguf.TokenType.UNUSED for i in range(cfg.vocab_size)]
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="llama")
        w.add_name(path.stem)
        w.add_context_length(cfg.context)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.ffn_width)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_PRE[tok.pattern])
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges([f"{bytes_to_str(a)} {bytes_to_str(b)}" for a, b in tok.merges])
        if ENDOFTEXT in tok.special_tokens:
            w.add_eos_token_id(tok.special_tokens[ENDOFTEXT])
        if PAD in tok.special_tokens:
            w.add_pad_token_id(tok.special_tokens[PAD])
        w.add_add_bos_token(False)
        for name, tensor in gguf_tensors(model).items():
            w.add_tensor(name, tensor.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path
