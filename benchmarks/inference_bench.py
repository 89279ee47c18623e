"""Inference benchmark: greedy decode tokens/s of lmforge's KV-cache engine against Hugging Face
``transformers`` ``generate(use_cache=True)`` on the same weights (exported with ``export_hf``).

Both decode greedily from the same prompt for the same number of new tokens (HF with
``min_new_tokens`` so it never stops early); timed end to end (prefill included), best of
``--repeats`` interleaved runs, after one warm-up run each. Also checks that both produce the
same token ids.

    python benchmarks/inference_bench.py [--preset tiny-cpu] [--new 200] [--prompt 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from lmforge.export.hf import export_hf
from lmforge.inference import generate
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer


def best_times(fns: list, repeats: int) -> list[tuple[float, list[int]]]:
    """Best wall time and output of each function, run interleaved (so background load on a
    shared machine hits both alike) after one warm-up call each."""
    outs = [fn() for fn in fns]
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return list(zip(best, outs, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--new", type=int, default=200, help="new tokens to decode")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    try:
        import transformers
    except ImportError as e:
        raise SystemExit("this benchmark needs transformers: pip install transformers") from e

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(args.preset)).eval()
    texts = [f"sample text number {i} for a tiny tokenizer" for i in range(50)]
    tok = Tokenizer.train(texts, 300, workers=1, show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tok, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt,)).tolist()

    def ours() -> list[int]:
        return list(generate(model, prompt, args.new))

    def theirs() -> list[int]:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=args.new,
                              min_new_tokens=args.new, do_sample=False, use_cache=True,
                              pad_token_id=0)
        return out[0, len(prompt):].tolist()

    (t_ours, ids_ours), (t_hf, ids_hf) = best_times([ours, theirs], args.repeats)
    same = sum(a == b for a, b in zip(ids_ours, ids_hf, strict=True))
    print(f"preset {args.preset}, prompt {args.prompt}, new {args.new}, "
          f"torch threads {torch.get_num_threads()}, transformers {transformers.__version__}")
    print(f"lmforge       {args.new / t_ours:8.1f} tok/s  ({t_ours:.3f} s)")
    print(f"transformers  {args.new / t_hf:8.1f} tok/s  ({t_hf:.3f} s)")
    print(f"speedup {t_hf / t_ours:.2f}x; identical greedy tokens: {same}/{args.new}")


if __name__ == "__main__":
    main()
