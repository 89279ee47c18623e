"""``lmforge`` command line: a thin dispatcher, one function per subcommand.

Each handler turns flags into a typed config or arguments, calls the stage's function and prints
the result. Every failure a user can cause — a bad value, a missing or unreadable file, a full
disk — is printed as one line ``lmforge: error: ...`` with exit status 2; ``--debug`` (or
``LMFORGE_DEBUG=1``) shows the traceback instead, for bug reports.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

from lmforge.config import add_arguments, from_args
from lmforge.errors import LmforgeError, TrainingInterrupted

DESCRIPTION = """Build a language model from scratch, end to end, and own every stage.

stages, in pipeline order:
  tokenizer train → data prepare → train → finetune (sft, dpo, grpo) → eval → report;
  generate / chat / serve / quantize / export
  quickstart runs the first three on the built-in offline corpus."""
EPILOG = """Every stage takes --config FILE (YAML of its fields; flags override it).
`lmforge STAGE --help` lists a stage's flags. Docs: docs/*.md in the source tree."""


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _tokenizer_train(args: argparse.Namespace) -> None:
    from lmforge.tokenizer.stage import TokenizerTrainConfig, train_tokenizer

    _, summary = train_tokenizer(from_args(TokenizerTrainConfig, args))
    summary.pop("config")
    print(json.dumps(summary, indent=2))


def _tokenizer_info(args: argparse.Namespace) -> None:
    from lmforge.data.sources import texts
    from lmforge.tokenizer.stage import describe, load_any

    sample = texts(args.sample) if args.sample else ()
    print(json.dumps(describe(load_any(args.tokenizer), sample), indent=2, ensure_ascii=False))


def _tokenizer_encode(args: argparse.Namespace) -> None:
    from lmforge.tokenizer.stage import load_any

    text = sys.stdin.read() if args.text is None else args.text
    ids = load_any(args.tokenizer).encode(text, allowed_special="all" if args.allow_special else ())
    print(" ".join(map(str, ids)))


def _tokenizer_decode(args: argparse.Namespace) -> None:
    from lmforge.tokenizer.stage import load_any

    raw = " ".join(args.ids) if args.ids else sys.stdin.read()
    try:
        ids = [int(x) for x in raw.replace(",", " ").split()]
    except ValueError:
        raise LmforgeError(f"ids: expected integers separated by spaces or commas, got {raw!r}"
                           ) from None
    sys.stdout.write(load_any(args.tokenizer).decode(ids) + "\n")


def _tokenizer_export(args: argparse.Namespace) -> None:
    from lmforge.tokenizer.stage import export_tokenizer, load_any

    for path in export_tokenizer(load_any(args.tokenizer), args.format, args.out, args.force):
        print(path)


def _tokenizer_import(args: argparse.Namespace) -> None:
    from lmforge.tokenizer.stage import import_tokenizer

    tok = import_tokenizer(args.source, args.out, args.force)
    print(f"{args.out}: {tok!r}")


def _data_prepare(args: argparse.Namespace) -> None:
    from lmforge.data.pipeline import DataConfig, prepare

    manifest = prepare(from_args(DataConfig, args))
    print(json.dumps({k: manifest[k] for k in ("num_tokens", "num_documents", "splits", "stats")},
                     indent=2))


def _data_stats(args: argparse.Namespace) -> None:
    from lmforge.data.manifest import summarize

    print(json.dumps(summarize(args.dir), indent=2))


def _data_merge(args: argparse.Namespace) -> None:
    from lmforge.data.manifest import merge_manifests

    merged = merge_manifests(args.dir)
    print(json.dumps({k: merged[k] for k in ("ranks", "num_tokens", "num_documents")}, indent=2))


def _train(args: argparse.Namespace) -> None:
    from lmforge.train.config import TrainConfig
    from lmforge.train.pretrain import train

    summary = train(from_args(TrainConfig, args))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one report
        print(json.dumps(summary, indent=2))


def _finetune(method: str) -> Callable[[argparse.Namespace], None]:
    def handler(args: argparse.Namespace) -> None:
        from lmforge.finetune import stage

        config_class, run = stage.METHODS[method]
        summary = run(from_args(config_class, args))
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one report
            print(json.dumps(summary, indent=2))

    return handler


def _serve(args: argparse.Namespace) -> None:
    from lmforge.serve.stage import ServeConfig, serve

    serve(from_args(ServeConfig, args))


