"""The data pipeline end to end on a small planted corpus."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import Counter

import pytest

from lmforge.cli import main
from lmforge.data import pipeline, process
from lmforge.data.manifest import load_manifest, merge_manifests
from lmforge.data.pipeline import DataConfig, prepare
from lmforge.data.shards import Shard
from lmforge.data.sources import ReadOptions
from lmforge.errors import ConfigError, InputError
from lmforge.tokenizer import ENDOFTEXT, Tokenizer

from .conftest import synthetic_documents

VOCAB = ["the", "of", "and", "to", "in", "that", "have", "with", "river", "stone", "light",
         "garden", "winter", "morning", "letter", "music", "city", "forest", "harbor", "window",
         "evening", "question", "answer", "story", "history", "science", "market", "road",
         "village", "mountain", "teacher", "student", "kitchen", "bridge", "island", "summer"]


def prose(rng: random.Random, n_words: int = 120) -> str:
    """A document that passes prose quality filters: sentences of common words, stop words."""
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        words = rng.choices(VOCAB, k=rng.randint(8, 16))
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    rng = random.Random(0)
    Tokenizer.train([prose(rng) for _ in range(50)] + synthetic_documents(50), 600,
                    workers=1, show_progress=False).save(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 distinct prose documents, plus planted problems (names say which)."""
    rng = random.Random(1)
    docs = [prose(rng) for _ in range(40)]
    near = docs[3].split(" ")
    near[10] = "changed"
    rows = [{"text": d} for d in docs]
    rows += [{"text": "  " + docs[5].replace(" ", "  ") + "\n"},  # exact duplicate (whitespace)
             {"text": " ".join(near)},                            # near duplicate (one word)
             {"text": "Too short to keep."},                       # fails the word count
             {"text": "   "}]                                      # empty
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, docs


def config(tmp_path, corpus_path, tok_path, **kw) -> DataConfig:
    values = dict(input=[str(corpus_path)], tokenizer=str(tok_path), out=str(tmp_path / "out"),
                  preset="prose", val_fraction=0.1, chunk_documents=8, workers=2,
                  shard_tokens=2000, progress=False)
    values.update(kw)
    return DataConfig(**values)


