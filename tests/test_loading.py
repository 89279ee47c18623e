"""One loader for every kind of model: it says what it opened, and the stages that must not
misread a kind (export of a quantized file, quantize of a Hugging Face directory) do the right
thing with it. Also the vocabulary rule: padded model vocabularies are accepted everywhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.errors import ConfigError, InputError
from lmforge.export.hf import export_hf
from lmforge.loading import Loaded
from lmforge.model import ModelConfig
from lmforge.quantize.stage import QuantizeConfig, quantize
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.pretrain import model_config_for
from lmforge.vocab import padded_vocab

from .conftest import random_model

gguf = pytest.importorskip("gguf")


def _quantized(run: Path, out: Path, mode: str = "int4") -> Path:
    quantize(QuantizeConfig(checkpoint=str(run), out=str(out), mode=mode, group_size=32,
                            batch_size=4, eval_batches=2, dtype="bf16", progress=False))
    return out


def test_every_kind_says_what_it_is(trained_run: Path, tmp_path: Path) -> None:
    run = lmforge.load(str(trained_run))
    assert isinstance(run, Loaded) and run.kind == "run" and run.quantization is None
    assert run.run is not None and run.run.path == trained_run
    assert run.source.parent == trained_run / "checkpoints" and run.dtype == "fp32"
    assert "run directory" in run.describe() and run.source.name in run.describe()

    ckpt = lmforge.load(str(run.source))
    assert (ckpt.kind, ckpt.source, ckpt.run) == ("checkpoint", run.source, run.run)

    quantized = lmforge.load(str(_quantized(trained_run, tmp_path / "m.int4.safetensors")))
    assert (quantized.kind, quantized.quantization, quantized.run) == ("quantized", "int4", None)
    assert quantized.dtype == "bf16"

    export_hf(run.model, run.tokenizer, tmp_path / "hf")
    hf = lmforge.load(str(tmp_path / "hf"), dtype="bf16")
    assert (hf.kind, hf.dtype, hf.source) == ("hf", "bf16", tmp_path / "hf")

    quickstart = tmp_path / "quickstart"  # the quickstart keeps its run in train/
    shutil.copytree(trained_run, quickstart / "train")
    assert lmforge.load(str(quickstart)).run.path == quickstart / "train"

    model, tok = run  # still unpacks as (model, tokenizer)
    assert model is run.model and tok is run.tokenizer


def test_exporting_a_quantized_file_writes_dequantized_weights_and_says_so(
        trained_run: Path, tmp_path: Path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    path = _quantized(trained_run, tmp_path / "m.int4.safetensors")
    assert main(["export", "hf", "--checkpoint", str(path), "--out", str(tmp_path / "hf")]) == 0
    assert "dequantized" in capsys.readouterr().err
    quantized, tok = lmforge.load(str(path), dtype="fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.tensor([tok.encode("the model learns")])
    with torch.no_grad():
        assert (hf(ids).logits - quantized(ids)).abs().max().item() < 1e-3

    assert main(["export", "gguf", "--checkpoint", str(path), "--out",
                 str(tmp_path / "m.gguf")]) == 0
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    q_proj = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    assert q_proj.data.dtype.name == "float32"
    v = quantized.layers[0].self_attn.v_proj(torch.eye(quantized.config.d_model))
    assert torch.allclose(torch.from_numpy(q_proj.data.copy()).reshape(v.shape[1], -1), v.T,
                          atol=1e-6)


def test_quantize_takes_a_hugging_face_directory_with_data(trained_run: Path,
                                                           tmp_path: Path) -> None:
    model, tok = lmforge.load(str(trained_run))
    export_hf(model, tok, tmp_path / "hf")
    config = dict(checkpoint=str(tmp_path / "hf"), out=str(tmp_path / "q.safetensors"),
                  mode="int8", batch_size=4, eval_batches=2, dtype="fp32", progress=False)
    with pytest.raises(ConfigError, match="records no prepared data directory"):
        quantize(QuantizeConfig(**config))
    report = quantize(QuantizeConfig(**config, data=str(trained_run.parent / "data")))
    assert report["kind"] == "hf" and abs(report["bpb_change_pct"]) < 1.0


def test_quantize_refuses_data_of_another_tokenizer(trained_run: Path, tmp_path: Path) -> None:
    from .conftest import prepare_tiny_data

    other = prepare_tiny_data(tmp_path, 200, seed=99, val_fraction=0.3)  # its own tokenizer
    with pytest.raises(InputError, match=r"prepared with the tokenizer .* not the one of"):
        quantize(QuantizeConfig(checkpoint=str(trained_run), out=str(tmp_path / "q"),
                                data=str(other), progress=False))
    assert not (tmp_path / "q").exists()


def test_padded_vocabularies(tokenizer: Tokenizer, tmp_path: Path) -> None:
    assert padded_vocab(50_257, 50_304) == 50_304  # gpt2-124m's preset applies to GPT-2's
    assert padded_vocab(320, 8192) == 320 and padded_vocab(300, 8192) == 320
    assert padded_vocab(8192, 8192) == 8192
    config = TrainConfig(data="d", preset="gpt2-124m")
    assert model_config_for(config, tokenizer).vocab_size == 1024
    assert model_config_for(TrainConfig(data="d", model={"vocab_size": 2000}),
                            tokenizer).vocab_size == 2000
    with pytest.raises(InputError, match="the tokenizer has 1024 ids"):
        model_config_for(TrainConfig(data="d", model={"vocab_size": 1000}), tokenizer)

    # a model padded past its tokenizer exports to GGUF with placeholder rows
    from lmforge.export.gguf import export_gguf

    model = random_model(tokenizer.vocab_size + 40, tie=True)
    reader = gguf.GGUFReader(str(export_gguf(model, tokenizer, tmp_path / "p.gguf")))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == model.config.vocab_size and tokens[-1] == f"[PAD{len(tokens) - 1}]"
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[-1] == gguf.TokenType.UNUSED and types[0] == gguf.TokenType.NORMAL
    assert ModelConfig.from_preset("gpt2-124m").vocab_size == 50_304


def test_export_refuses_to_overwrite_without_force(trained_run: Path, tmp_path: Path,
                                                   capsys) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"mine": True}))
    args = ["export", "hf", "--checkpoint", str(trained_run), "--out", str(out)]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text()) == {"mine": True}
    assert main([*args, "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_the_current_directory_is_a_path_like_any_other(trained_run: Path, monkeypatch) -> None:
    monkeypatch.chdir(trained_run)
    assert lmforge.load(".").kind == "run"
    with pytest.raises(ConfigError, match="checkpoint: required"):
        lmforge.load("")
