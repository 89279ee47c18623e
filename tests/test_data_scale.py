"""The data pipeline at scale: global deduplication across partitions, resume after a killed
worker or driver, and the Ray executor (marked ``ray``; ``.ci/run`` runs it)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from lmforge.data import global_dedup, pipeline, process
from lmforge.data.dedup import MinHasher, exact_key, near_duplicates
from lmforge.data.executors import LocalExecutor
from lmforge.data.filters import apply_filters
from lmforge.data.manifest import load_manifest
from lmforge.data.pipeline import DataConfig, normalize, prepare
from lmforge.data.shards import Shard
from lmforge.errors import TaskFailed
from lmforge.files import atomic_path
from lmforge.tokenizer import Tokenizer

from .test_data_pipeline import prose
from .test_data_pipeline import tok_path as tok_path  # a fixture


def _near(rng: random.Random, text: str, changes: int = 1) -> str:
    words = text.split(" ")
    for i in rng.sample(range(5, len(words) - 5), changes):
        words[i] = "changed"
    return " ".join(words)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Four JSONL files with duplicates planted across them: exact copies (whitespace changed),
    near copies, a chain a ~ b ~ c whose ends are far apart, and a copy of a copy."""
    rng = random.Random(7)
    files: list[list[str]] = [[prose(rng, 150) for _ in range(12)] for _ in range(4)]
    a = files[0][1]
    b = _near(rng, a, 1)
    c = _near(rng, b, 1)
    files[1].append(b)                                      # near a (file 0)
    files[3].insert(0, c)                                   # near b, so in a's cluster
    files[2].append("  " + files[0][4].replace(" ", "   "))  # exact copy across files
    files[3].append(files[0][4])                            # and another
    files[1].insert(3, _near(rng, files[2][5], 1))          # near a later file's document
    files[2].insert(0, files[1][3] + " ")                   # exact copy of that near copy
    files[0].append("Too short to keep.")
    root = tmp_path_factory.mktemp("parts")
    paths = []
    for i, docs in enumerate(files):
        path = root / f"{i:02d}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        paths.append(path)
    return paths, [d for docs in files for d in docs]


def config(tmp_path: Path, inputs: list[Path], tok_path: Path, **kw) -> DataConfig:
    values = dict(input=[str(p) for p in inputs], tokenizer=str(tok_path),
                  out=str(tmp_path / "out"), preset="prose", val_fraction=0.2,
                  chunk_documents=4, workers=2, shard_tokens=1500, progress=False)
    return DataConfig(**{**values, **kw})


def decoded(out: Path, manifest: dict, tok_path: Path) -> list[str]:
    tok = Tokenizer.load(tok_path)
    return sorted(tok.decode(Shard(out / s["path"]).document(i).tolist()[:-1])
                  for s in manifest["shards"] for i in range(s["documents"]))


