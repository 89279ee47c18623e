"""Tokenizer files: save/load, and clear errors for missing, corrupt or foreign files."""

from __future__ import annotations

import json

import pytest

from lmforge.errors import TokenizerFileError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.hf import load_hf, save_hf


def test_save_load_round_trip(tokenizer: Tokenizer, held_out: list[str], tmp_path):
    path = tokenizer.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(path)
    assert loaded.fingerprint == tokenizer.fingerprint
    assert loaded.merges == tokenizer.merges
    assert loaded.vocab == tokenizer.vocab
    assert loaded.special_tokens == tokenizer.special_tokens
    assert all(loaded.encode(t) == tokenizer.encode(t) for t in held_out)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_missing_file(tmp_path):
    with pytest.raises(TokenizerFileError, match="no such tokenizer file"):
        Tokenizer.load(tmp_path / "absent.json")


def test_not_json(tmp_path):
    path = tmp_path / "tok.json"
    path.write_bytes(b"\x00\x01 binary")
    with pytest.raises(TokenizerFileError, match=r"tok\.json: not a tokenizer file"):
        Tokenizer.load(path)


def test_truncated_file(tokenizer: Tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tok.json")
    path.write_text(path.read_text()[:-200])
    with pytest.raises(TokenizerFileError, match=r"tok\.json"):
        Tokenizer.load(path)


def test_edited_file_fails_its_fingerprint(tokenizer: Tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tok.json")
    doc = json.loads(path.read_text())
    doc["merges"] = doc["merges"][:-1]
    path.write_text(json.dumps(doc))
    with pytest.raises(TokenizerFileError, match="fingerprint"):
        Tokenizer.load(path)


def test_structurally_corrupt_file(tokenizer: Tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tok.json")
    doc = json.loads(path.read_text())
    doc["merges"][0] = "onlyonepart"
    path.write_text(json.dumps(doc))
    with pytest.raises(TokenizerFileError, match="corrupt"):
        Tokenizer.load(path)


def test_unknown_version(tokenizer: Tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tok.json")
    doc = json.loads(path.read_text())
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(TokenizerFileError, match="version 99"):
        Tokenizer.load(path)


def test_foreign_hf_file_is_named_as_such(tokenizer: Tokenizer, tmp_path):
    save_hf(tokenizer, tmp_path)
    with pytest.raises(TokenizerFileError, match=r"Hugging Face tokenizer\.json"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_hf_import_rejects_non_bytelevel(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(TokenizerFileError, match="not a Hugging Face BPE"):
        load_hf(path)
    path.write_text(json.dumps({"normalizer": None, "pre_tokenizer": {"type": "Whitespace"},
                                "model": {"type": "BPE", "vocab": {}, "merges": []}}))
    with pytest.raises(TokenizerFileError, match="'Whitespace' is not supported"):
        load_hf(path)


def test_failed_save_keeps_the_old_file(tokenizer: Tokenizer, tmp_path, monkeypatch):
    path = tokenizer.save(tmp_path / "tok.json")
    before = path.read_bytes()

    def explode(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lmforge.files.os.replace", explode)
    with pytest.raises(OSError, match="disk full"):
        Tokenizer.train(["other text entirely"], 300, workers=1, show_progress=False).save(path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*tmp"))
