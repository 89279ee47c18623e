"""Small, deterministic fixtures built inside the tests (no network, nothing from ../shared)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from lmforge.data.builtin import python_src
from lmforge.data.pipeline import DataConfig, prepare
from lmforge.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lmforge.model import Transformer

_WORDS = ["the", "model", "learns", "byte", "pair", "merges", "from", "text", "and", "code",
          "while", "données", "naïves", "café", "日本語", "тексты", "123", "4567", "emoji",
          "🙂👍", "tab\tend"]


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """Documents mixing prose, digits, code-like lines, non-Latin scripts and odd whitespace."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(1, 8)):
            words = rng.choices(_WORDS, k=rng.randint(1, 14))
            sep = rng.choice([" ", "  ", " ", "\t"])
            line = sep.join(words)
            if rng.random() < 0.3:
                line = "    " * rng.randint(1, 3) + f"x_{rng.randint(0, 99)} = f({line!r})"
            lines.append(line)
        docs.append(rng.choice(["\n", "\n\n", "\r\n"]).join(lines) + rng.choice(["", "\n", " "]))
    return docs


def prepare_tiny_data(root: Path, n_docs: int, seed: int, val_fraction: float) -> Path:
    """A prepared data directory ``root/data`` of synthetic documents, with its 320-id tokenizer
    at ``root/tok.json``. The corpus is read by a relative path, so that the documents' names —
    which the train/validation split hashes — do not depend on the temporary directory."""
    docs = synthetic_documents(n_docs, seed=seed)
    Tokenizer.train(docs, 320, workers=1, show_progress=False).save(root / "tok.json")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        prepare(DataConfig(input=["corpus.jsonl"], tokenizer=str(root / "tok.json"),
                           out=str(root / "data"), preset="code", val_fraction=val_fraction,
                           workers=1, progress=False, dedup={"near": False}))
    finally:
        os.chdir(cwd)
    return root / "data"


TINY_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "context": 32}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A run directory: a tiny model (:data:`TINY_MODEL`) trained for 30 steps on a tiny
    prepared data directory (``RUN/../data``)."""
    from lmforge.train.config import TrainConfig
    from lmforge.train.pretrain import train

    root = tmp_path_factory.mktemp("trained_run")
    prepare_tiny_data(root, 300, seed=7, val_fraction=0.3)
    train(TrainConfig(data=str(root / "data"), out=str(root / "run"), model=TINY_MODEL,
                      batch_size=4, max_steps=30, warmup_steps=3, eval_every=30, eval_batches=2,
                      save_every=30, sample_tokens=0, progress=False))
    return root / "run"


def random_model(vocab_size: int, tie: bool) -> Transformer:
    """A seeded random Llama-shaped model for the export tests: a non-default RoPE base and norm
    gains away from 1, so a mis-mapped config field or norm weight shows."""
    import torch  # here, not at the top: the tokenizer and data tests do not need torch

    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4,
                                    n_kv_heads=2, context=64, tie_embeddings=tie,
                                    rope_theta=50_000.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def code_documents() -> list[str]:
    """The first 60 standard-library files (they ship with Python: hermetic and real)."""
    docs = []
    for doc in python_src():
        docs.append(doc.text)
        if len(docs) == 60:
            break
    return docs


@pytest.fixture(scope="session")
def corpus(code_documents: list[str]) -> list[str]:
    return code_documents[:50] + synthetic_documents(300)


@pytest.fixture(scope="session")
def held_out(code_documents: list[str]) -> list[str]:
    return code_documents[50:] + synthetic_documents(60, seed=1)


@pytest.fixture(scope="session")
def tokenizer(corpus: list[str]) -> Tokenizer:
    return Tokenizer.train(corpus, 1024, workers=1, show_progress=False)


def tiny_model(n_heads: int = 4, n_kv_heads: int = 2, context: int = 64, vocab_size: int = 97
               ) -> Transformer:
    """A seeded 2-layer model for the inference tests, its matrices scaled ×10 from the init so
    that logits are far from uniform (greedy choices then depend on the prompt)."""
    import torch

    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2,
                                    n_heads=n_heads, n_kv_heads=n_kv_heads, context=context))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return model.eval()
