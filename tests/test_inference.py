"""The KV-cache engine: cached decoding matches full recomputation; sampling keeps exactly the
intended tokens; generation streams, stops, clips and rejects bad input; batches match singles."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError, InputError
from lmforge.inference import (
    KVCache,
    SamplingParams,
    decode_one_token,
    forward_cached,
    generate,
    generate_batch,
    prefill,
    prefill_rows,
    sample,
)
from lmforge.inference.engine import forward_slots
from lmforge.model import Transformer

from .conftest import tiny_model


def greedy_reference(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def greedy(n: int, **kwargs: object) -> SamplingParams:
    return SamplingParams.greedy(n, **kwargs)


def sampled(temperature: float = 1.0, **kwargs: object) -> SamplingParams:
    return SamplingParams(temperature=temperature, **{"top_k": None, **kwargs})


# -------------------------------------------------------------------------------- KV-cache parity


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_cached_decoding_matches_full_recompute(n_heads: int, n_kv_heads: int) -> None:
    model = tiny_model(n_heads, n_kv_heads)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)  # (2, 40, vocab)
    cache = KVCache.allocate(model, batch_size=2, max_len=40)
    assert cache.k[0].shape == (2, n_kv_heads, 40, 8)  # stores kv heads, not query heads
    prompt_len = 7
    logits = prefill(model, cache, ids[:, :prompt_len], torch.arange(prompt_len))
    torch.testing.assert_close(logits, full[:, prompt_len - 1], atol=1e-4, rtol=1e-4)
    for pos in range(prompt_len, 40):  # 33 decode steps
        logits = decode_one_token(model, cache, ids[:, pos:pos + 1], pos)
        torch.testing.assert_close(logits, full[:, pos], atol=1e-4, rtol=1e-4)
    assert cache.length == 40


def test_left_padded_prefill_matches_unpadded() -> None:
    model = tiny_model()
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(prompt)[0, -1]
    cache = KVCache.allocate(model, batch_size=1, max_len=10)
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8]])  # three pad slots, their positions negative
    logits = prefill(model, cache, ids, torch.arange(7) - 3)
    torch.testing.assert_close(logits[0], expected, atol=1e-4, rtol=1e-4)
    assert cache.valid[0, :7].tolist() == [False] * 3 + [True] * 4


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_prefill_rows_matches_a_masked_padded_batch(n_kv_heads: int) -> None:
    """Prompts of different lengths (two of one length go through together), each into its
    own row from slot 0 with unmasked causal attention: the logits and cache of the masked,
    right-padded batch, later slots marked empty; decoding on from either agrees."""
    model = tiny_model(4, n_kv_heads)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17, 18], [19, 20, 21, 22]]
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.tensor([p + [0] * (6 - len(p)) for p in prompts])
    positions = torch.arange(6).repeat(4, 1).masked_fill(torch.arange(6) >= lengths[:, None], -1)
    masked, rows = KVCache.allocate(model, 4, 9), KVCache.allocate(model, 4, 9)
    expected = forward_cached(model, masked, ids, positions)[torch.arange(4), lengths - 1]
    logits = prefill_rows(model, rows, prompts)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            torch.testing.assert_close(logits[row], model(torch.tensor([prompt]))[0, -1],
                                       atol=1e-4, rtol=1e-4)
    assert torch.equal(rows.valid, masked.valid)
    real = rows.valid[:, None, :, None]
    for a, b in zip(rows.k + rows.v, masked.k + masked.v, strict=True):
        torch.testing.assert_close(a * real, b * real, atol=1e-5, rtol=1e-5)
        assert not a[~real.expand_as(a)].any()  # nothing written past a prompt
    token, slots = logits.argmax(-1)[:, None], lengths[:, None]
    with torch.no_grad():
        after = [forward_slots(model, c.k, c.v, c.valid, token, slots, slots)[:, -1]
                 for c in (rows, masked)]
    torch.testing.assert_close(after[0], after[1], atol=1e-5, rtol=1e-5)


def test_prefill_rows_after_a_shared_prefix() -> None:
    """Rows after a prefix kept once (the cache's shared keys and values) attend to all of
    it and causally to their own tokens: the logits of each whole prompt."""
    from lmforge.inference.engine import _prefill_shared

    model = tiny_model(4, 2)
    prefix = list(range(30, 50))
    tails = [[7, 8, 9], [1], [2, 3, 4, 5, 6]]
    cache = KVCache.allocate(model, 3, 8)
    _prefill_shared(model, cache, prefix)
    logits = prefill_rows(model, cache, tails, offset=len(prefix))
    with torch.no_grad():
        for row, tail in enumerate(tails):
            torch.testing.assert_close(logits[row], model(torch.tensor([prefix + tail]))[0, -1],
                                       atol=1e-4, rtol=1e-4)


def test_causal_forward_refuses_a_filled_cache_or_padding() -> None:
    model = tiny_model()
    cache = KVCache.allocate(model, 1, 8)
    with pytest.raises(ValueError, match="causal"):
        forward_cached(model, cache, torch.tensor([[1, 2]]), torch.tensor([[-1, 0]]), causal=True)
    forward_cached(model, cache, torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), causal=True)
    with pytest.raises(ValueError, match="causal"):
        forward_cached(model, cache, torch.tensor([[3]]), torch.tensor([[2]]), causal=True)


def test_cache_overflow_is_an_input_error() -> None:
    model = tiny_model()
    cache = KVCache.allocate(model, batch_size=1, max_len=4)
    with pytest.raises(InputError, match="overflow"):
        prefill(model, cache, torch.zeros(1, 5, dtype=torch.long), torch.arange(5))


# ------------------------------------------------------------------------------------- sampling


def test_greedy_is_argmax() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, greedy(1)), logits.argmax(-1))


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    draws = [sample(logits, sampled(), torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    state = torch.get_rng_state()
    sample(logits, sampled(), torch.Generator().manual_seed(7))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched


def drawn_tokens(logits: torch.Tensor, n: int = 400, **kwargs: object) -> set[int]:
    g = torch.Generator().manual_seed(0)
    return set(sample(logits.expand(n, -1), sampled(**kwargs), g).tolist())


def test_top_k_keeps_exactly_k_largest_even_with_ties() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.5, 2.9]])
    assert drawn_tokens(logits, top_k=2) == {1, 5}
    assert len(drawn_tokens(logits, top_k=3)) == 3  # ties at the 3rd value: still exactly three
    assert drawn_tokens(logits, top_k=1) == {1}


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert drawn_tokens(logits, top_p=0.5) == {0}  # 0.5 alone reaches 0.5
    assert drawn_tokens(logits, top_p=0.51) == {0, 1}
    assert drawn_tokens(logits, top_p=0.9) == {0, 1, 2}
    assert drawn_tokens(logits, top_p=0.01) == {0}  # always at least one
    assert drawn_tokens(logits, top_p=1.0) == {0, 1, 2, 3}


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([[2.0, -1.0, 1.9, -0.5]])
    # token 0 seen: 2.0 / 2 = 1.0 < 1.9, so greedy moves to token 2
    assert sample(logits, greedy(1, repetition_penalty=2.0),
                  previous_tokens=torch.tensor([[0]])) == 2
    # token 3 seen (twice: counted once): -0.5 · 2 = -1.0 < -0.6, so greedy moves to token 1
    out = sample(torch.tensor([[-1.0, -0.6, -5.0, -0.5]]), greedy(1, repetition_penalty=2.0),
                 previous_tokens=torch.tensor([[3, 3]]))
    assert out.item() == 1


def test_sampling_params_reject_bad_arguments() -> None:
    for kwargs in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                   dict(repetition_penalty=0.0), dict(max_new_tokens=-1),
                   dict(temperature=float("inf")), dict(stop=["ok", ""]), dict(stop="x")):
        with pytest.raises(ConfigError, match=next(iter(kwargs))):
            SamplingParams(**kwargs)


# ----------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_greedy_generate_equals_full_recompute_argmax(n_kv_heads: int) -> None:
    model = tiny_model(n_kv_heads=n_kv_heads)
    prompt = [3, 14, 15, 92, 65]
    assert list(generate(model, prompt, greedy(30))) == greedy_reference(model, prompt, 30)


def test_generate_streams_ids_and_seeded_sampling_repeats() -> None:
    model = tiny_model()
    stream = generate(model, [1, 2, 3], sampled(max_new_tokens=5, top_k=10))
    assert isinstance(next(iter(stream)), int)
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.9,
                            repetition_penalty=1.3, seed=3)
    runs = [list(generate(model, [1, 2, 3], params)) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 20


def test_stop_id_ends_generation_and_is_not_yielded() -> None:
    model = tiny_model()
    reference = greedy_reference(model, [4, 5, 6], 12)
    stop = reference[5]
    first = reference.index(stop)
    assert list(generate(model, [4, 5, 6], greedy(12), stop_ids=(stop,))) == reference[:first]


def test_max_new_tokens_clipped_to_context() -> None:
    model = tiny_model(context=16)
    assert len(list(generate(model, list(range(10)), greedy(100)))) == 6
    assert list(generate(model, list(range(16)), greedy(5))) == []


def test_bad_prompts_raise_input_error_at_call_time() -> None:
    model = tiny_model(context=16)
    with pytest.raises(InputError, match="more than the model's context of 16"):
        generate(model, list(range(17)), greedy(4))  # raised before iterating
    with pytest.raises(InputError, match="empty"):
        generate(model, [], greedy(4))
    with pytest.raises(InputError, match="outside"):
        generate(model, [1, 97], greedy(4))


def test_batched_greedy_equals_one_by_one() -> None:
    model = tiny_model()
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 41, 42, 43]]
    singles = [list(generate(model, p, greedy(15))) for p in prompts]
    assert generate_batch(model, prompts, greedy(15)) == singles
    assert [greedy_reference(model, p, 15) for p in prompts] == singles


def test_a_shared_prompt_prefix_is_prefilled_once(monkeypatch) -> None:
    from lmforge.inference import engine

    model = tiny_model()
    prefix = [(5 * i) % 90 + 1 for i in range(30)]  # few-shot examples, say
    prompts = [[*prefix, 7], [*prefix, 1, 2, 3, 4, 5, 6], [*prefix, 40, 41], [*prefix, 9]]
    shared = []
    real = engine._prefill_shared
    monkeypatch.setattr(engine, "_prefill_shared",
                        lambda m, cache, p: (shared.append(len(p)), real(m, cache, p)))
    out = generate_batch(model, prompts, greedy(12))
    assert shared == [30]
    assert out == [greedy_reference(model, p, 12) for p in prompts]
    # one prompt drawn many times (GRPO's group): all but its last token are shared
    same = generate_batch(model, [prompts[1]] * 3, greedy(12))
    assert shared == [30, 35] and same == [out[1]] * 3
    # below the minimum, or a single prompt: nothing is shared
    generate_batch(model, [[3] * 10 + [4], [3] * 10 + [5]], greedy(4))
    generate_batch(model, [prompts[0]], greedy(4))
    assert shared == [30, 35]


def test_continuous_batching_equals_one_by_one() -> None:
    """Five prompts through two rows: each that ends (a stop id, a stop decided by the
    caller, or the length cap) hands its row to the next; every prompt gets the tokens it
    gets alone — greedy, and with a repetition penalty over its own tokens only."""
    model = tiny_model(4, 2)
    prompts = [[7, 8], [20, 21, 22, 23, 24], [3], [50, 51, 52], [60, 61, 62, 63]]
    alone = [greedy_reference(model, p, 14) for p in prompts]
    stop = alone[1][6]
    expected = [a[:a.index(stop)] if stop in a else a for a in alone]
    seen: list[int] = []

    def finished(i: int, ids: list[int]) -> bool:
        seen.append(i)
        return i == 3 and len(ids) == 6  # the caller ends prompt 3 after six tokens

    ends: list[int] = []
    out = generate_batch(model, prompts, greedy(14), stop_ids=(stop,), max_batch=2,
                         finished=finished, on_end=ends.append)
    assert sorted(ends) == [0, 1, 2, 3, 4]  # each prompt once, as it ends
    expected[3] = expected[3][:6]
    assert out == expected
    assert sorted(set(seen)) == [i for i, tokens in enumerate(out) if tokens]
    assert sum(map(len, out)) > 30 and len({len(t) for t in out}) > 2  # rows end apart
    assert generate_batch(model, prompts, greedy(14), stop_ids=(stop,)) == [
        a[:a.index(stop)] if stop in a else a for a in alone]
    penalized = greedy(14, repetition_penalty=1.3)
    assert generate_batch(model, prompts, penalized, max_batch=3) == [
        list(generate(model, p, penalized)) for p in prompts]
    with pytest.raises(InputError, match="max_batch"):
        generate_batch(model, prompts, greedy(4), max_batch=0)


def test_batched_rows_stop_on_their_own() -> None:
    model = tiny_model()
    prompts = [[7, 8], [20, 21, 22, 23, 24]]
    full = [greedy_reference(model, p, 12) for p in prompts]
    stop = full[0][3]
    out = generate_batch(model, prompts, greedy(12), stop_ids=(stop,))
    for row, tokens in zip(out, full, strict=True):
        expected = tokens[:tokens.index(stop)] if stop in tokens else tokens
        assert row == expected
    assert len(out[0]) == full[0].index(stop) < 12  # row 0 stopped early, on its own


def test_compiled_decode_matches_eager_and_compiles_once() -> None:
    """torch.compile of the decode step: same logits as eager over many steps of a left-padded
    GQA batch, and one graph serves every step (the slot is a tensor, not a Python int)."""
    import torch._dynamo

    model = tiny_model(4, 2)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(24) - torch.tensor([[0], [5]])  # row 1 left-padded by 5
    caches = [KVCache.allocate(model, 2, 24) for _ in range(2)]
    for cache in caches:
        prefill(model, cache, ids[:, :8], positions[:, :8])
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(8, 24):
            eager = decode_one_token(model, caches[0], ids[:, t:t + 1], positions[:, t])
            compiled = decode_one_token(model, caches[1], ids[:, t:t + 1], positions[:, t],
                                        compiled=True)
            torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1].k[1], caches[0].k[1], atol=1e-5, rtol=1e-5)


def test_compiled_generation_keeps_one_static_batch() -> None:
    """Generation through the compiled step: prompts of different lengths, one ending early at
    a stop id while the others go on in the same static batch; the eager tokens."""
    model = tiny_model(4, 2)
    prompts = [[7, 8], [20, 21, 22, 23, 24], [60, 61, 62]]
    eager = generate_batch(model, prompts, greedy(12))
    stop = eager[1][3]
    expected = [e[:e.index(stop)] if stop in e else e for e in eager]
    assert generate_batch(model, prompts, greedy(12), stop_ids=(stop,), compile=True) == expected
