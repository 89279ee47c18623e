"""Serving benchmark: throughput and latency of ``lmforge serve``'s continuous batching against
the same requests run one after another through the engine, in one run.

Model: the ``tinystories-17m`` shape, randomly initialized (decode speed does not depend on the
weights), its vocabulary padded from ``--tokenizer``'s. Prompts are ``--prompt-tokens`` random
ordinary token ids, a distinct one per request, sent as ids to ``/v1/completions`` with greedy
decoding for ``--max-tokens``; the only stop id there is <|endoftext|>, which random weights
rarely draw, and every figure is computed from the tokens actually generated (the usage counts,
or the engine's output).

The server (:class:`~lmforge.serve.stage.BackgroundServer`, ``--max-batch`` slots) runs in this
process; the clients (asyncio, httpx) run in a child process, so that they share the cores with
the server but not its GIL (in the same process they cut the 8-client throughput by ~40%):

1. Throughput: ``C`` clients (each of ``--levels``) send ``--requests-per-client`` requests back
   to back; aggregate generated tokens/s, against ``generate()`` (batch 1, in-process, no HTTP)
   over exactly the same requests one after another (each request's engine time is measured once,
   before the server starts).
2. Time to first token: streaming requests, to the first SSE event (the first token), of a lone
   client sending requests one at a time, and of ``--ttft-clients`` concurrent clients; median
   and p90. Concurrent clients that all start at once stay in step (every request is as long),
   so each request arrives with the others and waits for their prefills too; they are also
   measured staggered (client k starts k/C of a request's duration late), as independent
   users arrive.
3. Threads: the 8-client throughput run again with each of ``--thread-counts`` torch intra-op
   threads, ``--repeats`` times alternating, each on a fresh server (the count is set before its
   scheduler thread starts, which takes it up then; the table shows what that thread ran with).

The main runs use ``--threads`` (default: what ``lmforge serve`` picks, the cores minus one).
``--dtype bf16`` runs both sides in bf16 (on CPUs with AMX or AVX512-BF16 a batch of rows costs
little more than one row there, so decode stays bound by reading the weights).
The load average before and after is printed: on a shared machine other jobs move every figure.

    python benchmarks/serve_bench.py [--tokenizer runs/quickstart/tokenizer.lmforge.json]
        [--levels 1 4 8 16] [--requests-per-client 6] [--max-tokens 64] [--prompt-tokens 32]
        [--ttft-requests 32] [--ttft-clients 8] [--threads 0] [--thread-counts 1 2]
        [--repeats 2] [--max-batch 16] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import multiprocessing
import os
import platform
import random
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import torch

from lmforge.hardware import DTYPES
from lmforge.inference import SamplingParams, generate
from lmforge.model import ModelConfig, Transformer
from lmforge.serve.app import ServerSettings
from lmforge.serve.stage import BackgroundServer, torch_threads
from lmforge.tokenizer import ENDOFTEXT, Tokenizer
from lmforge.vocab import padded_vocab

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = httpx.Timeout(300.0)
T = TypeVar("T")


@dataclass
class Run:
    """One throughput measurement."""

    clients: int
    requests: int
    tokens: int
    seconds: float
    engine_seconds: float  # the same requests through generate(), one after another
    engine_tokens: int
    scheduler_threads: int  # torch threads the scheduler thread ran with

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def engine_tokens_per_s(self) -> float:
        return self.engine_tokens / self.engine_seconds


class ThreadProbe:
    """Records ``torch.get_num_threads()`` as seen from the thread that runs the model."""

    def __init__(self, model: Transformer) -> None:
        self.seen = 0
        model.embed_tokens.register_forward_pre_hook(self._record)

    def _record(self, _module: object, _inputs: tuple) -> None:
        if threading.current_thread() is not threading.main_thread():
            self.seen = torch.get_num_threads()


def engine_times(model: Transformer, prompts: list[list[int]], max_tokens: int, stop: int,
                 vocab: int) -> list[tuple[float, int]]:
    """(seconds, tokens generated) of each prompt through ``generate()``, batch 1, greedy."""
    params = SamplingParams.greedy(max_tokens)
    list(generate(model, prompts[0], params, stop_ids=(stop,), vocab_size=vocab))  # warm-up
    out = []
    for prompt in prompts:
        start = time.perf_counter()
        tokens = list(generate(model, prompt, params, stop_ids=(stop,), vocab_size=vocab))
        out.append((time.perf_counter() - start, len(tokens)))
    return out


def body(prompt: list[int], max_tokens: int, stream: bool = False) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


async def throughput(url: str, prompts: list[list[int]], clients: int, max_tokens: int
                     ) -> tuple[float, int]:
    """(wall seconds, tokens generated): ``clients`` clients share ``prompts``, each sending its
    requests back to back."""
    todo = list(reversed(prompts))
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while todo:
            r = await http.post("/v1/completions", json=body(todo.pop(), max_tokens))
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - start, tokens


async def first_tokens(url: str, prompts: list[list[int]], clients: int, max_tokens: int,
                       stagger: float = 0.0) -> list[float]:
    """Seconds from sending each streaming request to its first SSE event (its first token),
    ``clients`` at a time, each client's requests back to back, client k starting
    ``k * stagger`` seconds late."""
    todo = list(reversed(prompts))
    out: list[float] = []

    async def client(http: httpx.AsyncClient, k: int) -> None:
        await asyncio.sleep(k * stagger)
        while todo:
            start = time.perf_counter()
            async with http.stream("POST", "/v1/completions",
                                   json=body(todo.pop(), max_tokens, stream=True)) as r:
                r.raise_for_status()
                first = None
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: "):
                        first = time.perf_counter() - start
                out.append(first)

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as http:
        await asyncio.gather(*(client(http, k) for k in range(clients)))
    return out


def throughput_run(url: str, prompts: list[list[int]], clients: int, max_tokens: int
                   ) -> tuple[float, int]:
    """:func:`throughput` from a synchronous caller (the client process)."""
    return asyncio.run(throughput(url, prompts, clients, max_tokens))


def first_tokens_run(url: str, prompts: list[list[int]], clients: int, max_tokens: int,
                     stagger: float = 0.0) -> list[float]:
    """:func:`first_tokens` from a synchronous caller (the client process)."""
    return asyncio.run(first_tokens(url, prompts, clients, max_tokens, stagger))


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(ROOT / "runs" / "quickstart" /
                                                   "tokenizer.lmforge.json"),
                        help="any lmforge tokenizer (its size sets the padded vocabulary)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16],
                        help="concurrent clients")
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64, help="generated per request")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--ttft-requests", type=int, default=32,
                        help="streaming requests per time-to-first-token case")
    parser.add_argument("--ttft-clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads of the main runs (0: as lmforge serve "
                             "picks them, the cores minus one)")
    parser.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2],
                        help="torch intra-op threads to compare at --ttft-clients clients")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each thread count, alternating (best reported)")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's KV-cache slots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="weights of both sides (bf16: AMX/AVX512-BF16 matmuls where the "
                             "CPU has them; `lmforge serve --dtype bf16`)")
    args = parser.parse_args()

    tok = Tokenizer.load(args.tokenizer)
    stop = tok.special_tokens[ENDOFTEXT]
    torch.manual_seed(args.seed)
    config = ModelConfig.from_preset("tinystories-17m",
                                     vocab_size=padded_vocab(tok.vocab_size, 10_000))
    model = Transformer(config).eval().to(DTYPES[args.dtype])
    probe = ThreadProbe(model)
    rng = random.Random(args.seed)
    ordinary = [i for i in range(tok.vocab_size) if i not in tok.special_tokens.values()]
    n_prompts = max(*args.levels, args.ttft_clients) * args.requests_per_client
    prompts = [rng.choices(ordinary, k=args.prompt_tokens)
               for _ in range(n_prompts + 3 * args.ttft_requests)]
    threads = torch_threads(args.threads)
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {platform.machine()}, os.cpu_count() "
          f"{os.cpu_count()}; torch {torch.__version__}, {threads} intra-op thread(s); model "
          f"tinystories-17m shape, {config.num_params() / 1e6:.1f}M params, vocab "
          f"{config.vocab_size} (tokenizer {tok.vocab_size}), {args.dtype}, random init; "
          f"{args.prompt_tokens}-token prompts, {args.max_tokens} new tokens (greedy); server "
          f"max_batch {args.max_batch}", flush=True)

    # The engine alone, one request after another: each throughput request's time, measured once.
    wall = time.perf_counter()
    engine = engine_times(model, prompts[:n_prompts], args.max_tokens, stop, tok.vocab_size)
    print(f"engine, batch 1: {n_prompts} requests in {time.perf_counter() - wall:.1f} s",
          flush=True)

    def served(threads: int) -> BackgroundServer:
        torch.set_num_threads(threads)  # before the server's scheduler thread starts
        settings = ServerSettings(model_name="bench", max_batch=args.max_batch,
                                  max_queue=4 * n_prompts)
        return BackgroundServer(settings, lambda: (model, tok))

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def remote(fn: Callable[..., T], *fn_args: object) -> T:
        return pool.submit(fn, *fn_args).result()

    def warm_up(url: str) -> None:
        remote(throughput_run, url, prompts[:args.max_batch], args.max_batch, 8)

    def measure(url: str, clients: int) -> Run:
        chosen = prompts[:clients * args.requests_per_client]
        seconds, tokens = remote(throughput_run, url, chosen, clients, args.max_tokens)
        same = engine[:len(chosen)]
        run = Run(clients, len(chosen), tokens, seconds, sum(s for s, _ in same),
                  sum(n for _, n in same), probe.seen)
        print(f"{clients} clients, {run.scheduler_threads} thread(s): {run.tokens_per_s:.0f} "
              f"tokens/s ({run.tokens_per_s / run.engine_tokens_per_s:.2f}× the engine alone)",
              flush=True)
        return run

    runs: dict[int, Run] = {}
    with served(threads) as url:
        warm_up(url)
        for clients in sorted(set(args.levels) | {args.ttft_clients}):
            runs[clients] = measure(url, clients)
        # one request's duration at --ttft-clients clients: the staggered clients' spacing
        duration = runs[args.ttft_clients].seconds / args.requests_per_client
        n, c = args.ttft_requests, args.ttft_clients
        ttft_prompts = [prompts[n_prompts + i * n:n_prompts + (i + 1) * n] for i in range(3)]
        ttft = {"lone client": remote(first_tokens_run, url, ttft_prompts[0], 1,
                                      args.max_tokens),
                f"{c} concurrent clients, started together": remote(
                    first_tokens_run, url, ttft_prompts[1], c, args.max_tokens),
                f"{c} concurrent clients, staggered": remote(
                    first_tokens_run, url, ttft_prompts[2], c, args.max_tokens, duration / c)}
    by_threads: dict[int, list[Run]] = {t: [] for t in args.thread_counts}
    for _ in range(args.repeats):
        for t in args.thread_counts:  # alternating: background load changes hit all alike
            with served(t) as url:
                warm_up(url)
                by_threads[t].append(measure(url, args.ttft_clients))
    pool.shutdown()
    load_after = os.getloadavg()

    print(f"\nload average (1, 5, 15 min) before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}\n")
    print("| concurrent clients | requests | tokens | wall s | server tokens/s | engine alone, "
          "one by one, tokens/s | ratio |\n|" + "---|" * 7)
    for clients in args.levels:
        r = runs[clients]
        print(f"| {r.clients} | {r.requests} | {r.tokens} | {r.seconds:.2f} | "
              f"{r.tokens_per_s:.0f} | {r.engine_tokens_per_s:.0f} | "
              f"{r.tokens_per_s / r.engine_tokens_per_s:.2f}× |")

    print("\n| time to first token | requests | median ms | p90 ms | median vs lone |\n|"
          + "---|" * 5)
    lone = statistics.median(ttft["lone client"])
    for name, values in ttft.items():
        print(f"| {name} | {len(values)} | {statistics.median(values) * 1e3:.1f} | "
              f"{p90(values) * 1e3:.1f} | {statistics.median(values) / lone:.2f}× |")

    print(f"\n| torch threads set | scheduler thread ran with | tokens/s at {args.ttft_clients} "
          f"clients, each run | best | best vs engine alone ({threads} thread) |\n|"
          + "---|" * 5)
    best = {t: max(rs, key=lambda r: r.tokens_per_s) for t, rs in by_threads.items()}
    for t, rs in by_threads.items():
        print(f"| {t} | {', '.join(str(r.scheduler_threads) for r in rs)} | "
              f"{', '.join(f'{r.tokens_per_s:.0f}' for r in rs)} | {best[t].tokens_per_s:.0f} | "
              f"{best[t].tokens_per_s / best[t].engine_tokens_per_s:.2f}× |")
    ranked = sorted(best, key=lambda t: best[t].tokens_per_s, reverse=True)
    margin = best[ranked[0]].tokens_per_s / best[ranked[-1]].tokens_per_s - 1
    print(f"\nbest on this machine now: {ranked[0]} torch thread(s), {margin:.0%} ahead of the "
          f"slowest" + (" (within run-to-run noise)" if margin < 0.05 else ""))


if __name__ == "__main__":
    main()
