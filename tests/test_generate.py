"""Simple sampling: seeded, greedy, stop tokens."""

from __future__ import annotations

import torch

from lmforge.generate import sample
from lmforge.model import ModelConfig, Transformer


def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2,
                                   n_kv_heads=1, context=16))


def test_seeded_sampling_repeats_and_leaves_global_rng_alone():
    model = tiny()
    state = torch.get_rng_state()
    a = sample(model, [1, 2], 10, generator=torch.Generator().manual_seed(3))
    b = sample(model, [1, 2], 10, generator=torch.Generator().manual_seed(3))
    assert a == b and len(a) == 10
    assert torch.equal(torch.get_rng_state(), state)


def test_greedy_follows_argmax_beyond_the_context():
    model = tiny()
    out = sample(model, [1], 20, temperature=0)  # longer than the 16-token context
    ids = [1]
    for _ in range(20):
        ids.append(int(model(torch.tensor([ids[-16:]]))[0, -1].argmax()))
    assert out == ids[1:]


def test_stop_token_ends_the_sample_and_is_not_returned():
    model = tiny()
    greedy = sample(model, [1], 8, temperature=0)
    stop = greedy[3]
    out = sample(model, [1], 8, temperature=0, stop=(stop,))
    assert out == greedy[: greedy.index(stop)]