def test_prepare_filters_dedups_and_writes_shards(tmp_path, corpus, tok_path, monkeypatch):
    corpus_path, docs = corpus
    cfg = config(tmp_path, corpus_path, tok_path, rejects=True)
    manifest = prepare(cfg)
    out = tmp_path / "out"
    assert manifest == load_manifest(out)
    with monkeypatch.context() as m:  # a finished directory is returned without reading inputs
        m.setattr(process, "read_documents", None)
        assert prepare(cfg) == manifest
    assert manifest["stats"]["dedup"] == {"exact": 1, "near": 1, "buckets": 15}
    assert manifest["stats"]["filters"]["empty"] == 1
    assert sum(manifest["stats"]["filters"].values()) == 2
    assert manifest["stats"]["input"]["documents"] == 44
    assert manifest["num_documents"] == 40
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["fingerprint"] == Tokenizer.load(tok_path).fingerprint
    assert set(manifest["splits"]) == {"train", "val"} and manifest["splits"]["val"]["documents"]
    assert len([s for s in manifest["shards"] if s["split"] == "train"]) > 1
    assert not (out / ".work").exists()
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["reason"].split(":")[0] for r in rejects} == {"empty", "gopher_quality"}

    tok = Tokenizer.load(tok_path)
    eot = tok.special_tokens[ENDOFTEXT]
    texts = []
    for s in manifest["shards"]:
        shard = Shard(out / s["path"])
        assert (shard.num_tokens, shard.num_documents) == (s["tokens"], s["documents"])
        for i in range(shard.num_documents):
            ids = shard.document(i).tolist()
            assert ids[-1] == eot and eot not in ids[:-1]
            texts.append(tok.decode(ids[:-1]))
    assert sorted(texts) == sorted(docs)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, corpus, tok_path, monkeypatch):
    corpus_path, _ = corpus
    clean = prepare(config(tmp_path / "clean", corpus_path, tok_path))
    real_documents = process.read_documents

    def interrupted(spec, opts):
        for i, doc in enumerate(real_documents(spec, opts)):
            if i == 30:  # a crash part way, in a worker
                raise RuntimeError("simulated crash")
            yield doc

    monkeypatch.setattr(process, "read_documents", interrupted)
    cfg = config(tmp_path, corpus_path, tok_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(cfg)
    out = tmp_path / "out"
    cached = sorted(p.name for p in (out / ".work" / "chunks").glob("*.npz"))
    assert cached  # finished chunks were kept for the rerun
    assert not list(out.glob("*.bin")) and not list(out.rglob("*.tmp*"))
    monkeypatch.setattr(process, "read_documents", real_documents)
    with pytest.raises(InputError, match=r"holds what another prepare wrote \(\.work/\)"):
        prepare(config(tmp_path, corpus_path, tok_path, val_fraction=0.5))  # not this run's
    resumed = prepare(cfg)
    assert not (out / ".work").exists()
    for key in ("shards", "num_tokens", "stats"):
        assert resumed[key] == clean[key] or (key == "stats" and
            {k: resumed[key][k] for k in ("filters", "dedup")} ==
            {k: clean[key][k] for k in ("filters", "dedup")})
    for s in clean["shards"]:
        assert (out / s["path"]).read_bytes() == (tmp_path / "clean" / "out" / s["path"]
                                                  ).read_bytes()


def test_rank_partitioning_covers_every_document_once(tmp_path, corpus, tok_path):
    corpus_path, _ = corpus
    names = []
    for rank in range(3):
        cfg = config(tmp_path, corpus_path, tok_path, rank=rank, world_size=3)
        chunks = process._chunks(cfg, str(corpus_path), ReadOptions(), Counter())
        names.append([doc.name for _, docs in chunks for doc in docs])
    flat = [n for part in names for n in part]
    assert len(flat) == len(set(flat)) == 44

    for rank in range(3):
        prepare(config(tmp_path, corpus_path, tok_path, rank=rank, world_size=3))
    merged = merge_manifests(tmp_path / "out")
    assert merged["ranks"] == 3
    assert merged["stats"]["input"]["documents"] == 44
    assert all((tmp_path / "out" / s["path"]).is_file() for s in merged["shards"])


def test_weights_repeat_training_documents(tmp_path, corpus, tok_path):
    corpus_path, _ = corpus
    once = prepare(config(tmp_path / "a", corpus_path, tok_path))
    twice = prepare(config(tmp_path / "b", corpus_path, tok_path, input=[f"{corpus_path}@2"]))
    assert twice["splits"]["train"]["documents"] == 2 * once["splits"]["train"]["documents"]
    assert twice["splits"]["val"] == once["splits"]["val"]


def test_quarantine_drops_documents_with_invalid_utf8(tmp_path, tok_path):
    rng = random.Random(2)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.txt").write_text(prose(rng))
    (tmp_path / "in" / "bad.txt").write_bytes(prose(rng).encode() + b"\xff")
    # One document per chunk: a chunk whose only document is dropped must still combine.
    m = prepare(config(tmp_path, tmp_path / "in", tok_path, utf8_errors="quarantine",
                       val_fraction=0.0, chunk_documents=1))
    assert m["stats"]["filters"] == {"utf8": 1}
    assert m["stats"]["input"]["replaced_bytes"] == 1
    assert m["num_documents"] == 1


def test_bad_pipeline_configs(tmp_path, tok_path):
    with pytest.raises(ConfigError, match="preset: 'news' is not one of"):
        DataConfig(input=["x"], tokenizer=str(tok_path), preset="news")
    with pytest.raises(ConfigError, match="tokenizer: give the tokenizer file"):
        DataConfig(input=["x"])
    with pytest.raises(ConfigError, match="rank: 3 is outside world_size 2"):
        DataConfig(input=["x"], tokenizer="t", rank=3, world_size=2)
    with pytest.raises(ConfigError, match="separator: must not be empty"):
        DataConfig(input=["x"], tokenizer="t", separator="")


def files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_existing_output_is_refused_and_force_leaves_no_stale_shard(tmp_path, corpus, tok_path):
    corpus_path, _ = corpus
    big = prepare(config(tmp_path, corpus_path, tok_path, shard_tokens=500, rejects=True,
                         workers=1))
    out = tmp_path / "out"
    before = files(out)
    small_path = tmp_path / "small.jsonl"
    small_path.write_text("".join(corpus_path.read_text().splitlines(keepends=True)[:10]))
    small = config(tmp_path, small_path, tok_path, shard_tokens=500, workers=1)
    with pytest.raises(InputError, match=r"^.*out: holds what another prepare wrote "
                       r"\(manifest\.json, rejects\.jsonl, train_00000\.bin and \d+ more\); "
                       "choose another --out, or pass --force"):
        prepare(small)
    assert files(out) == before and not (out / ".work").exists()

    replaced = prepare(dataclasses.replace(small, force=True))
    shards = sorted(p.name for p in out.glob("*.bin"))
    assert sorted(s["path"] for s in replaced["shards"]) == shards
    assert len(shards) < len(big["shards"])
    assert sorted(files(out)) == sorted(["manifest.json", *shards])  # rejects.jsonl went too
    assert not (out / ".work").exists()
    assert replaced["stats"]["input"]["documents"] == 10


def test_failed_forced_run_keeps_the_earlier_output_and_resumes(tmp_path, corpus, tok_path,
                                                                 monkeypatch):
    corpus_path, _ = corpus
    first = prepare(config(tmp_path, corpus_path, tok_path, workers=1))
    out = tmp_path / "out"
    before = files(out)

    def full_disk(*_args):
        raise OSError(28, "No space left on device")

    forced = config(tmp_path, corpus_path, tok_path, workers=1, val_fraction=0.3, force=True)
    with monkeypatch.context() as m:  # every new shard is written; moving them in fails
        m.setattr(pipeline, "publish", full_disk)
        with pytest.raises(OSError, match="No space left"):
            prepare(forced)
    assert files(out) == before and load_manifest(out) == first
    assert list((out / ".work" / "chunks").glob("*.npz"))  # kept: the rerun resumes from it
    resumed = prepare(dataclasses.replace(forced, force=False))  # resuming needs no --force
    assert resumed["splits"]["val"]["documents"] > first["splits"]["val"]["documents"]
    assert sorted(s["path"] for s in resumed["shards"]) == sorted(p.name for p in
                                                                   out.glob("*.bin"))
    assert not (out / ".work").exists()


def test_failed_run_without_finished_work_leaves_nothing_behind(tmp_path, tok_path):
    path = tmp_path / "body.jsonl"
    path.write_text('{"body": "the text is here"}\n')
    with pytest.raises(InputError, match=r"body\.jsonl: no record has a string field 'text'"):
        prepare(config(tmp_path, path, tok_path, workers=1))
    assert list((tmp_path / "out").iterdir()) == []


def test_corrupt_or_unwritable_output_is_named(tmp_path, corpus, tok_path):
    corpus_path, _ = corpus
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match=r"holds what another prepare wrote \(manifest\.json\)"):
        prepare(config(tmp_path, corpus_path, tok_path, workers=1))
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match=r"file: cannot write here \(File exists\)"):
        prepare(config(tmp_path, corpus_path, tok_path, out=str(tmp_path / "file")))


