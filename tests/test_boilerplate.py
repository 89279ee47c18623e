"""Corpus-wide boilerplate line removal: the counting rule and the pipeline pass."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lmforge.config import to_dict
from lmforge.data import boilerplate, pipeline, process
from lmforge.data.boilerplate import LineCounter, chunk_counts, remove_lines
from lmforge.data.pipeline import DataConfig, prepare
from lmforge.data.shards import Shard
from lmforge.errors import ConfigError
from lmforge.tokenizer import ENDOFTEXT, Tokenizer

from .test_data_pipeline import config as pipeline_config
from .test_data_pipeline import prose

NAV = "Home | About us | Contact | Blog"
FOOTER = "Copyright 2024 Example Corp. All rights reserved."
CONTENT = "The harbor bridge was rebuilt after the winter storm of that year."
N_DOCS = 12


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    rng = random.Random(0)
    texts = [prose(rng) for _ in range(40)] + [NAV, FOOTER, CONTENT, "Menu"]
    Tokenizer.train(texts, 500, workers=1, show_progress=False).save(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """N_DOCS pages: navigation and footer in every one, a short "Menu" line in every one, and
    a content line shared by only two. Returns the path and the texts expected with N=3."""
    rng = random.Random(1)
    pages, expected = [], []
    for i in range(N_DOCS):
        body = [prose(rng, 60), CONTENT if i < 2 else prose(rng, 20), prose(rng, 60)]
        pages.append("\n".join([NAV, "Menu", *body, FOOTER]))
        expected.append("\n".join(["Menu", *body]))
    path = tmp_path_factory.mktemp("corpus") / "pages.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in pages))
    return path, pages, expected


def config(tmp_path, corpus_path, tok_path, **kw) -> DataConfig:
    """The pipeline tests' config, with smaller chunks (several per worker) and shards."""
    return pipeline_config(tmp_path, corpus_path, tok_path, **{
        "val_fraction": 0.2, "chunk_documents": 4, "shard_tokens": 4000, **kw})


def decoded(out, manifest, tok_path) -> list[str]:
    tok = Tokenizer.load(tok_path)
    eot = tok.special_tokens[ENDOFTEXT]
    texts = []
    for s in manifest["shards"]:
        shard = Shard(out / s["path"])
        for i in range(shard.num_documents):
            ids = shard.document(i).tolist()
            assert ids[-1] == eot
            texts.append(tok.decode(ids[:-1]))
    return sorted(texts)


def test_counts_distinct_documents_and_ignores_short_lines():
    docs = [f"{NAV}\n{NAV}\n}}\nreturn\n\n  {FOOTER}  ", f"{NAV}\n}}", f"{FOOTER}\nshort one"]
    values, counts = chunk_counts(docs)
    by_hash = dict(zip(values.tolist(), counts.tolist(), strict=True))
    # a line twice in one document counts once; "}", "return", blank, 9 characters: never counted
    assert by_hash == {boilerplate.line_hash(NAV): 2, boilerplate.line_hash(FOOTER): 2}
    counter = LineCounter()
    for doc in docs:  # chunk by chunk, merged: the same counts
        counter.add(*chunk_counts([doc]))
    assert counter.distinct == 2
    assert counter.frequent(1).tolist() == sorted(by_hash)
    assert counter.frequent(2).tolist() == []
    text, removed = remove_lines(docs[0], counter.frequent(1))
    assert (text, removed) == ("}\nreturn\n", 3)  # the stripped line is matched, indented or not
    assert remove_lines(docs[0], np.zeros(0, np.uint64)) == (docs[0], 0)


def test_prepare_removes_boilerplate_everywhere_and_keeps_the_rest(tmp_path, corpus, tok_path):
    corpus_path, _, expected = corpus
    cfg = config(tmp_path, corpus_path, tok_path, boilerplate_lines=3)
    manifest = prepare(cfg)
    out = tmp_path / "out"
    texts = decoded(out, manifest, tok_path)
    assert texts == sorted(expected)
    assert sum(CONTENT in t for t in texts) == 2 and all("Menu" in t for t in texts)
    assert manifest["stats"]["boilerplate"] == {"lines_removed": 2 * N_DOCS,
                                                "documents_touched": N_DOCS,
                                                "distinct_lines": 2}
    assert manifest["config"]["boilerplate_lines"] == 3
    # the content line is in 2 documents: N=1 removes it too
    more = prepare(config(tmp_path / "n1", corpus_path, tok_path, boilerplate_lines=1))
    assert more["stats"]["boilerplate"]["distinct_lines"] == 3
    assert not any(CONTENT in t for t in decoded(tmp_path / "n1" / "out", more, tok_path))


def test_off_by_default_changes_nothing(tmp_path, corpus, tok_path, monkeypatch):
    corpus_path, pages, _ = corpus
    cfg = config(tmp_path, corpus_path, tok_path)
    assert cfg.boilerplate_lines == 0
    manifest = prepare(cfg)
    assert decoded(tmp_path / "out", manifest, tok_path) == sorted(pages)
    assert "boilerplate" not in manifest["stats"]
    tok = Tokenizer.load(tok_path)
    with monkeypatch.context() as m:  # a config from before the field: the same fingerprint
        m.setattr(pipeline, "to_dict", lambda c: {k: v for k, v in to_dict(c).items()
                                                 if k != "boilerplate_lines"})
        before = pipeline._fingerprint(cfg, tok)
    assert pipeline._fingerprint(cfg, tok) == before
    assert pipeline._fingerprint(config(tmp_path, corpus_path, tok_path, boilerplate_lines=3),
                                 tok) != before


def test_interrupted_run_reuses_the_saved_set(tmp_path, corpus, tok_path, monkeypatch):
    corpus_path, _, expected = corpus
    clean = prepare(config(tmp_path / "clean", corpus_path, tok_path, boilerplate_lines=3))
    real_documents = process.read_documents
    saved = tmp_path / "out" / ".work" / boilerplate.FILE

    def interrupted(spec, opts):
        for i, doc in enumerate(real_documents(spec, opts)):
            if saved.exists() and i == 9:  # the crash comes after counting, while filtering
                raise RuntimeError("simulated crash")
            yield doc

    cfg = config(tmp_path, corpus_path, tok_path, boilerplate_lines=3)
    with monkeypatch.context() as m:
        m.setattr(process, "read_documents", interrupted)
        with pytest.raises(RuntimeError, match="simulated crash"):
            prepare(cfg)
    work = tmp_path / "out" / ".work"
    assert (work / boilerplate.FILE).exists()

    def no_recount():
        raise AssertionError("the saved boilerplate set should have been reused")

    monkeypatch.setattr(boilerplate, "LineCounter", no_recount)
    resumed = prepare(cfg)
    assert resumed["shards"] == clean["shards"] and resumed["stats"] == clean["stats"]
    assert decoded(tmp_path / "out", resumed, tok_path) == sorted(expected)
    assert not work.exists()


def test_negative_threshold_is_rejected(tmp_path, corpus, tok_path):
    with pytest.raises(ConfigError, match="boilerplate_lines"):
        config(tmp_path, corpus[0], tok_path, boilerplate_lines=-1)
