"""LoRA as a transform of a built model: exact at init, only A and B train, merge/save/load
round trips, quantized bases, and parity with PEFT on the Hugging Face export."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError, InputError
from lmforge.finetune.lora import (
    LoraConfig,
    LoraLinear,
    adapters_disabled,
    apply_lora,
    export_peft,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from lmforge.quantize.rtn import dequantize_model, quantize_model

from .conftest import random_model

VOCAB = 300


def ids(seed: int = 0, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def randomize_b(model: torch.nn.Module, seed: int = 1) -> None:
    """A trained-looking adapter: B non-zero (it starts at zero, which hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_state_dict(model).items():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("tie", [True, False])
def test_init_equals_base_exactly_and_only_adapters_train(tie):
    model = random_model(VOCAB, tie)
    x = ids()
    base = logits(model, x)
    names = apply_lora(model, LoraConfig(rank=4, alpha=8))
    assert len(names) == 2 * 7 and names[0] == "layers.0.self_attn.q_proj"
    assert torch.equal(logits(model, x), base)
    assert not isinstance(model.lm_head, LoraLinear)

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for _ in range(2):  # the first step moves only B (A's gradient is 0 while B is 0)
        model(x, targets=ids(seed=2)).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(lora_state_dict(model))


def test_merge_equals_unmerged_and_restores_the_plain_model():
    model = random_model(VOCAB, tie=True)
    keys = set(model.state_dict())
    apply_lora(model, LoraConfig(rank=4, alpha=16, targets=("q_proj", "v_proj", "down_proj")))
    randomize_b(model)
    x = ids()
    adapted = logits(model, x)
    assert not torch.allclose(adapted, logits(random_model(VOCAB, tie=True), x))
    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert set(model.state_dict()) == keys
    assert model.lm_head.weight is model.embed_tokens.weight
    torch.testing.assert_close(logits(model, x), adapted, atol=1e-5, rtol=1e-5)


def test_adapters_disabled_gives_base_logits():
    model = random_model(VOCAB, tie=True)
    x = ids()
    base = logits(model, x)
    apply_lora(model, LoraConfig(rank=2))
    randomize_b(model)
    adapted = logits(model, x)
    with adapters_disabled(model):
        assert torch.equal(logits(model, x), base)
    assert torch.equal(logits(model, x), adapted)


def test_dropout_acts_only_in_training():
    model = random_model(VOCAB, tie=True)
    apply_lora(model, LoraConfig(rank=2, dropout=0.5))
    randomize_b(model)
    x = ids()
    eval_logits = logits(model, x)
    assert torch.equal(logits(model, x), eval_logits)
    model.train()
    assert not torch.allclose(logits(model, x), eval_logits)


def test_save_load_round_trip(tmp_path):
    model = random_model(VOCAB, tie=True)
    config = LoraConfig(rank=4, alpha=32, targets=("q_proj", "o_proj", "up_proj"))
    apply_lora(model, config)
    randomize_b(model)
    path = save_adapter(model, config, tmp_path / "adapter.safetensors")
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically

    fresh = random_model(VOCAB, tie=True)
    assert load_adapter(fresh, path) == config
    x = ids()
    assert torch.equal(logits(fresh, x), logits(model, x))
    model_bytes = sum(p.numel() * 4 for p in random_model(VOCAB, tie=True).parameters())
    assert path.stat().st_size < model_bytes / 20


def test_load_adapter_refusals(tmp_path):
    model = random_model(VOCAB, tie=True)
    config = LoraConfig(rank=2)
    apply_lora(model, config)
    path = save_adapter(model, config, tmp_path / "a.safetensors")

    with pytest.raises(InputError, match="no such adapter file"):
        load_adapter(random_model(VOCAB, tie=True), tmp_path / "missing.safetensors")
    (tmp_path / "junk").write_bytes(b"not a safetensors file at all")
    with pytest.raises(InputError, match="not a safetensors file"):
        load_adapter(random_model(VOCAB, tie=True), tmp_path / "junk")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError, match="not an lmforge LoRA adapter"):
        load_adapter(random_model(VOCAB, tie=True), tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="already has LoRA adapters"):
        load_adapter(model, path)

    from lmforge.model import ModelConfig, Transformer

    wider = Transformer(ModelConfig(vocab_size=VOCAB, d_model=96, n_layers=2, n_heads=4,
                                    n_kv_heads=2, context=64))
    with pytest.raises(InputError, match="shape"):
        load_adapter(wider, path)
    assert not any(isinstance(m, LoraLinear) for m in wider.modules())  # left untouched
    deeper = Transformer(ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=3, n_heads=4,
                                     n_kv_heads=2, context=64))
    with pytest.raises(InputError, match="missing"):
        load_adapter(deeper, path)
    with pytest.raises(InputError, match="was not made by this config"):
        save_adapter(model, LoraConfig(rank=8), tmp_path / "b.safetensors")


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank"),
    (dict(rank=2.5), "rank"),
    (dict(alpha=0), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(targets=()), "at least one"),
    (dict(targets=("lm_head",)), "tied to the token embedding"),
    (dict(targets=("embed_tokens",)), "tied to the token embedding"),
    (dict(targets=("q_proj", "qkv")), "unknown projection 'qkv'"),
])
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_config_normalizes_targets_and_refuses_unmatched_models():
    assert LoraConfig(targets=["v_proj", "q_proj", "v_proj"]).targets == ("v_proj", "q_proj")
    assert LoraConfig(targets="q_proj").targets == ("q_proj",)
    with pytest.raises(InputError, match="no linear layer named q_proj"):
        apply_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(targets=("q_proj",)))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_base_stays_frozen_and_adapters_train(mode):
    model = quantize_model(random_model(VOCAB, tie=True), mode, group_size=32)
    x = ids()
    base = logits(model, x)
    codes = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(rank=4))
    assert torch.equal(logits(model, x), base)
    assert model.layers[0].mlp.up_proj.lora_A.weight.dtype == torch.float32

    model.train()
    optimizer = torch.optim.SGD(lora_parameters(model), lr=0.5)
    for _ in range(2):
        model(x, targets=ids(seed=2)).backward()
        assert all(p.grad is not None for p in lora_parameters(model))
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.abs().sum() > 0 for n, p in lora_state_dict(model).items() if "lora_B" in n)
    state = model.state_dict()
    for key, value in codes.items():  # base codes, scales, norms, embedding: all unchanged
        assert torch.equal(state[key.replace("_proj.", "_proj.base_layer.")], value)

    model.eval()
    adapted = logits(model, x)
    with pytest.raises(InputError, match="quantized base"):
        merge_lora(model)
    merge_lora(dequantize_model(model))  # the documented way: a float model, merged
    torch.testing.assert_close(logits(model, x), adapted, atol=1e-5, rtol=1e-5)