def contents(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def reference_survivors(texts: list[str], cfg: DataConfig) -> tuple[list[str], int, int]:
    """The single-process definition, in memory: the documents that pass the filters, minus
    exact duplicates of an earlier one, minus near duplicates among the rest (clusters keep their
    first document)."""
    filters = cfg.build_filters()
    kept = [t for t in map(normalize, texts) if apply_filters(filters, t).keep]
    seen, first = set(), []
    for t in kept:
        if exact_key(t) not in seen:
            seen.add(exact_key(t))
            first.append(t)
    dedup = cfg.dedup_config
    drop = near_duplicates(MinHasher(dedup).signatures(first), dedup.bands, dedup.rows)
    survivors = [t for t, d in zip(first, drop, strict=True) if not d]
    return survivors, len(kept) - len(first), int(drop.sum())


def test_global_dedup_removes_duplicates_across_partitions_as_one_process_does(
        tmp_path, parts, tok_path):
    paths, texts = parts
    cfg = config(tmp_path, paths, tok_path)
    manifest = prepare(cfg)
    survivors, exact, near = reference_survivors(texts, cfg)
    assert (exact, near) == (3, 3)  # the planted ones: every one crosses a partition
    assert manifest["stats"]["dedup"] == {"exact": exact, "near": near, "buckets": 15}
    assert manifest["stats"]["input"]["partitions"] == 4
    assert decoded(tmp_path / "out", manifest, tok_path) == sorted(survivors)

    # The same documents as one partition (one file), in one process: the same survivors.
    one = tmp_path / "one.jsonl"
    one.write_text("".join(p.read_text() for p in paths))
    single = prepare(config(tmp_path, [one], tok_path, out=str(tmp_path / "single"), workers=1,
                            chunk_documents=1000))
    assert single["stats"]["dedup"] == manifest["stats"]["dedup"]
    assert decoded(tmp_path / "single", single, tok_path) == sorted(survivors)


def test_bucket_count_grows_with_the_corpus_and_not_the_result(tmp_path, parts, tok_path,
                                                               monkeypatch):
    paths, texts = parts
    monkeypatch.setattr(global_dedup, "BUCKET_ENTRIES", 8)  # 7 exact buckets, 7 per band
    cfg = config(tmp_path, paths, tok_path)
    manifest = prepare(cfg)
    assert manifest["stats"]["dedup"]["buckets"] == 7 + 14 * 7
    survivors, exact, near = reference_survivors(texts, cfg)
    assert (manifest["stats"]["dedup"]["exact"], manifest["stats"]["dedup"]["near"]) == (
        exact, near)
    assert decoded(tmp_path / "out", manifest, tok_path) == sorted(survivors)


def _killing(at_chunks: int, marker: Path, real=process._process):
    """A stand-in for the chunk work that kills its own process (SIGKILL: no clean-up runs) once
    ``at_chunks`` chunk files exist, the first time only."""
    def work(*args):
        chunks = marker.parent / "out" / ".work" / "chunks"
        if not marker.exists() and len(list(chunks.glob("*.npz"))) >= at_chunks:
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    return work


def _write_slowly_or_fail(folder: Path, task: int) -> None:
    """Task 0 is still inside a file write when task 1 fails."""
    if task == 1:
        deadline = time.monotonic() + 30
        while not list(folder.glob(".*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.01)  # until task 0 has begun writing
        raise RuntimeError("task 1 failed")
    with atomic_path(folder / "chunk.npz") as tmp:
        tmp.write_bytes(b"half")
        time.sleep(120)


def test_a_failed_task_stops_the_others_without_half_written_files(tmp_path):
    """The pool's other tasks are stopped when one fails (as on Ctrl-C or SIGTERM): a file
    one of them was writing is removed, not left as a temporary beside the finished ones."""
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="task 1 failed"):
        LocalExecutor(2, progress=False).map(_write_slowly_or_fail, [(tmp_path, 0),
                                                                    (tmp_path, 1)], "test")
    assert list(tmp_path.iterdir()) == []
    assert time.perf_counter() - started < 60  # stopped, not waited for


def test_killed_worker_is_resumed_to_the_same_bytes(tmp_path, parts, tok_path, monkeypatch):
    paths, _ = parts
    cfg = config(tmp_path, paths, tok_path, rejects=True)
    prepare(cfg)
    clean = contents(tmp_path / "out")
    for p in (tmp_path / "out").iterdir():
        p.unlink()
    (tmp_path / "out").rmdir()
    with monkeypatch.context() as m:  # the pool's processes are forked: they get the stand-in
        m.setattr(process, "_process", _killing(3, tmp_path / "killed"))
        with pytest.raises(TaskFailed, match=r"worker process died.*rerun the same command"):
            prepare(cfg)
    assert (tmp_path / "killed").exists()
    assert len(list((tmp_path / "out" / ".work" / "chunks").glob("*.npz"))) >= 3
    assert not list((tmp_path / "out").glob("*.bin"))
    prepare(cfg)
    assert contents(tmp_path / "out") == clean


def _driver(cfg: DataConfig, patch: str, at_chunks: int, marker: Path) -> None:
    """Run ``prepare`` in a child process that kills itself: during the chunk work (``process``,
    one worker: the tasks run in the driver) or as the clusters stage begins (``clusters``)."""
    def die(*_args):
        os.kill(os.getpid(), signal.SIGKILL)

    if patch == "process":
        process._process = _killing(at_chunks, marker)
    else:
        pipeline.clusters = die
    prepare(cfg)


@pytest.mark.parametrize("where", ["process", "clusters"])
def test_killed_driver_is_resumed_to_the_same_bytes(tmp_path, parts, tok_path, where):
    paths, _ = parts
    workers = 1 if where == "process" else 2
    clean_cfg = config(tmp_path, paths, tok_path, out=str(tmp_path / "clean"), workers=workers)
    prepare(clean_cfg)
    cfg = dataclasses.replace(clean_cfg, out=str(tmp_path / "out"))
    child = mp.get_context("fork").Process(target=_driver,
                                           args=(cfg, where, 5, tmp_path / "killed"))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    work = tmp_path / "out" / ".work"
    assert work.is_dir() and not (tmp_path / "out" / "manifest.json").exists()
    if where == "clusters":
        assert list((work / "dedup").glob("near_*.npy"))  # the buckets stage had finished
    resumed = prepare(cfg)
    assert resumed["stats"] == load_manifest(tmp_path / "clean")["stats"]
    clean = contents(tmp_path / "clean")
    again = contents(tmp_path / "out")
    clean.pop("manifest.json"), again.pop("manifest.json")  # they differ in config.out alone
    assert again == clean


def _ray_or_skip():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install 'lmforge[scale]')")


def _spawned(target, *args, timeout: float = 300) -> int:
    """Run ``target(*args)`` in a spawned process; its exit code. Ray runs only there: a process
    that has loaded Ray's core (gRPC threads) may hang the processes it forks later."""
    child = mp.get_context("spawn").Process(target=target, args=args)
    child.start()
    child.join(timeout)
    return child.exitcode


@pytest.mark.ray
def test_ray_executor_writes_what_the_local_one_writes(tmp_path, parts, tok_path):
    _ray_or_skip()
    paths, _ = parts
    local = prepare(config(tmp_path, paths, tok_path, out=str(tmp_path / "local"),
                           rejects=True, boilerplate_lines=5))
    ray_cfg = config(tmp_path, paths, tok_path, out=f"file://{tmp_path / 'ray'}", rejects=True,
                     boilerplate_lines=5, executor="ray", workers=2)  # through fsspec, too
    assert _spawned(prepare, ray_cfg) == 0
    on_ray = load_manifest(tmp_path / "ray")
    assert on_ray["stats"] == local["stats"] and on_ray["shards"] == local["shards"]
    assert on_ray["stats"]["dedup"]["exact"] == 3
    ray_files, local_files = contents(tmp_path / "ray"), contents(tmp_path / "local")
    ray_files.pop("manifest.json"), local_files.pop("manifest.json")
    assert ray_files == local_files


@pytest.mark.ray
def test_ray_run_with_a_killed_driver_resumes_on_ray(tmp_path, parts, tok_path):
    _ray_or_skip()
    paths, _ = parts
    local = prepare(config(tmp_path, paths, tok_path, out=str(tmp_path / "local")))
    cfg = config(tmp_path, paths, tok_path, executor="ray", workers=2)
    assert _spawned(_driver, cfg, "clusters", 0, tmp_path / "killed") == -signal.SIGKILL
    assert (tmp_path / "out" / ".work" / "dedup").is_dir()
    assert _spawned(prepare, cfg) == 0
    resumed = load_manifest(tmp_path / "out")
    assert resumed["shards"] == local["shards"] and resumed["stats"] == local["stats"]
    for s in local["shards"]:
        assert (tmp_path / "out" / s["path"]).read_bytes() == (
            tmp_path / "local" / s["path"]).read_bytes()


def _prepare_noting_the_error(cfg: DataConfig, note: Path) -> None:
    try:
        prepare(cfg)
    except Exception as e:  # what the CLI would print, for the parent to read
        note.write_text(f"{type(e).__name__}: {e}")


@pytest.mark.ray
def test_bad_input_in_a_ray_task_is_the_same_one_line_error(tmp_path, parts, tok_path):
    _ray_or_skip()
    paths, _ = parts
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    cfg = config(tmp_path, [*paths, bad], tok_path, executor="ray", strict=True)
    assert _spawned(_prepare_noting_the_error, cfg, tmp_path / "error") == 0
    assert (tmp_path / "error").read_text() == (
        f"InputError: {bad}: line 2: not JSON (Expecting value)")


def test_ray_needs_one_rank(tmp_path, tok_path):
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="executor: ray spreads one run"):
        DataConfig(input=["x"], tokenizer=str(tok_path), executor="ray", world_size=2)


