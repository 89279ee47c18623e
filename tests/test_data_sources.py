"""Readers: JSONL, Parquet, separators, weights, and the Hugging Face source offline."""

from __future__ import annotations

import gzip
import json

import pytest

from lmforge.data import sources
from lmforge.data.sources import ReadOptions, documents, parse_spec
from lmforge.errors import InputError


def test_jsonl_field_and_bad_lines_are_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\nnot json\n{"body": "x"}\n\n{"text": 5}\n{"text": "two"}\n')
    opts = ReadOptions()
    assert [d.text for d in documents(str(path), opts)] == ["one", "two"]
    assert opts.issues == {"bad_json": 1, "missing_field": 2}
    assert "d.jsonl:2: not JSON" in caplog.text and "d.jsonl:3: has no field 'text'" in caplog.text


def test_jsonl_strict_stops_with_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n{broken\n')
    with pytest.raises(InputError, match=r"d\.jsonl:2: not JSON"):
        list(documents(str(path), ReadOptions(strict=True)))


def test_jsonl_gz_and_custom_field(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"content": "zipped"}) + "\n")
    assert [d.text for d in documents(str(path), ReadOptions(field="content"))] == ["zipped"]


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"], "id": [1, 2, 3]}), path)
    opts = ReadOptions()
    assert [d.text for d in documents(str(path), opts)] == ["a", "c"]
    assert opts.issues["missing_field"] == 1
    with pytest.raises(InputError, match=r"no column 'body' \(columns: text, id\)"):
        list(documents(str(path), ReadOptions(field="body")))


def test_unreadable_parquet_is_named(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=r"broken\.parquet: unreadable Parquet"):
        list(documents(str(path)))


def test_separator_splits_text_files(tmp_path):
    path = tmp_path / "many.txt"
    path.write_text("first doc<|endoftext|>second doc<|endoftext|>third")
    docs = list(documents(str(path), ReadOptions(separator="<|endoftext|>")))
    assert [d.text for d in docs] == ["first doc", "second doc", "third"]
    assert len({d.name for d in docs}) == 3


def test_weights_in_specs():
    assert parse_spec("builtin:python-docs@2.5") == ("builtin:python-docs", 2.5)
    assert parse_spec("data/x@y.txt") == ("data/x@y.txt", 1.0)
    with pytest.raises(InputError, match="weight must be positive"):
        parse_spec("a.txt@0")


def test_hf_source_fails_at_once_offline(monkeypatch):
    def unreachable(*_a, **_k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(sources.socket, "create_connection", unreachable)
    with pytest.raises(InputError, match=r"cannot reach huggingface\.co.*Parquet/JSONL"):
        list(documents("hf:HuggingFaceFW/fineweb:sample-10BT:train"))


def test_hf_spec_shape_is_checked():
    with pytest.raises(InputError, match="expected hf:NAME"):
        list(documents("hf:onlyname"))
