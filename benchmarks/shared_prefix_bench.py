"""Batched generation with and without the shared-prefix path, on a model of realistic size.

``generate_batch`` prefills a prefix that every prompt of a batch shares once, and every row
attends to that one copy (cascade attention). This runs the same batch both ways — the second by
turning the detection off, so every row prefills and attends to its own copy of the prefix, as
before — and checks that the tokens are the same.

Model: the ``gpt2-124m`` shape (768 wide, 12 layers, 12 heads; random weights: the speed does
not depend on them), float32 on the CPU. Batch: 16 prompts of a shared ``--prefix`` tokens plus
40–55 tokens of their own (few-shot examples before each question), ``--new`` greedy tokens.

    python benchmarks/shared_prefix_bench.py [--prefix 600] [--new 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from lmforge.inference import SamplingParams, engine, generate_batch
from lmforge.model import ModelConfig, Transformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", type=int, default=600)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=8192, d_model=768, n_layers=12, n_heads=12,
                                    n_kv_heads=12, context=1024)).eval()
    prefix = torch.randint(0, 8000, (args.prefix,)).tolist()
    prompts = [prefix + torch.randint(0, 8000, (40 + i,)).tolist() for i in range(args.batch)]
    params = SamplingParams.greedy(args.new)
    detect = engine._shared_prefix

    def run(shared: bool) -> tuple[float, list[list[int]]]:
        engine._shared_prefix = detect if shared else (lambda _prompts: 0)
        try:
            start = time.perf_counter()
            out = generate_batch(model, prompts, params)
            return time.perf_counter() - start, out
        finally:
            engine._shared_prefix = detect

    best = {False: float("inf"), True: float("inf")}
    outs = {}
    for _ in range(args.repeats):
        for shared in (False, True):
            seconds, outs[shared] = run(shared)
            best[shared] = min(best[shared], seconds)
    print(f"gpt2-124m shape, {args.batch} prompts = {args.prefix} shared + 40–"
          f"{39 + args.batch} own tokens, {args.new} new tokens, {torch.get_num_threads()} "
          f"threads, best of {args.repeats}:")
    print(f"  each row its own prefix: {best[False]:.2f} s")
    print(f"  prefix shared:           {best[True]:.2f} s  ({best[False] / best[True]:.2f}×)")
    print(f"  same tokens: {outs[False] == outs[True]}")


if __name__ == "__main__":
    main()