def test_missing_validation_split_is_warned(tmp_path, corpus, tok_path, caplog, monkeypatch):
    corpus_path, _ = corpus
    # The split hashes document names, which hold the (random) tmp path: make 1% select none.
    monkeypatch.setattr(process, "is_validation", lambda name, fraction: False)
    with caplog.at_level(logging.WARNING, logger="lmforge.data.pipeline"):
        manifest = prepare(config(tmp_path, corpus_path, tok_path, val_fraction=0.01,
                                  workers=1))
    assert "val" not in manifest["splits"]
    assert [r.getMessage() for r in caplog.records if r.name == "lmforge.data.pipeline"] == [
        "no validation split: none of the 40 documents fell in --val-fraction 0.01; raise "
        "--val-fraction to get one"]


def test_cli_data_errors_are_one_line_with_status_2(tmp_path, corpus, tok_path, capsys):
    corpus_path, _ = corpus
    args = ["data", "prepare", "--input", str(corpus_path), "--tokenizer", str(tok_path),
            "--out", str(tmp_path / "out"), "--preset", "prose", "--workers", "1",
            "--no-progress"]
    assert main([*args, "--field", "body"]) == 2
    assert main([*args, "--separator", ""]) == 2
    assert main(args) == 0
    assert main([*args, "--val-fraction", "0.5"]) == 2
    assert main([*args, "--val-fraction", "0.5", "--force"]) == 0
    errors = capsys.readouterr().err.splitlines()
    assert [e.split(": ")[:2] for e in errors] == [
        ["lmforge", "error"], ["lmforge", "error"], ["lmforge", "error"]]
    assert "field 'body'" in errors[0] and "--separator: must not be empty" in errors[1]
    assert "pass --force" in errors[2]

