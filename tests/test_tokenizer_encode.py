"""Encoding, decoding and streaming: lossless on any Unicode; special tokens only if allowed."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.errors import ConfigError, InputError
from lmforge.tokenizer import Tokenizer

SPECIAL_LIKE = st.sampled_from(["<|endoftext|>", "<|pad|>", "<|user|>", "<|", "|>", "<|end"])
TEXT = st.lists(st.one_of(st.text(), SPECIAL_LIKE), max_size=6).map("".join)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_decode_encode_round_trip(tokenizer: Tokenizer, text: str):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    # Special-token strings are plain text unless allowed: no special id appears.
    assert not set(ids) & set(tokenizer.special_tokens.values())
    assert tokenizer.decode(tokenizer.encode(text, allowed_special="all")) == text


@settings(max_examples=200, deadline=None)
@given(TEXT)
def test_reference_and_fast_encoders_agree(tokenizer: Tokenizer, text: str):
    assert tokenizer.encode_reference(text) == tokenizer.encode(text)
    assert tokenizer.encode_reference(text, "all") == tokenizer.encode(text, "all")


@settings(max_examples=200, deadline=None)
@given(TEXT)
def test_stream_decoder_reassembles_exactly(tokenizer: Tokenizer, text: str):
    stream = tokenizer.stream_decoder()
    pieces = [stream.push(i) for i in tokenizer.encode(text, allowed_special="all")]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    # Never half a character: no piece ends in a replacement made up for a split sequence.
    assert "\ufffd" not in "".join(pieces) or "\ufffd" in text


def test_stream_decoder_holds_back_partial_characters(tokenizer: Tokenizer):
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1  # a 4-byte character that the small vocabulary splits
    stream = tokenizer.stream_decoder()
    assert [stream.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.push(ids[-1]) == "🙂"


def test_stream_decoder_matches_decode_on_invalid_utf8(tokenizer: Tokenizer):
    ids = [0xC3]  # byte tokens have id = byte value; 0xC3 alone (é's first byte) is not UTF-8
    stream = tokenizer.stream_decoder()
    assert stream.push(ids[0]) + stream.flush() == tokenizer.decode(ids) == "\ufffd"


def test_allowed_special_tokens(tokenizer: Tokenizer):
    eot = tokenizer.special_tokens["<|endoftext|>"]
    text = "a<|endoftext|>b<|pad|>"
    assert eot not in tokenizer.encode(text)
    assert tokenizer.encode(text, allowed_special={"<|endoftext|>"}).count(eot) == 1
    assert tokenizer.special_tokens["<|pad|>"] not in tokenizer.encode(text, {"<|endoftext|>"})
    assert tokenizer.decode(tokenizer.encode(text, "all")) == text
    with pytest.raises(ConfigError, match=re.escape("<|nope|>")):
        tokenizer.encode(text, allowed_special={"<|nope|>"})


def test_special_tokens_sit_after_the_merges(tokenizer: Tokenizer):
    first = 256 + len(tokenizer.merges)
    assert sorted(tokenizer.special_tokens.values()) == list(range(first, tokenizer.vocab_size))
    assert set(tokenizer.special_tokens) == {"<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>",
                                              "<|assistant|>", "<|end|>"}
    assert all(tokenizer.vocab[b] == bytes([b]) for b in range(256))
    assert len(tokenizer.vocab) == tokenizer.vocab_size


def test_encode_batch_equals_encode(tokenizer: Tokenizer, held_out: list[str]):
    assert tokenizer.encode_batch(held_out, workers=2) == [tokenizer.encode(t) for t in held_out]
    assert tokenizer.encode_batch(held_out, "all", workers=1) == \
        [tokenizer.encode(t, "all") for t in held_out]
    # allowed specials travel to the pool's workers too
    marked = [t + "<|endoftext|>" for t in held_out]
    assert tokenizer.encode_batch(marked, "all", workers=2) == \
        [tokenizer.encode(t, "all") for t in marked]


def test_decode_rejects_unknown_ids(tokenizer: Tokenizer):
    with pytest.raises(InputError, match="token id 99999"):
        tokenizer.decode([1, 99999])


def test_tokens_may_span_newlines(tokenizer: Tokenizer):
    # Training saw whole documents, so whitespace runs across lines are single pre-tokens.
    assert any(b"\n" in t and len(t) > 1 for t in tokenizer.vocab.values())


def test_training_never_learns_special_strings(corpus: list[str]):
    docs = ["<|endoftext|>".join(corpus[:40])] * 3
    tok = Tokenizer.train(docs, 700, workers=1, show_progress=False)
    regular = [t for i, t in tok.vocab.items() if i not in tok.special_tokens.values()]
    assert not any(b"<|endoftext|>" in t or b"endoftext" in t for t in regular)


def test_training_stops_when_pairs_run_out():
    tok = Tokenizer.train(["abab"], 10_000, special_tokens=["<|endoftext|>"], workers=1,
                          show_progress=False)
    assert [(a, b) for a, b in tok.merges] == [(b"a", b"b"), (b"ab", b"ab")]
    assert tok.vocab_size == 256 + 2 + 1