def _generate(args: argparse.Namespace) -> None:
    from lmforge.inference.stage import GenerateConfig, generate_samples

    generate_samples(from_args(GenerateConfig, args), _write, _note)


def _chat(args: argparse.Namespace) -> None:
    from lmforge import load
    from lmforge.inference.chat import ChatConfig, chat

    config = from_args(ChatConfig, args)
    model, tok = load(config.checkpoint, dtype=config.dtype)
    chat(model, tok, sys.stdin, _write, config, prompt="> " if sys.stdin.isatty() else "")


def _export(fmt: str) -> Callable[[argparse.Namespace], None]:
    def handler(args: argparse.Namespace) -> None:
        from lmforge.export.stage import ExportConfig, export_model

        for path in export_model(from_args(ExportConfig, args), fmt, _note):
            print(path)

    return handler


def _eval(args: argparse.Namespace) -> None:
    from lmforge.eval import EvalConfig, evaluate
    from lmforge.eval.run import table

    config = from_args(EvalConfig, args)
    if config.harness:
        from lmforge.eval import harness  # ConfigError (one line) without lm-eval

        report = harness.run_harness(
            config.checkpoint, config.harness, limit=config.limit, num_fewshot=config.shots,
            include_path=config.include_path, task_data=config.task_data,
            batch_size=config.batch_size, device=config.device, dtype=config.dtype,
            out=config.out)
        print(harness.table(report))
    else:
        report = evaluate(config)
        print(table(report))
    print(f"written: {report['out']}")


def _report(args: argparse.Namespace) -> None:
    from lmforge.report import ReportConfig, write_report

    for path in write_report(from_args(ReportConfig, args)):
        print(path)


def _quantize(args: argparse.Namespace) -> None:
    from lmforge.quantize.stage import QuantizeConfig, quantize

    print(json.dumps(quantize(from_args(QuantizeConfig, args)), indent=2))


def _quickstart(args: argparse.Namespace) -> None:
    from lmforge.quickstart import QuickstartConfig, quickstart

    quickstart(from_args(QuickstartConfig, args))


