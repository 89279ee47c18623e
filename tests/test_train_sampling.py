"""Samples during training (through model.forward): seeded, greedy, stop tokens."""

from __future__ import annotations

import torch

from lmforge.inference import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.train.sampling import forward_sample


def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2,
                                   n_kv_heads=1, context=16))


def test_seeded_sampling_repeats_and_leaves_global_rng_alone():
    model = tiny()
    state = torch.get_rng_state()
    a = forward_sample(model, [1, 2], SamplingParams(max_new_tokens=10, seed=3))
    b = forward_sample(model, [1, 2], SamplingParams(max_new_tokens=10, seed=3))
    assert a == b and len(a) == 10
    assert torch.equal(torch.get_rng_state(), state)


def test_greedy_follows_argmax_beyond_the_context():
    model = tiny()
    out = forward_sample(model, [1], SamplingParams.greedy(20))  # longer than the context (16)
    ids = [1]
    for _ in range(20):
        ids.append(int(model(torch.tensor([ids[-16:]]))[0, -1].argmax()))
    assert out == ids[1:]


def test_stop_token_ends_the_sample_and_is_not_returned():
    model = tiny()
    greedy = forward_sample(model, [1], SamplingParams.greedy(8))
    stop = greedy[3]
    out = forward_sample(model, [1], SamplingParams.greedy(8), stop=(stop,))
    assert out == greedy[: greedy.index(stop)]
