"""Memory of ``lmforge data prepare`` against corpus size: does a worker's peak stay flat?

Two corpora of the data benchmark's recipe (``data_bench.py``: web-like prose, code, docstrings,
10% planted near duplicates and 3% exact ones), 100 MB and 1 GB, both in JSONL files of 25 MB, as
web corpora come in files of a fixed size (Common Crawl's WET files are about 150 MB). Each is
prepared in a fresh process with the default pipeline (web preset, exact + MinHash dedup over the
whole corpus, 2 workers, local executor), and the benchmark reports

* the peak RSS of the largest worker process (``RUSAGE_CHILDREN``: the pool's processes are the
  driver's children and are reaped after each stage) and of the driver (``RUSAGE_SELF``);
* per stage: wall and CPU seconds, µs of CPU per input document and per MB, and the bytes the
  stage left in the work directory (chunk files, dedup entries, duplicate edges, shards): the
  figures a cluster estimate is made of (docs/data.md, "Scaling out").

Target: 1 GB / 100 MB peak RSS ≤ 1.3 for the workers (and the driver).

    python benchmarks/data_memory_bench.py            # builds the corpora once (cached), ~6 min
    python benchmarks/data_memory_bench.py --small 10 --large 100   # a quicker check
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import data_bench  # the corpus recipe

FILE_MB = 25


def _cpu() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(files: list[str], tokenizer: str, out: str) -> dict:
    """One prepare in this process; its peak RSS figures and per-stage costs."""
    from lmforge.data import executors, pipeline
    from lmforge.data.pipeline import DataConfig, prepare

    stages: list[dict] = []
    work = Path(out) / ".work"
    sizes = {"filter+tokenize": ("chunks",), "dedup index": ("dedup",),
             "dedup buckets": ("dedup",), "write shards": ("out",), "count lines": ("lines",)}
    real_map = executors.LocalExecutor.map

    def timed_map(self, fn, jobs, desc, count=None):  # the stage's cost, what it left on disk
        before = {name: _bytes(work / name) for name in sizes.get(desc, ())}
        cpu, start = _cpu(), time.perf_counter()
        result = real_map(self, fn, jobs, desc, count)
        stages.append({"stage": desc, "tasks": len(jobs), "wall": time.perf_counter() - start,
                       "cpu": _cpu() - cpu,
                       "bytes": sum(_bytes(work / n) - before[n] for n in before),
                       "driver_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        return result

    executors.LocalExecutor.map = timed_map
    real_clusters = pipeline.clusters

    def timed_clusters(*args):  # in the driver, between the buckets and the write stage
        cpu, start = _cpu(), time.perf_counter()
        result = real_clusters(*args)
        stages.append({"stage": "dedup clusters (driver)", "tasks": 1,
                       "wall": time.perf_counter() - start, "cpu": _cpu() - cpu,
                       "bytes": (work / "dedup" / "removed.npy").stat().st_size})
        return result

    pipeline.clusters = timed_clusters
    start = time.perf_counter()
    manifest = prepare(DataConfig(input=files, tokenizer=tokenizer, out=out, workers=2,
                                  progress=False))
    return {"wall": time.perf_counter() - start,
            "driver_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "documents": manifest["stats"]["input"]["documents"],
            "kept": manifest["num_documents"], "tokens": manifest["num_tokens"],
            "dedup": manifest["stats"]["dedup"], "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=100, help="small corpus, MB")
    parser.add_argument("--large", type=int, default=1000, help="large corpus, MB")
    parser.add_argument("--work", type=Path,
                        default=Path(tempfile.gettempdir()) / "lmforge-data-bench")
    parser.add_argument("--measure", nargs=3, metavar=("FILES_JSON", "TOKENIZER", "OUT"),
                        help=argparse.SUPPRESS)  # a child process: one prepare
    parser.add_argument("--build", type=int, metavar="MB", help=argparse.SUPPRESS)  # a child
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure[0]), *args.measure[1:])))
        return
    if args.build:
        data_bench.build_corpus(args.build, 0, args.work, files=max(1, args.build // FILE_MB))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for mb in (args.small, args.large):
        # Built in a child: a process's peak RSS is inherited by what it forks and execs, so this
        # one must stay small for the measuring child's figure to be its own.
        subprocess.run([sys.executable, __file__, "--build", str(mb), "--work", str(args.work)],
                       check=True)
        corpus = data_bench.build_corpus(mb, 0, args.work, files=max(1, mb // FILE_MB))
        out = data_bench._fresh(args.work / f"out-memory-{mb}")
        child = subprocess.run([sys.executable, __file__, "--measure",
                                json.dumps([str(p) for p in corpus.files]),
                                str(corpus.tokenizer), str(out)],
                               check=True, capture_output=True, text=True)
        results[mb] = {**json.loads(child.stdout.splitlines()[-1]), "mb": corpus.mb,
                       "files": len(corpus.files)}
        r = results[mb]
        print(f"{mb} MB: {r['documents']:,} documents in {r['files']} files, {r['wall']:.1f} s, "
              f"peak RSS worker {r['worker_rss_mb']:.0f} MB, driver {r['driver_rss_mb']:.0f} MB",
              flush=True)
        data_bench.shutil.rmtree(out, ignore_errors=True)

    small, large = results[args.small], results[args.large]
    print("\n### Peak RSS against corpus size (2 workers, local executor)\n")
    rows = [[f"{r['mb']:.0f}", f"{r['files']}", f"{r['documents']:,}", f"{r['kept']:,}",
             f"{r['dedup']['exact']:,} / {r['dedup']['near']:,}", f"{r['wall']:.1f}",
             f"{r['worker_rss_mb']:.0f}", f"{r['driver_rss_mb']:.0f}"]
            for r in (small, large)]
    print(data_bench._table(["MB", "files", "docs", "kept", "exact / near removed", "wall s",
                             "worker peak RSS MB", "driver peak RSS MB"], rows))
    worker = large["worker_rss_mb"] / small["worker_rss_mb"]
    driver = large["driver_rss_mb"] / small["driver_rss_mb"]
    print(f"\n{args.large} MB / {args.small} MB peak RSS: workers **{worker:.2f}×**, driver "
          f"**{driver:.2f}×** (target ≤ 1.3)")
    print(f"\n### Per stage, {args.large} MB corpus\n")
    rows = [[s["stage"], str(s["tasks"]), f"{s['wall']:.1f}", f"{s['cpu']:.1f}",
             f"{1e6 * s['cpu'] / large['documents']:.0f}", f"{s['cpu'] / large['mb']:.3f}",
             f"{s['bytes'] / 1e6:,.1f}"] for s in large["stages"]]
    print(data_bench._table(["stage", "tasks", "wall s", "CPU s", "CPU µs / input doc",
                             "CPU s / input MB", "MB written"], rows))


if __name__ == "__main__":
    main()
