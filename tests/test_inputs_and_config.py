"""Input SPECs, UTF-8 handling, the built-in corpus and typed configs."""

from __future__ import annotations

import logging

import pytest

from lmforge.config import build, load_yaml
from lmforge.data.builtin import is_validation, python_src
from lmforge.data.sources import ReadOptions, documents, texts
from lmforge.errors import ConfigError, InputError
from lmforge.tokenizer.stage import TokenizerTrainConfig, train_tokenizer


def test_file_dir_and_glob_specs(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("third")
    assert [d.text for d in documents(str(tmp_path))] == ["first", "second", "third"]
    assert [d.text for d in documents(str(tmp_path / "*.txt"))] == ["first", "second"]
    assert [d.text for d in documents(str(tmp_path / "a.txt"))] == ["first"]


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(InputError, match=r"absent\.txt: no such file"):
        list(documents(str(tmp_path / "absent.txt")))
    with pytest.raises(InputError, match="glob matches no files"):
        list(documents(str(tmp_path / "*.none")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="input is empty"):
        list(texts([str(tmp_path / "empty.txt")]))
    with pytest.raises(InputError, match="unknown built-in corpus 'builtin:nope'"):
        list(documents("builtin:nope"))


def test_invalid_utf8_is_replaced_and_reported(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok café".encode("latin-1") + b"\xff")
    with caplog.at_level(logging.WARNING):
        (doc,) = documents(str(path))
    assert doc.text == "ok caf\ufffd\ufffd"
    assert "latin1.txt: invalid UTF-8 from byte 6; replaced 2 byte(s)" in caplog.text


def test_invalid_utf8_strict_names_file_and_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\n\xc3(")
    with pytest.raises(InputError, match=r"bad\.txt: not valid UTF-8 at byte 5"):
        list(documents(str(path), ReadOptions(utf8_errors="strict")))


def test_builtin_corpus_is_deterministic_and_has_no_tests():
    names = [d.name for d in python_src()]
    assert names == sorted(names) and len(names) > 100
    assert not any("/test/" in n or "/tests/" in n or n.split("/")[-1].startswith("test_")
                   for n in names)
    assert [d.name for d in python_src()][:5] == names[:5]


def test_validation_split_is_deterministic():
    names = [f"doc-{i}" for i in range(4000)]
    val = [n for n in names if is_validation(n, 0.1)]
    assert val == [n for n in names if is_validation(n, 0.1)]
    assert 300 < len(val) < 500


def test_config_precedence_and_coercion(tmp_path):
    yaml_file = tmp_path / "tok.yaml"
    yaml_file.write_text("input: [builtin:python-docs]\nvocab_size: 4096\nworkers: 2\n")
    cfg = build(TokenizerTrainConfig, ("tok.yaml", load_yaml(yaml_file)),
                ("flags", {"vocab_size": "2048"}))
    assert (cfg.input, cfg.vocab_size, cfg.workers) == (["builtin:python-docs"], 2048, 2)


@pytest.mark.parametrize(("values", "message"), [
    ({"input": ["x"], "vocab_size": 100}, "vocab_size: 100 is too small.*262"),
    ({"input": []}, "input: give at least one SPEC"),
    ({"input": ["x"], "vocab_size": "many"}, "vocab_size: expected int, got 'many'"),
    ({"input": ["x"], "vocab_sise": 10}, "unknown field 'vocab_sise'"),
    ({"input": ["x"], "utf8_errors": "ignore"}, "utf8_errors: 'ignore' is not one of"),
    ({"input": ["x"], "progress": "maybe"}, "progress: expected true or false"),
])
def test_bad_config_values_are_rejected(values, message):
    with pytest.raises(ConfigError, match=message):
        build(TokenizerTrainConfig, ("cfg", values))


def test_bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- a\n- list\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: expected a mapping"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml")


def test_train_tokenizer_writes_file_and_summary(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, hello tokenizer\n" * 20)
    cfg = TokenizerTrainConfig(input=[str(tmp_path / "a.txt")], vocab_size=300,
                               out=str(tmp_path / "tok.json"), progress=False, workers=1)
    tok, summary = train_tokenizer(cfg)
    assert summary["fingerprint"] == tok.fingerprint
    assert summary["train_bytes"] == 29 * 20
    assert (tmp_path / "tok.json.train.json").is_file()
