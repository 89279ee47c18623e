"""Inference benchmark: batch-1 greedy decode tokens/s of lmforge's KV-cache engine.

``decode``: lmforge (eager, and with the decode step under ``torch.compile``) against Hugging Face
``transformers`` ``generate(use_cache=True)`` on the same weights (exported with ``export_hf``)
in the same dtype, same process. Checks that all produce the same token ids.

``quantize``: the engine on the same model unquantized (float32, bfloat16) and weight-only
quantized (INT8 per channel, INT4 group-wise, round to nearest: GPTQ/AWQ give the same layout,
hence the same speed), with the bytes each variant's weights take. The quantized layers use
PyTorch's fused CPU kernels, which take bf16 activations, so the quantized models run in bf16.
Quality (validation bpb change) comes from ``lmforge quantize`` on a trained model.

Each variant decodes greedily from the same random prompt for the same number of new tokens
(transformers with ``min_new_tokens`` so it never stops early), timed end to end (prefill
included), best of ``--repeats`` runs interleaved across variants (background load hits all alike)
after one warm-up run each (which also pays any compilation).

    python benchmarks/inference_bench.py decode [--preset tiny-cpu] [--dtype float32]
    python benchmarks/inference_bench.py quantize [--preset gpt2-124m] [--group-size 128]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable

import torch

from lmforge.inference import SamplingParams, generate
from lmforge.model import ModelConfig, Transformer
from lmforge.quantize import quantize_model, size_report

Variant = Callable[[], list[int]]


def best_times(variants: dict[str, Variant], repeats: int) -> dict[str, tuple[float, list[int]]]:
    """Best wall time and output of each variant, run interleaved after one warm-up each."""
    outs = {name: fn() for name, fn in variants.items()}
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], outs[name]) for name in variants}


def engine(model: Transformer, prompt: list[int], new: int, compile: bool = False) -> Variant:
    return lambda: list(generate(model, prompt, SamplingParams.greedy(new), compile=compile))


def report(results: dict[str, tuple[float, list[int]]], new: int, baseline: str,
           sizes: dict[str, int] | None = None) -> None:
    t_base, ids_base = results[baseline]
    for name, (t, ids) in results.items():
        same = sum(a == b for a, b in zip(ids, ids_base, strict=True))
        size = f"  {sizes[name] / 2**20:8.1f} MiB" if sizes else ""
        print(f"{name:26s} {new / t:8.1f} tok/s  ({t:6.3f} s){size}  {t_base / t:5.2f}x "
              f"vs {baseline}; same greedy ids as {baseline}: {same}/{new}")


def decode(args: argparse.Namespace, model: Transformer, prompt: list[int]) -> None:
    try:
        import transformers
    except ImportError as e:
        raise SystemExit("this benchmark needs transformers: pip install transformers") from e
    from lmforge.export.hf import export_hf
    from lmforge.tokenizer import Tokenizer

    texts = [f"sample text number {i} for a tiny tokenizer" for i in range(50)]
    tok = Tokenizer.train(texts, 300, workers=1, show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tok, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=args.dtype).eval()
    model = model.to(args.dtype)

    def theirs() -> list[int]:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=args.new,
                              min_new_tokens=args.new, do_sample=False, use_cache=True,
                              pad_token_id=0)
        return out[0, len(prompt):].tolist()

    print(f"transformers {transformers.__version__}")
    variants = {"transformers generate": theirs,
                "lmforge eager": engine(model, prompt, args.new),
                "lmforge torch.compile": engine(model, prompt, args.new, compile=True)}
    report(best_times(variants, args.repeats), args.new, "transformers generate")


def quantize(args: argparse.Namespace, model: Transformer, prompt: list[int]) -> None:
    models = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    for mode in ("int8", "int4"):
        models[f"{mode} (bf16 activations)"] = quantize_model(
            copy.deepcopy(model), mode, args.group_size).to(torch.bfloat16)
    sizes = {name: size_report(m).total_bytes for name, m in models.items()}  # as held in memory
    variants = {name: engine(m, prompt, args.new, args.compile) for name, m in models.items()}
    report(best_times(variants, args.repeats), args.new, "float32", sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["decode", "quantize"])
    parser.add_argument("--preset", default=None,
                        help="model shape (random weights); default tiny-cpu for decode, "
                             "gpt2-124m for quantize")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="decode: the dtype both engines run in")
    parser.add_argument("--compile", action="store_true",
                        help="quantize: run every variant's decode step under torch.compile")
    parser.add_argument("--group-size", type=int, default=128, help="INT4 group size")
    parser.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--new", type=int, default=None,
                        help="new tokens to decode (default 200 decode, 64 quantize)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.preset = args.preset or ("tiny-cpu" if args.part == "decode" else "gpt2-124m")
    args.new = args.new or (200 if args.part == "decode" else 64)
    args.dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(args.preset)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt,)).tolist()
    print(f"{args.part}: preset {args.preset} ({model.config.num_params() / 1e6:.1f}M params), "
          f"prompt {args.prompt}, new {args.new}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    (decode if args.part == "decode" else quantize)(args, model, prompt)


if __name__ == "__main__":
    main()
