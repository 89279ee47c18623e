"""GGUF export: read back with gguf's own reader; tensors, metadata and the RoPE layout."""

from __future__ import annotations

import pytest
import torch

from lmforge.export.gguf import export_gguf, gguf_tensors, interleave_rope_rows
from lmforge.model import apply_rope, rope_tables
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.bytelevel import bytes_to_str

from .conftest import random_model, synthetic_documents

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_reads_back_with_the_same_tensors_and_metadata(tokenizer, tmp_path, tie):
    model = random_model(tokenizer.vocab_size, tie)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    cfg = model.config
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == cfg.n_layers
    assert fields["llama.attention.head_count"] == cfg.n_heads
    assert fields["llama.attention.head_count_kv"] == cfg.n_kv_heads
    assert fields["llama.feed_forward_length"] == cfg.ffn_width
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.special_tokens["<|endoftext|>"]
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == tokenizer.vocab_size
    assert tokens[tokenizer.special_tokens["<|endoftext|>"]] == "<|endoftext|>"
    assert tokens[:256] == [bytes_to_str(bytes([b])) for b in range(256)]
    assert fields["tokenizer.ggml.merges"][0] == " ".join(map(bytes_to_str, tokenizer.merges[0]))

    written = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    expected = gguf_tensors(model)
    assert set(written) == set(expected) and ("output.weight" in written) != tie
    for name, tensor in expected.items():
        assert torch.equal(written[name].reshape(tensor.shape), tensor), name
    # Undo the RoPE row permutation: the original projections come back exactly.
    q = written["blk.0.attn_q.weight"].reshape(cfg.d_model, cfg.d_model)
    inverse = q.reshape(cfg.n_heads, cfg.head_dim // 2, 2, -1).transpose(1, 2).reshape(q.shape)
    assert torch.equal(inverse, model.layers[0].self_attn.q_proj.weight)


def test_row_permutation_turns_half_split_rope_into_adjacent_pair_rope():
    """Attention scores with llama.cpp's adjacent-pair RoPE on the permuted weights equal ours."""
    torch.manual_seed(0)
    heads, hd, d, T = 2, 8, 16, 5
    wq, wk, x = torch.randn(heads * hd, d), torch.randn(heads * hd, d), torch.randn(T, d)
    cos, sin = rope_tables(hd, T, 10_000.0)  # (T, hd)

    def half_split(w):
        return apply_rope((x @ w.T).view(T, heads, hd).transpose(0, 1), cos, sin)

    def adjacent_pairs(w):
        y = (x @ w.T).view(T, heads, hd // 2, 2).transpose(0, 1)  # (heads, T, hd/2, 2)
        c, s = cos[:, : hd // 2, None], sin[:, : hd // 2, None]
        rotated = torch.stack([y[..., 0] * c[..., 0] - y[..., 1] * s[..., 0],
                               y[..., 0] * s[..., 0] + y[..., 1] * c[..., 0]], dim=-1)
        return rotated.flatten(-2)

    ours = half_split(wq) @ half_split(wk).transpose(-1, -2)
    ggml = adjacent_pairs(interleave_rope_rows(wq, heads)) @ \
        adjacent_pairs(interleave_rope_rows(wk, heads)).transpose(-1, -2)
    assert torch.allclose(ours, ggml, atol=1e-5)


def test_custom_split_pattern_is_refused(tmp_path):
    from lmforge.errors import ConfigError

    tok = Tokenizer.train(synthetic_documents(30), 270, pattern=r"\w+|\W", workers=1,
                          show_progress=False)
    with pytest.raises(ConfigError, match="custom one"):
        export_gguf(random_model(tok.vocab_size, True), tok, tmp_path / "x.gguf")
