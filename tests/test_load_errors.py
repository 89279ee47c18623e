"""``lmforge.load`` names the path and what it expected: a missing path, a directory that is
neither a run nor a Hugging Face model, a file that is no checkpoint, and a tokenizer with more
ids than the model has embeddings (a model padded beyond its tokenizer is fine)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.errors import InputError
from lmforge.export.hf import export_hf
from lmforge.model import ModelConfig, Transformer
from lmforge.rundir import TOKENIZER_FILE, RunDir
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.hf import save_hf
from lmforge.train.checkpoint import Checkpoints


def small_model(vocab_size: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=1, n_heads=4,
                                   n_kv_heads=2, context=32)).eval()


def save_run(run: Path, model: Transformer, tok: Tokenizer) -> Path:
    """A run directory as training leaves it: its tokenizer and one checkpoint."""
    tok.save(run / TOKENIZER_FILE)
    state = {"model": model.state_dict(), "config": {}, "model_config": asdict(model.config),
             "tokenizer_fingerprint": tok.fingerprint}
    return Checkpoints(RunDir(run)).save(state, step=1, val_loss=None, clean=True)


def with_extra_special(tok: Tokenizer, extra_id: int) -> Tokenizer:
    """``tok`` plus one special token at ``extra_id``: a larger vocabulary."""
    regular = {i: t for i, t in tok.vocab.items() if i not in tok.special_tokens.values()}
    return Tokenizer(regular, tok.merges, {**tok.special_tokens, "<|extra|>": extra_id},
                     tok.pattern)


def test_missing_paths_and_foreign_directories(tmp_path):
    with pytest.raises(InputError, match=r"nope: no such checkpoint file, run directory, "
                                         r"quantized model file or Hugging Face model "
                                         r"directory$"):
        lmforge.load(str(tmp_path / "nope"))
    (tmp_path / "photos").mkdir()
    with pytest.raises(InputError, match=r"photos: neither a run directory \(no checkpoints/ or "
                                         r"tokenizer.lmforge.json\) nor a Hugging Face model "):
        lmforge.load(str(tmp_path / "photos"))
    (tmp_path / "started").mkdir()  # a run that has not saved a checkpoint yet
    (tmp_path / "started" / "config.json").write_text("{}")
    (tmp_path / "started" / TOKENIZER_FILE).write_text("{}")
    with pytest.raises(InputError, match="started: run directory has no checkpoints"):
        lmforge.load(str(tmp_path / "started"))


@pytest.mark.parametrize("name,content", [("notes.txt", b"hello world\n"), ("empty.pt", b""),
                                          ("config.json", b'{"model_type": "llama"}')])
def test_files_that_are_not_checkpoints_get_one_line(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=rf"{name}: unreadable checkpoint, expected a \.pt file "
                                         "saved by lmforge training") as e:
        lmforge.load(str(tmp_path / name))
    assert "\n" not in str(e.value)
    assert ("give its directory" in str(e.value)) == name.endswith(".json")


def test_a_truncated_checkpoint_gets_one_line(tokenizer, tmp_path):
    ckpt = save_run(tmp_path, small_model(tokenizer.vocab_size), tokenizer)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(InputError, match=r"unreadable checkpoint.*\(RuntimeError: .*zip") as e:
        lmforge.load(str(tmp_path))
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_a_checkpoint_file_without_its_run_tokenizer(tokenizer, tmp_path):
    ckpt = save_run(tmp_path, small_model(tokenizer.vocab_size), tokenizer)
    (tmp_path / TOKENIZER_FILE).unlink()
    with pytest.raises(InputError, match=r"step_0000001\.pt: its run's tokenizer .* is missing"):
        lmforge.load(str(ckpt))


def test_a_tokenizer_larger_than_the_model_is_refused(tokenizer, tmp_path):
    big = with_extra_special(tokenizer, tokenizer.vocab_size + 9)
    save_run(tmp_path, small_model(tokenizer.vocab_size), big)
    with pytest.raises(InputError, match=rf"{TOKENIZER_FILE}: the tokenizer has "
                                         rf"{tokenizer.vocab_size + 10} ids but the model in "
                                         rf".*step_0000001\.pt only {tokenizer.vocab_size} "):
        lmforge.load(str(tmp_path))


def test_a_model_padded_beyond_its_tokenizer_loads(tokenizer, tmp_path):
    padded = small_model(tokenizer.vocab_size + 64)
    save_run(tmp_path, padded, tokenizer)
    model, tok = lmforge.load(str(tmp_path))
    assert model.config.vocab_size == tokenizer.vocab_size + 64
    assert tok.fingerprint == tokenizer.fingerprint


def test_a_hugging_face_tokenizer_larger_than_the_model_is_refused(tokenizer, tmp_path):
    export_hf(small_model(tokenizer.vocab_size), tokenizer, tmp_path)
    save_hf(with_extra_special(tokenizer, tokenizer.vocab_size), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == \
        tokenizer.vocab_size
    with pytest.raises(InputError, match=rf"tokenizer\.json: the tokenizer has "
                                         rf"{tokenizer.vocab_size + 1} ids but the model in "
                                         rf".*config\.json only {tokenizer.vocab_size} "):
        lmforge.load(str(tmp_path))
