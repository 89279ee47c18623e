"""Hugging Face interchange: write ``tokenizer.json`` (+ ``tokenizer_config.json``), and read a
byte-level BPE from a ``tokenizer.json`` or a GPT-2 style ``vocab.json`` + ``merges.txt``.

The files follow what ``tokenizers`` itself writes for a byte-level BPE: a ``Split`` pre-tokenizer
with our regex (``Isolated``), then ``ByteLevel`` without its own regex; a ``ByteLevel`` decoder;
a ``BPE`` model whose vocabulary and merges are written in GPT-2's byte ↔ character alphabet.
One difference is inherent to HF: it always recognises added (special) tokens in input text,
where :meth:`Tokenizer.encode` treats them as text unless they are allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import TokenizerFileError
from lmforge.files import atomic_write_text
from lmforge.tokenizer.bytelevel import bytes_to_str, str_to_bytes
from lmforge.tokenizer.chat import CHAT_TEMPLATE
from lmforge.tokenizer.pretokenize import GPT2_PATTERN
from lmforge.tokenizer.tokenizer import CHAT_TOKENS, ENDOFTEXT, PAD, Tokenizer


def to_hf_json(tok: Tokenizer) -> dict[str, Any]:
    """The ``tokenizer.json`` document for ``tok``."""
    vocab = {bytes_to_str(t): i for i, t in sorted(tok.vocab.items())
             if i not in tok.special_tokens.values()}
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab,
                  "merges": [[bytes_to_str(a), bytes_to_str(b)] for a, b in tok.merges]},
    }


def hf_tokenizer_config(tok: Tokenizer, model_max_length: int | None = None) -> dict[str, Any]:
    """``tokenizer_config.json`` so that ``transformers.AutoTokenizer`` loads the directory, with
    the chat template when the tokenizer has the chat special tokens."""
    specials = tok.special_tokens
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for s, i in sorted(specials.items(), key=lambda kv: kv[1])},
        "bos_token": None,
        "eos_token": ENDOFTEXT if ENDOFTEXT in specials else None,
        "pad_token": PAD if PAD in specials else None,
        "unk_token": None,
        "additional_special_tokens": [s for s in specials if s not in (ENDOFTEXT, PAD)],
    }
    if all(t in specials for t in CHAT_TOKENS):
        config["chat_template"] = CHAT_TEMPLATE
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def save_hf(tok: Tokenizer, out_dir: str | Path, model_max_length: int | None = None) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "tokenizer.json",
                      json.dumps(to_hf_json(tok), ensure_ascii=False, indent=2))
    atomic_write_text(out_dir / "tokenizer_config.json",
                      json.dumps(hf_tokenizer_config(tok, model_max_length), indent=2))
    return out_dir


# --- import -------------------------------------------------------------------------------------


def load_hf(path: str | Path) -> Tokenizer:
    """Read a byte-level BPE: a ``tokenizer.json`` file, or a directory holding one, or a directory
    (or the ``vocab.json`` path) with GPT-2 style ``vocab.json`` + ``merges.txt``."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _from_tokenizer_json(path / "tokenizer.json")
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return _from_vocab_merges(path / "vocab.json", path / "merges.txt")
        raise TokenizerFileError(f"{path}: holds neither tokenizer.json nor "
                                 "vocab.json + merges.txt")
    if path.name == "vocab.json":
        return _from_vocab_merges(path, path.with_name("merges.txt"))
    if path.is_file():
        return _from_tokenizer_json(path)
    raise TokenizerFileError(f"{path}: no such file or directory")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerFileError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerFileError(f"{path}: not valid JSON ({e})") from None


def _split_merge(merge: Any, where: str) -> tuple[str, str]:
    parts = merge.split(" ") if isinstance(merge, str) else merge
    if not isinstance(parts, list | tuple) or len(parts) != 2:
        raise TokenizerFileError(f"{where}: expected a merge 'A B' or [A, B], got {merge!r}")
    return parts[0], parts[1]


def _pattern_of(pre: dict | None, path: Path) -> str:
    """The split regex of a byte-level pre-tokenizer (ours, Llama 3's or GPT-2's)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    pattern = None
    for step in steps:
        kind = step.get("type") if step else None
        if kind == "Split" and "Regex" in step.get("pattern", {}):
            pattern = step["pattern"]["Regex"]
        elif kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise TokenizerFileError(f"{path}: ByteLevel add_prefix_space=true is not "
                                         "supported (it changes the text before splitting)")
            if step.get("use_regex", True):
                pattern = GPT2_PATTERN
        else:
            raise TokenizerFileError(f"{path}: pre-tokenizer {kind!r} is not supported; "
                                     "expected byte-level BPE (Split regex and/or ByteLevel)")
    if pattern is None:
        raise TokenizerFileError(f"{path}: no ByteLevel pre-tokenizer: not a byte-level BPE")
    return pattern


def _from_tokenizer_json(path: Path) -> Tokenizer:
    doc = _read_json(path)
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise TokenizerFileError(f"{path}: not a Hugging Face BPE tokenizer.json "
                                 "(expected model.type 'BPE' with vocab and merges)")
    if doc.get("normalizer") is not None:
        raise TokenizerFileError(f"{path}: normalizer {doc['normalizer'].get('type')!r} is not "
                                 "supported (byte-level BPE needs none)")
    pattern = _pattern_of(doc.get("pre_tokenizer"), path)
    specials = {t["content"]: t["id"] for t in doc.get("added_tokens", [])}
    return _build(model["vocab"], model["merges"], specials, pattern, path)


def _from_vocab_merges(vocab_path: Path, merges_path: Path) -> Tokenizer:
    vocab = _read_json(vocab_path)
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TokenizerFileError(f"{merges_path}: no such file (vocab.json needs it)") from None
    merges = [line for line in lines if line and not line.startswith("#version")]
    # A token that is neither a byte nor made by a merge (GPT-2's <|endoftext|>) is special.
    made = {"".join(_split_merge(m, str(merges_path))) for m in merges}
    specials = {t: i for t, i in vocab.items() if len(t) > 1 and t not in made}
    return _build(vocab, merges, specials, GPT2_PATTERN, merges_path)


def _build(vocab: dict[str, int], merges: list, specials: dict[str, int], pattern: str,
           path: Path) -> Tokenizer:
    if not isinstance(vocab, dict):
        raise TokenizerFileError(f"{path}: vocab must be an object of token → id")
    special_ids = set(specials.values())
    tokens = {i: str_to_bytes(t, f"{path}: vocab") for t, i in vocab.items()
              if i not in special_ids}
    pairs = []
    for k, m in enumerate(merges):
        a, b = _split_merge(m, f"{path}: merges[{k}]")
        where = f"{path}: merges[{k}]"
        pairs.append((str_to_bytes(a, where), str_to_bytes(b, where)))
    try:
        return Tokenizer(tokens, pairs, specials, pattern)
    except TokenizerFileError as e:
        raise TokenizerFileError(f"{path}: {e}") from None
