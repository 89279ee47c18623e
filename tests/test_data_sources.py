"""Readers: JSONL, Parquet, separators, weights, and the Hugging Face source offline."""

from __future__ import annotations

import gzip
import json
import logging
import re

import pytest

from lmforge.data import sources
from lmforge.data.sources import ReadOptions, documents, parse_spec
from lmforge.errors import ConfigError, InputError


def write_records(path, rows):
    """``rows`` (dicts) as JSONL, gzipped JSONL or Parquet, by the suffix of ``path``."""
    if path.suffix == ".parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(lines) if path.suffix == ".gz" else lines)


FORMATS = ["d.jsonl", "d.jsonl.gz", "d.parquet"]


def test_jsonl_field_and_bad_lines_are_skipped_counted_and_reported_once(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\nnot json\n{"body": "x"}\n\n{"text": 5}\n{"text": "two"}\n'
                    '{"text": "three"}\n{"body": "y"}\n')
    opts = ReadOptions()
    with caplog.at_level(logging.WARNING):
        assert [d.text for d in documents(str(path), opts)] == ["one", "two", "three"]
    assert opts.issues == {"bad_json": 1, "missing_field": 3}
    (record,) = caplog.records  # one line for the file, not one per record
    assert record.getMessage() == (
        f"{path}: skipped 4 of 7 records: 1 not JSON, first at line 2 (Expecting value); "
        "2 without field 'text', first at line 3; 1 with a non-string 'text', first at line 5 "
        "(int)")


def test_jsonl_strict_stops_with_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n{broken\n')
    with pytest.raises(InputError, match=r"d\.jsonl: line 2: not JSON"):
        list(documents(str(path), ReadOptions(strict=True)))


@pytest.mark.parametrize("name", FORMATS)
def test_source_without_the_field_is_one_error_listing_the_fields(tmp_path, caplog, name):
    path = tmp_path / name
    write_records(path, [{"body": f"doc {i}", "id": i} for i in range(50)])
    with caplog.at_level(logging.WARNING), pytest.raises(InputError) as e:
        list(documents(str(path), ReadOptions(field="id")))  # a column, but not text
    assert str(e.value).startswith(f"{path}: no record has a string field 'id' (50 with a "
                                   "non-string 'id', first at ")
    assert "fields found: body, id); pass --field NAME" in str(e.value)
    assert not caplog.records
    if not name.endswith(".parquet"):  # Parquet names a missing column before reading
        with pytest.raises(InputError, match=r"no record has a string field 'text' \(50 "
                                             r"without field 'text'.*fields found: body, id"):
            list(documents(str(path)))


@pytest.mark.parametrize("name", FORMATS)
def test_partial_misses_are_one_warning_per_file(tmp_path, caplog, name):
    (tmp_path / "in").mkdir()
    rows = [{"text": "kept"}, {"text": None}, {"text": "also kept"}, {"text": None}]
    for stem in ("a", "b"):
        write_records(tmp_path / "in" / f"{stem}{name.removeprefix('d')}", rows)
    opts = ReadOptions()
    with caplog.at_level(logging.WARNING):
        assert len(list(documents(str(tmp_path / "in"), opts))) == 4
    assert opts.issues == {"missing_field": 4}
    assert [r.getMessage().split(": skipped ")[1][:13] for r in caplog.records] == [
        "2 of 4 record"] * 2


def test_jsonl_gz_and_custom_field(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"content": "zipped"}) + "\n")
    assert [d.text for d in documents(str(path), ReadOptions(field="content"))] == ["zipped"]


def test_gzipped_text_file_is_read_decompressed(tmp_path):
    path = tmp_path / "notes.txt.gz"
    path.write_bytes(gzip.compress("plain café".encode()))
    assert [d.text for d in documents(str(path))] == ["plain café"]


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.txt.gz"])
@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_broken_gzip_is_one_error_naming_the_file(tmp_path, name, damage):
    data = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(2000)))
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"plain bytes\n")
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: truncated or not gzip data"):
        list(documents(str(path)))


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.txt"])
def test_unreadable_input_is_named(tmp_path, monkeypatch, name):
    path = tmp_path / name
    path.write_text("x")

    def denied(p):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(sources, "_open", denied)  # chmod does not stop root, who runs CI
    with pytest.raises(InputError) as e:
        list(documents(str(path)))
    assert str(e.value) == f"{path}: cannot read (Permission denied)"


def test_spec_that_yields_nothing_is_an_error(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n")
    with pytest.raises(InputError, match=r"blank\.jsonl: yields no document"):
        list(documents(str(path)))


@pytest.mark.parametrize(("values", "message"), [
    ({"separator": ""}, "separator: must not be empty"),
    ({"field": ""}, "field: must name the JSONL field"),
])
def test_empty_separator_or_field_is_rejected(values, message):
    with pytest.raises(ConfigError, match=message):
        ReadOptions(**values)


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
