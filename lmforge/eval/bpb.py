"""Bits per byte: the validation figures training logs, the unigram baseline a model must beat,
and the ``bpb`` evaluation task on any text.

Bits per byte (bpb) normalizes the loss by the text it covers, so models with different
tokenizers compare: bpb = Σ loss_nats / (ln 2 · Σ bytes), summed over target tokens that stand
for text (special tokens such as ``<|endoftext|>`` count 0 bytes and are left out).
"""

from __future__ import annotations

import logging
import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.loader import TokenLoader
from lmforge.data.manifest import load_manifest
from lmforge.data.shards import Shard
from lmforge.data.sources import ReadOptions, documents
from lmforge.errors import InputError
from lmforge.eval.scoring import rolling_logprobs
from lmforge.eval.task import Env, Example, Prediction
from lmforge.evaluating import evaluating
from lmforge.tokenizer import ENDOFTEXT, Tokenizer

log = logging.getLogger(__name__)


def token_bytes(tok: Tokenizer) -> np.ndarray:
    """UTF-8 length of each token id; 0 for special tokens."""
    sizes = np.zeros(tok.vocab_size, dtype=np.int64)
    specials = set(tok.special_tokens.values())
    for i, t in tok.vocab.items():
        sizes[i] = 0 if i in specials else len(t)
    return sizes


class Validator:
    """Fixed validation batches (the same ones every time), evaluated without gradients.

    A validation split smaller than one batch is still used: in fewer or shorter sequences (with
    a one-line note); only an empty split is refused."""

    def __init__(self, data_dir: str | Path, sizes: np.ndarray, batch_size: int, seq_len: int,
                 batches: int, device: torch.device) -> None:
        tokens = sum(len(s) for s in _split_shards(Path(data_dir), "val"))
        if tokens < 2:
            raise InputError(f"{data_dir}: the validation split is empty; prepare the data "
                             "with a larger --val-fraction so that some documents are held out")
        fit_seq = min(seq_len, tokens - 1)
        fit_batch = min(batch_size, (tokens - 1) // fit_seq)
        if (fit_batch, fit_seq) != (batch_size, seq_len):
            log.warning("%s: the validation split has only %d tokens: evaluating on one batch "
                        "of %d×%d instead of %d×%d", data_dir, tokens, fit_batch, fit_seq,
                        batch_size, seq_len)
        self.loader = TokenLoader(data_dir, "val", fit_batch, fit_seq, mode="sequential",
                                  device=device)
        self.batches = min(batches, self.loader.num_windows // fit_batch)
        self.sizes = torch.as_tensor(sizes, device=device)

    @torch.no_grad()
    def run(self, model: nn.Module, autocast: AbstractContextManager) -> dict[str, float]:
        self.loader.step = 0
        nats = bpb_nats = 0.0
        tokens = nbytes = 0
        with evaluating(model):
            for _ in range(self.batches):
                x, y = self.loader.next_batch()
                with autocast:
                    logits = model(x)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                       reduction="none")
                b = self.sizes[y.flatten()]
                nats += loss.sum().item()
                tokens += y.numel()
                bpb_nats += loss[b > 0].sum().item()
                nbytes += int(b.sum().item())
        return {"val_loss": nats / tokens, "val_bpb": bpb_nats / (math.log(2) * nbytes)}


def _split_shards(data_dir: Path, split: str) -> list[Shard]:
    return [Shard(data_dir / s["path"]) for s in load_manifest(data_dir)["shards"]
            if s["split"] == split]


def unigram_bpb(data_dir: str | Path, sizes: np.ndarray) -> float:
    """bpb of the validation split under the training split's token frequencies (add-one
    smoothed): what a model that ignores context achieves."""
    data_dir = Path(data_dir)
    counts = np.ones(len(sizes))
    for shard in _split_shards(data_dir, "train"):  # shard by shard: never the whole split at once
        counts += np.bincount(shard.tokens, minlength=len(sizes))
    log2p = np.log2(counts / counts.sum())
    parts = [np.asarray(shard.tokens) for shard in _split_shards(data_dir, "val")]
    val = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    val = val[sizes[val] > 0]
    return float(-log2p[val].sum() / sizes[val].sum())


# ------------------------------------------------------------------------------- the bpb task

STREAM_PIECE = 1 << 16  # predicted tokens per example of a prepared token stream


@dataclass
class BitsPerByte:
    """bpb and perplexity of a model on text: files, globs or JSONL (any input SPEC of
    :mod:`lmforge.data.sources`, one document per file or record) or a prepared data directory
    (its validation shards, each one token stream, read in pieces of ``STREAM_PIECE`` predicted
    tokens — a multiple of every power-of-two context, so the windows are those of the whole
    stream). A document is read after an
    ``<|endoftext|>`` token, in rolling windows (:func:`~lmforge.eval.scoring.rolling_logprobs`):
    every token is predicted once. Bytes are those of the text (UTF-8), special tokens excluded."""

    inputs: list[str]
    field: str = "text"
    name: str = "bpb"
    chance: float | None = None

    def settings(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "field": self.field}

    def examples(self) -> list[Example]:
        out: list[Example] = []
        for spec in self.inputs:
            if Path(spec, "manifest.json").is_file():  # validation shards, in pieces
                for shard in _split_shards(Path(spec), "val"):
                    out += [{"id": f"{spec}/{shard.path.name}@{a}", "shard": str(shard.path),
                             "start": a, "end": min(len(shard), a + STREAM_PIECE + 1)}
                            for a in range(0, len(shard) - 1, STREAM_PIECE)]
            else:
                out += [{"id": doc.name, "text": doc.text}
                        for doc in documents(spec, ReadOptions(field=self.field))]
        if not out:
            raise InputError(f"bpb: no documents in {', '.join(self.inputs)}")
        return out

    def run(self, env: Env, examples: list[Example]) -> list[Prediction]:
        tok = env.tokenizer
        eot = tok.special_tokens.get(ENDOFTEXT)
        sizes = torch.as_tensor(token_bytes(tok))
        out = []
        for ex in examples:
            if "shard" in ex:  # a token stream whose documents end in <|endoftext|>
                tokens = Shard(Path(ex["shard"])).tokens[ex["start"]:ex["end"]]
                ids = np.asarray(tokens, dtype=np.int64).tolist()
            else:
                ids = tok.encode(ex["text"])
                ids = ids if eot is None else [eot, *ids]
            if len(ids) < 2:
                continue
            logp = rolling_logprobs(env.model, ids).cpu()
            nbytes = sizes[torch.as_tensor(ids[1:])]
            text = nbytes > 0
            out.append({"id": ex["id"], "tokens": len(ids) - 1,
                        "nats": float(-logp.sum()), "text_nats": float(-logp[text].sum()),
                        "bytes": int(nbytes.sum())})
            if env.progress:
                env.progress(1)
        return out

    def metrics(self, predictions: list[Prediction]) -> dict[str, Any]:
        tokens = sum(p["tokens"] for p in predictions)
        nbytes = sum(p["bytes"] for p in predictions)
        nats = sum(p["nats"] for p in predictions)
        return {"bpb": sum(p["text_nats"] for p in predictions) / (math.log(2) * max(nbytes, 1)),
                "perplexity": math.exp(nats / max(tokens, 1)), "tokens": tokens,
                "bytes": nbytes, "n": len(predictions)}
