"""``lmforge train``: pretraining, a short builder around the shared loop.

Prepared data (manifest → tokenizer) → a fresh model of a preset → AdamW → the token loader →
:func:`lmforge.train.loop.fit` with next-token cross-entropy, validation bits per byte next to
the unigram baseline, and a sample at each evaluation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.config import to_dict
from lmforge.data.loader import TokenLoader
from lmforge.data.manifest import load_manifest
from lmforge.errors import ConfigError
from lmforge.eval.bpb import Validator, token_bytes, unigram_bpb
from lmforge.inference import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import ENDOFTEXT, Tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import init_distributed, shutdown_distributed
from lmforge.train.loop import RunInfo, autocast_for, fit, optimizer_for, place
from lmforge.train.sampling import forward_sample
from lmforge.vocab import check_vocab, padded_vocab

log = logging.getLogger(__name__)


class SpikeInjection:
    """Training batches with a stretch of data steps replaced by uniformly random tokens — a
    batch no model can predict (loss ≈ ln vocab) — to demonstrate spike recovery."""

    def __init__(self, loader: TokenLoader, vocab: int, start: int, length: int) -> None:
        self.loader, self.vocab, self.start, self.length = loader, vocab, start, length

    @property
    def step(self) -> int:
        return self.loader.step

    @step.setter
    def step(self, value: int) -> None:
        self.loader.step = value

    def next_batch(self) -> tuple[Tensor, Tensor]:
        x, y = self.loader.next_batch()
        data_step = self.loader.step - 1
        if self.start <= data_step < self.start + self.length:
            g = torch.Generator().manual_seed(data_step)
            noise = torch.randint(0, self.vocab, (x.shape[0], x.shape[1] + 1), generator=g)
            x, y = noise[:, :-1].to(x.device), noise[:, 1:].to(x.device)
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def next_token_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean cross-entropy of each next token (the model's fused LM-head loss)."""
    x, y = batch
    return model(x, y)


def data_tokenizer(data: str | Path) -> Tokenizer:
    """The tokenizer a prepared data directory was made with, checked against its manifest."""
    manifest = load_manifest(data)
    tok_path = Path(manifest["tokenizer"]["path"])
    tokenizer = Tokenizer.load(tok_path)
    if tokenizer.fingerprint != manifest["tokenizer"]["fingerprint"]:
        raise ConfigError(f"{tok_path}: tokenizer changed since {data} was prepared")
    return tokenizer


def model_config_for(config: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The preset with the run's overrides; the vocabulary fits the tokenizer (padded, see
    :func:`lmforge.vocab.padded_vocab`) unless ``model.vocab_size`` is given."""
    preset_vocab = ModelConfig.from_preset(config.preset).vocab_size
    overrides = {"vocab_size": padded_vocab(tokenizer.vocab_size, preset_vocab), **config.model}
    model_config = ModelConfig.from_preset(config.preset, **overrides)
    check_vocab(tokenizer.vocab_size, model_config.vocab_size, config.data, "model.vocab_size")
    return model_config


def train(config: TrainConfig) -> dict[str, Any]:
    """Pretrain; returns the final figures (also the last line of ``metrics.jsonl``)."""
    env = init_distributed(config.device)
    try:
        tokenizer = data_tokenizer(config.data)
        model_config = model_config_for(config, tokenizer)
        seq_len = config.seq_len or model_config.context
        if seq_len > model_config.context:
            raise ConfigError(f"seq_len: {seq_len} exceeds the model context "
                              f"{model_config.context}")
        torch.manual_seed(config.seed)
        model = place(Transformer(model_config), config, env)
        optimizer = optimizer_for(model, config)
        loader = TokenLoader(config.data, "train", config.batch_size, seq_len,
                             config.loader_mode, config.seed, env.rank, env.world_size,
                             env.device)
        batches = loader if config.inject_spike_at < 0 else SpikeInjection(
            loader, tokenizer.vocab_size, config.inject_spike_at, config.inject_spike_length)

        sizes = token_bytes(tokenizer)
        validator = Validator(config.data, sizes, config.batch_size, seq_len,
                              config.eval_batches, env.device)
        baseline = unigram_bpb(config.data, sizes)

        def evaluate(m: nn.Module) -> dict[str, float]:
            return {**validator.run(m, autocast_for(config, env)), "unigram_bpb": baseline}

        eot = tokenizer.token_id(ENDOFTEXT)
        prompt = tokenizer.encode(config.sample_prompt)

        def sample(m: nn.Module, step: int) -> str:
            params = SamplingParams(max_new_tokens=config.sample_tokens, seed=config.seed + step)
            new = forward_sample(m, prompt, params, (eot,), tokenizer.vocab_size)
            return config.sample_prompt + tokenizer.decode(new)

        # paths resolved: the run's record must still find its data from another directory
        record = {**to_dict(config), "data": str(Path(config.data).resolve()),
                  "out": str(Path(config.out).resolve())}
        info = RunInfo(record, model_config, tokenizer)
        return fit(model, optimizer, batches, next_token_loss, config, env, info,
                   batch_size=config.batch_size, seq_len=seq_len, evaluate=evaluate,
                   sample=sample if config.sample_tokens else None)
    finally:
        shutdown_distributed(env)