def test_dedup_entries_are_sorted_by_bucket_with_offsets(tmp_path, parts, tok_path,
                                                          monkeypatch):
    paths, _ = parts
    work = tmp_path / "out" / ".work"
    run = pipeline._run
    seen = []

    def run_and_inspect(*args):  # the stage files, before publishing removes them
        result = run(*args)
        kept = json.loads((work / "dedup" / "00001.json").read_text())["kept"]
        offsets = np.load(work / "dedup" / "00001.near_index.npy")
        entries = np.load(work / "dedup" / "00001.near.npy")
        assert offsets[0] == 0 and offsets[-1] == len(entries) == kept * 14
        for b in range(14):  # one split per band: bucket b holds band b of every document
            ids = entries[offsets[b]:offsets[b + 1], 1]
            assert sorted(ids.tolist()) == [(1 << 32) | j for j in range(kept)]
        seen.append(kept)
        return result

    monkeypatch.setattr(pipeline, "_run", run_and_inspect)
    prepare(config(tmp_path, paths, tok_path))
    assert seen == [14]


def test_output_on_an_fsspec_url_is_what_a_path_gets(tmp_path, parts, tok_path):
    """file:// goes through fsspec, as s3:// or gs:// would (PUTs, listings, ranged reads,
    copies), on a file system the pool's processes share."""
    paths, _ = parts
    local = prepare(config(tmp_path, paths, tok_path, out=str(tmp_path / "local"), rejects=True))
    url = f"file://{tmp_path / 'remote'}"
    remote = prepare(config(tmp_path, paths, tok_path, out=url, rejects=True))
    assert remote["stats"] == local["stats"] and remote["shards"] == local["shards"]
    assert load_manifest(url) == remote
    got, want = contents(tmp_path / "remote"), contents(tmp_path / "local")
    assert got.pop("manifest.json") != want.pop("manifest.json")  # config.out differs
    assert got == want
    assert prepare(config(tmp_path, paths, tok_path, out=url, rejects=True)) == remote  # done