def _parser() -> argparse.ArgumentParser:
    import lmforge
    from lmforge.data.pipeline import DataConfig
    from lmforge.eval.run import EvalConfig
    from lmforge.export.stage import ExportConfig
    from lmforge.finetune.config import DPOConfig, GRPOConfig, SFTConfig
    from lmforge.inference.chat import ChatConfig
    from lmforge.inference.stage import GenerateConfig
    from lmforge.quantize.stage import QuantizeConfig
    from lmforge.quickstart import QuickstartConfig
    from lmforge.serve.stage import ServeConfig
    from lmforge.tokenizer.stage import TokenizerTrainConfig
    from lmforge.train.config import TrainConfig

    parser = argparse.ArgumentParser(
        prog="lmforge", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lmforge {lmforge.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: LMFORGE_DEBUG=1)")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def command(sub: argparse._SubParsersAction, name: str, handler: Callable, help: str,
                config: type | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        if config is not None:
            p.add_argument("--config", help="YAML file of config fields (flags override it)")
            add_arguments(p, config)
        return p

    tok = stages.add_parser("tokenizer", help="train, use and convert byte-level BPE tokenizers")
    tsub = tok.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command(tsub, "train", _tokenizer_train, "train a byte-level BPE tokenizer",
            TokenizerTrainConfig)
    p = command(tsub, "info", _tokenizer_info, "print a tokenizer's statistics")
    p.add_argument("--tokenizer", required=True, help="tokenizer file or HF directory")
    p.add_argument("--sample", nargs="+", help="input SPECs to measure bytes per token on")
    p = command(tsub, "encode", _tokenizer_encode, "print the token ids of a text")
    p.add_argument("--tokenizer", required=True, help="tokenizer file or HF directory")
    p.add_argument("--text", help="text to encode (default: standard input)")
    p.add_argument("--allow-special", action="store_true",
                   help="read special-token strings in the text as special tokens")
    p = command(tsub, "decode", _tokenizer_decode, "print the text of token ids")
    p.add_argument("--tokenizer", required=True, help="tokenizer file or HF directory")
    p.add_argument("ids", nargs="*", help="token ids (default: standard input)")
    p = command(tsub, "export", _tokenizer_export, "write Hugging Face or tiktoken files")
    p.add_argument("--tokenizer", required=True, help="lmforge tokenizer file")
    p.add_argument("--format", required=True, choices=["hf", "tiktoken"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory")
    p = command(tsub, "import", _tokenizer_import,
                "convert a Hugging Face byte-level BPE (tokenizer.json or vocab.json+merges.txt)")
    p.add_argument("--source", required=True, help="tokenizer.json, vocab.json or a directory")
    p.add_argument("--out", required=True, help="lmforge tokenizer file to write")
    p.add_argument("--force", action="store_true", help="replace an existing file")

    data = stages.add_parser("data", help="prepare token shards from raw text")
    dsub = data.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command(dsub, "prepare", _data_prepare,
            "read, filter, deduplicate and tokenize inputs into shards", DataConfig)
    p = command(dsub, "stats", _data_stats, "print a prepared directory's figures")
    p.add_argument("dir", help="directory written by `lmforge data prepare`")
    p = command(dsub, "merge", _data_merge, "merge the rank_*/ manifests of a multi-machine run")
    p.add_argument("dir", help="the --out directory shared by all ranks")

    command(stages, "train", _train, "pretrain a model on prepared data (also under torchrun)",
            TrainConfig)
    finetune = stages.add_parser("finetune", help="adapt a model: SFT, DPO, GRPO (full or LoRA)")
    fsub = finetune.add_subparsers(dest="command", required=True, metavar="METHOD")
    command(fsub, "sft", _finetune("sft"),
            "supervised fine-tuning on conversations, loss on the assistant's tokens only",
            SFTConfig)
    command(fsub, "dpo", _finetune("dpo"), "direct preference optimization on chosen/rejected "
            "pairs", DPOConfig)
    command(fsub, "grpo", _finetune("grpo"), "RL with a verifiable reward (GSM8K answers): "
            "group-relative policy gradient", GRPOConfig)
    command(stages, "generate", _generate, "sample text from a model, streamed", GenerateConfig)
    command(stages, "chat", _chat,
            "talk to a model in the chat format (standard input; /reset, /exit)", ChatConfig)

    export = stages.add_parser("export", help="write a model in other formats")
    esub = export.add_subparsers(dest="command", required=True, metavar="FORMAT")
    command(esub, "hf", _export("hf"), "Hugging Face Llama directory (transformers loads it)",
            ExportConfig)
    command(esub, "gguf", _export("gguf"), "one GGUF file for llama.cpp", ExportConfig)
    command(esub, "peft", _export("peft"), "a LoRA run's adapters in PEFT's format, its base "
            "beside them (peft.AutoPeftModelForCausalLM loads the directory)", ExportConfig)

    command(stages, "eval", _eval,
            "bpb, MMLU, GSM8K, HumanEval (sandboxed) on any model; eval.json + a table",
            EvalConfig)
    command(stages, "serve", _serve, "OpenAI-compatible HTTP server with continuous batching "
            "and a web chat page", ServeConfig)
    command(stages, "quantize", _quantize,
            "int8/int4 weight-only quantization (rtn, gptq, awq) with bpb before and after",
            QuantizeConfig)
    p = command(stages, "report", _report,
                "write a run's report card: report.md and a self-contained report.html")
    p.add_argument("run", metavar="RUN_DIR",
                   help="run directory (`lmforge train --out`), or one holding its run in "
                        "train/ (runs/quickstart)")
    p.add_argument("--out", default="", help="directory to write into (default: the run "
                                             "directory, where the report is regenerated freely)")
    p.add_argument("--force", action="store_true",
                   help="replace report.md/report.html in an --out other than the run directory")
    command(stages, "quickstart", _quickstart,
            "the whole pipeline on the built-in offline corpus", QuickstartConfig)
    return parser


def _os_error(e: OSError) -> str:
    """``PATH: what happened; what to do`` for an error of the operating system."""
    path = e.filename or ""
    hints = {errno.ENOENT: "check the path", errno.EACCES: "check its permissions",
             errno.EPERM: "check its permissions", errno.EROFS: "write somewhere writable",
             errno.ENOSPC: "free some space or write elsewhere",
             errno.EISDIR: "give a file, not a directory",
             errno.ENOTDIR: "a part of the path is a file, not a directory",
             errno.EEXIST: "choose another path"}
    what = e.strerror or type(e).__name__
    hint = hints.get(e.errno or 0)
    return f"{path}: {what.lower()}" + (f"; {hint}" if hint else "") if path else what


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.debug or os.environ.get("LMFORGE_DEBUG"):
        args.handler(args)
        return 0
    try:
        args.handler(args)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 130 if isinstance(e, TrainingInterrupted) else 2
    except OSError as e:
        print(f"lmforge: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
