"""Text generation with stop strings: nothing from a stop string on is ever streamed, text that
might start one is held back, and the joined chunks are exactly the decoded kept text."""

from __future__ import annotations

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import InputError
from lmforge.export.hf import export_hf
from lmforge.inference import SamplingParams, generate, generate_text
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import ENDOFTEXT, Tokenizer


def scripted_model(vocab_size: int, script: list[int], end: int) -> Transformer:
    """A model whose greedy continuation of ``script[:1]`` is ``script[1:]`` then ``end``.

    The residual branches output zero, so the logits depend on the current token only; the LM
    head row of each next token is the normed embedding of the token before it (random 64-dim
    vectors: the matching row scores 64, the others near 0).
    """
    assert len(set(script)) == len(script), "each token must have one successor"
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab_size, d_model=64, n_layers=1, n_heads=4,
                                    n_kv_heads=4, context=64, tie_embeddings=False)).eval()
    with torch.no_grad():
        model.layers[0].self_attn.o_proj.weight.zero_()
        model.layers[0].mlp.down_proj.weight.zero_()
        normed = model.norm(model.embed_tokens.weight)  # (vocab, d_model): what the head sees
        head = torch.zeros_like(model.lm_head.weight)
        for current, following in zip(script, [*script[1:], end], strict=True):
            head[following] = normed[current]
        model.lm_head.weight.copy_(head)
    return model


def stream(model: Transformer, tok: Tokenizer, first: int, stop_ids: list[int] | None = None,
           **kw) -> list[str]:
    params = SamplingParams.greedy(kw.pop("max_new_tokens", 30), **kw)
    return list(generate_text(model, tok, [first], params, stop_ids=stop_ids))


@pytest.fixture(scope="module")
def words(tokenizer: Tokenizer) -> tuple[Transformer, list[int]]:
    """A model that writes ' model learns byte pair merges' after 'the'."""
    ids = tokenizer.encode("the model learns byte pair merges")
    return scripted_model(tokenizer.vocab_size, ids, tokenizer.token_id(ENDOFTEXT)), ids


def test_the_scripted_model_writes_its_script(tokenizer, words):
    model, ids = words
    assert len(ids) > 4
    out = list(generate(model, ids[:1], SamplingParams.greedy(30)))
    assert out[:len(ids)] == [*ids[1:], tokenizer.token_id(ENDOFTEXT)]
    assert "".join(stream(model, tokenizer, ids[0])) == " model learns byte pair merges"


def test_stop_string_split_across_tokens(tokenizer, words):
    model, ids = words
    assert tokenizer.decode(ids[1:3]) == " model learns"  # "l lea" spans both tokens
    chunks = stream(model, tokenizer, ids[0], stop=["l lea"])
    assert "".join(chunks) == " mode"
    assert all(chunks)


def test_stop_string_at_the_very_start(tokenizer, words):
    model, ids = words
    assert stream(model, tokenizer, ids[0], stop=[" mod"]) == []
    assert stream(model, tokenizer, ids[0], stop=["zzz", " model"]) == []


def test_text_that_only_begins_like_a_stop_string_is_released(tokenizer, words):
    model, ids = words
    chunks = stream(model, tokenizer, ids[0], stop=["learnt", "pair merges!"])
    assert "".join(chunks) == " model learns byte pair merges"
    # " learn" was held back until " byte" showed it was not "learnt"
    assert len(chunks) > 1 and not any(c.endswith("learn") for c in chunks)


def test_the_earliest_stop_string_wins(tokenizer, words):
    model, ids = words
    assert "".join(stream(model, tokenizer, ids[0], stop=["pair", "byte"])) == " model learns "


def test_multi_byte_characters_split_across_tokens(tokenizer):
    script = list("Hié€日ok!".encode())  # single-byte ids: each character spans 1-3 tokens
    assert len(script) == 13
    model = scripted_model(tokenizer.vocab_size, script, tokenizer.token_id(ENDOFTEXT))
    chunks = stream(model, tokenizer, script[0])
    assert chunks == ["i", "é", "€", "日", "o", "k", "!"]  # never half a character
    assert "".join(stream(model, tokenizer, script[0], stop=["€日"])) == "ié"
    assert "".join(stream(model, tokenizer, script[0], stop=["日o"])) == "ié€"
    assert "".join(stream(model, tokenizer, script[0], stop=["k!"])) == "ié€日o"


def test_default_stop_ids_end_a_chat_turn(tokenizer, words):
    _, ids = words
    end = tokenizer.token_id("<|end|>")
    model = scripted_model(tokenizer.vocab_size, ids, end)
    assert "".join(stream(model, tokenizer, ids[0])) == " model learns byte pair merges"
    no_stops = "".join(stream(model, tokenizer, ids[0], stop_ids=()))
    assert no_stops.startswith(" model learns byte pair merges<|end|>")


def test_joined_stream_equals_the_decoded_kept_ids(tokenizer):
    torch.manual_seed(3)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2,
                                    n_heads=4, n_kv_heads=2, context=64)).eval()
    with torch.no_grad():  # far from uniform logits, so the greedy text varies
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    prompt = tokenizer.encode("the model")
    ids = list(generate(model, prompt, SamplingParams.greedy(40), stop_ids=()))
    full = tokenizer.decode(ids)
    assert len(ids) == 40 and len(full) > 20
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    chunks = list(generate_text(model, tokenizer, prompt, SamplingParams.greedy(40, stop=[stop]),
                                stop_ids=()))
    assert "".join(chunks) == expected
    never = SamplingParams.greedy(40, stop=["\x00never"])
    assert "".join(generate_text(model, tokenizer, prompt, never, stop_ids=())
                   ) == full  # no stop: all max_new_tokens


def test_bad_input_fails_at_the_call(tokenizer, words):
    model, ids = words
    with pytest.raises(InputError, match="more than the model's context"):
        generate_text(model, tokenizer, ids[:1] * 65, SamplingParams.greedy(5))


def test_cli_generate_stops_at_stop_strings(tokenizer, words, tmp_path, capsys):
    model, ids = words
    assert tokenizer.encode("the") == ids[:1]
    export_hf(model, tokenizer, tmp_path)
    common = ["generate", "--checkpoint", str(tmp_path), "--prompt", "the", "--temperature", "0",
              "--top-p", "0.9", "--repetition-penalty", "1.2"]
    assert main(common) == 0
    assert capsys.readouterr().out == "the model learns byte pair merges\n---\n"
    assert main([*common, "--stop", "zzz", "--stop", "pair", "--num-samples", "2"]) == 0
    assert capsys.readouterr().out == "the model learns byte \n---\n" * 2