def test_output_in_memory_store(tmp_path, parts, tok_path):
    """fsspec's in-memory file system: nothing of the run touches the local disk but its
    inputs (one worker: the memory is this process's)."""
    import fsspec

    paths, _ = parts
    local = prepare(config(tmp_path, paths, tok_path, out=str(tmp_path / "local"), workers=1))
    url = f"memory://lmforge-test-{os.getpid()}/data"
    try:
        remote = prepare(config(tmp_path, paths, tok_path, out=url, workers=1))
        assert remote["shards"] == local["shards"] and remote["stats"] == local["stats"]
        fs = fsspec.filesystem("memory")
        for s in local["shards"]:
            assert fs.cat_file(f"{url}/{s['path']}") == (tmp_path / "local" / s["path"]
                                                         ).read_bytes()
        assert not fs.exists(f"{url}/.work")
    finally:
        fsspec.filesystem("memory").rm(f"memory://lmforge-test-{os.getpid()}", recursive=True)


@pytest.mark.parametrize("location", ["local", "url"])
def test_store_reads_rows_of_an_npy_file(tmp_path, location):
    from lmforge.data.storage import Store

    root = Store(tmp_path if location == "local" else f"file://{tmp_path}")
    array = np.arange(60, dtype=np.uint64).reshape(20, 3)
    (root / "a.npy").save_array(array)
    assert np.array_equal((root / "a.npy").rows(4, 9), array[4:9])
    assert (root / "a.npy").rows(7, 7).shape == (0, 3)
    assert root.names() == ["a.npy"] and (root / "missing").names() == []
