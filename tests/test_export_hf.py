"""Hugging Face Llama export/import: transformers gives the same logits and ids as lmforge."""

from __future__ import annotations

import json

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.errors import InputError
from lmforge.export.hf import export_hf
from lmforge.tokenizer.hf import save_hf

from .conftest import random_model, synthetic_documents

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_loads_the_export_with_equal_logits(tokenizer, tmp_path, tie):
    model = random_model(tokenizer.vocab_size, tie)
    export_hf(model, tokenizer, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = synthetic_documents(1, seed=9)[0]
    ids = tokenizer.encode(text)[:64]
    assert hf_tok(text, add_special_tokens=False)["input_ids"][:64] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        delta = (hf(x).logits - model(x)).abs().max().item()
    assert delta < 1e-4
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 50_000.0
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == \
        tokenizer.special_tokens["<|endoftext|>"]

    back, back_tok = lmforge.load(str(tmp_path))  # and the directory imports again
    assert back_tok.fingerprint == tokenizer.fingerprint
    assert torch.allclose(back(x), model(x), atol=1e-6)


def test_import_a_llama_saved_by_transformers(tokenizer, tmp_path):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64,
                                   intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(str(tmp_path))
    save_hf(tokenizer, tmp_path)
    model, _ = lmforge.load(str(tmp_path))
    x = torch.randint(0, tokenizer.vocab_size, (2, 40))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() < 1e-4


def test_cli_export_and_refusals(tmp_path, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(InputError, match="model_type 'gpt2' is not supported"):
        lmforge.load(str(tmp_path / "gpt2"))
    assert main(["export", "hf", "--checkpoint", str(tmp_path / "nothing"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