def test_export_peft_refuses_a_non_empty_directory(tmp_path):
    model = random_model(VOCAB, tie=True)
    config = LoraConfig(rank=2)
    apply_lora(model, config)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        export_peft(model, config, tmp_path / "out", "base")
    files = export_peft(model, config, tmp_path / "out", "base", force=True)
    assert all(f.is_file() for f in files)


@pytest.mark.parametrize("tie", [True, False])
def test_peft_loads_the_export_with_equal_logits(tmp_path, tie):
    peft = pytest.importorskip("peft", reason="pip install 'lmforge[finetune]' for PEFT parity")
    transformers = pytest.importorskip("transformers")
    from lmforge.export.hf import export_hf
    from lmforge.tokenizer import Tokenizer

    from .conftest import synthetic_documents

    tok = Tokenizer.train(synthetic_documents(40), VOCAB, workers=1, show_progress=False)
    model = random_model(tok.vocab_size, tie)
    export_hf(model, tok, tmp_path / "base")
    config = LoraConfig(rank=4, alpha=12, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "down_proj"))
    apply_lora(model, config)
    randomize_b(model)
    export_peft(model, config, tmp_path / "adapter", str(tmp_path / "base"))

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ours = {f"base_model.model.model.{k}" for k in lora_state_dict(model)}
    assert set(peft.get_peft_model_state_dict(peft_model)) == ours
    x = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = peft_model(x).logits
    torch.testing.assert_close(theirs, logits(model, x), atol=1e-5, rtol=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():  # and the base alone still agrees
        base = peft_model(x).logits
    assert (base - theirs).abs().max() > 1e-2  # the adapter was loaded, not left at zero
    with adapters_disabled(model):
        torch.testing.assert_close(base, logits(model, x), atol=1e-5, rtol=1e-5)
