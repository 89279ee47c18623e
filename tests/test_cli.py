"""The ``lmforge`` CLI end to end on a tiny corpus: train, info, encode, decode, export, import."""

from __future__ import annotations

import json

from lmforge.cli import main

from .conftest import synthetic_documents


def test_tokenizer_commands(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(synthetic_documents(50)):
        (corpus / f"{i:03}.txt").write_text(doc, encoding="utf-8")
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--input", str(corpus / "*.txt"), "--vocab-size", "400",
                 "--out", str(tok), "--no-progress", "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 400

    assert main(["tokenizer", "info", "--tokenizer", str(tok), "--sample", str(corpus)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["merges"] == 400 - 256 - 6 and info["bytes_per_token"] > 1

    assert main(["tokenizer", "encode", "--tokenizer", str(tok), "--text", "café<|user|>",
                 "--allow-special"]) == 0
    ids = capsys.readouterr().out.split()
    assert main(["tokenizer", "decode", "--tokenizer", str(tok), *ids]) == 0
    assert capsys.readouterr().out == "café<|user|>\n"

    assert main(["tokenizer", "export", "--tokenizer", str(tok), "--format", "hf",
                 "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert main(["tokenizer", "import", "--source", str(tmp_path / "hf"),
                 "--out", str(tmp_path / "back.json")]) == 0
    capsys.readouterr()
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "back.json"),
                 "--text", "café<|user|>", "--allow-special"]) == 0
    assert capsys.readouterr().out.split() == ids


def test_errors_are_one_line_with_status_2(tmp_path, capsys):
    code = main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"),
                 "--out", str(tmp_path / "t.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lmforge: error: ") and "missing.txt: no such file" in err
    assert not (tmp_path / "t.json").exists()

    assert main(["tokenizer", "train", "--input", "builtin:python-docs", "--vocab-size", "10"]) == 2
    assert "--vocab-size: 10 is too small" in capsys.readouterr().err

    (tmp_path / "junk.json").write_text("{}")
    assert main(["tokenizer", "info", "--tokenizer", str(tmp_path / "junk.json")]) == 2
    assert "not an lmforge tokenizer file" in capsys.readouterr().err


def test_data_commands(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"body": d}) + "\n" for d in synthetic_documents(80)))
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--input", str(corpus), "--field", "body",
                 "--vocab-size", "300", "--out", str(tok), "--no-progress", "--workers", "1"]) == 0
    capsys.readouterr()
    for rank in (0, 1):
        assert main(["data", "prepare", "--input", str(corpus), "--field", "body", "--tokenizer",
                     str(tok), "--out", str(tmp_path / "data"), "--preset", "code",
                     "--rank", str(rank), "--world-size", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["data", "merge", str(tmp_path / "data")]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert merged["ranks"] == 2 and merged["num_tokens"] > 0
    assert main(["data", "stats", str(tmp_path / "data")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["num_tokens"] == merged["num_tokens"]
    assert stats["stats"]["input"]["documents"] == 80
    assert main(["data", "prepare", "--input", str(corpus), "--tokenizer", str(tok),
                 "--preset", "news"]) == 2
    assert "preset: 'news' is not one of" in capsys.readouterr().err
