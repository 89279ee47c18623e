"""Our trainer and encoders against Hugging Face ``tokenizers``, ``transformers`` and tiktoken."""

from __future__ import annotations

import json

import pytest
import tiktoken
import tiktoken.load
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer
from lmforge.tokenizer.bytelevel import bytes_to_str
from lmforge.tokenizer.hf import load_hf, save_hf

from .conftest import synthetic_documents


def hf_train(docs: list[str], vocab_size: int, pattern: str, specials: list[str]) -> HFTokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(docs, trainer)
    return hf


def our_merges(tok: Tokenizer) -> list[list[str]]:
    return [[bytes_to_str(a), bytes_to_str(b)] for a, b in tok.merges]


@pytest.mark.parametrize(("pattern", "vocab_size", "workers"),
                         [(GPT4_PATTERN, 1200, 1), (GPT2_PATTERN, 900, 2)])
def test_same_merges_and_tokens_as_hf(corpus, held_out, pattern, vocab_size, workers):
    specials = ["<|endoftext|>", "<|pad|>"]
    ours = Tokenizer.train(corpus, vocab_size, specials, pattern, workers=workers,
                           show_progress=False)
    hf = hf_train(corpus, vocab_size, pattern, specials)
    assert our_merges(ours) == json.loads(hf.to_str())["model"]["merges"]
    assert ours.vocab_size == hf.get_vocab_size() == vocab_size
    # Same tokens on held-back text. Id layouts differ (HF puts specials first and orders the
    # byte alphabet by character), so compare through each side's id → token string map.
    hf_vocab = {i: t for t, i in hf.get_vocab().items()}
    for text in held_out:
        assert [bytes_to_str(ours.vocab[i]) for i in ours.encode(text)] == \
               [hf_vocab[i] for i in hf.encode(text).ids]


def test_tie_breaking_on_tiny_corpus_matches_hf():
    # Every pair is equally frequent here, so only the tie-break decides the merge order.
    docs = ["ab cd ef gh", "ba dc fe hg", "zz yy xx", "éé ü ü"]
    ours = Tokenizer.train(docs, 256 + 12, special_tokens=(), workers=1, show_progress=False)
    hf = hf_train(docs, 256 + 12, GPT4_PATTERN, [])
    assert our_merges(ours) == json.loads(hf.to_str())["model"]["merges"]


def test_reference_encoder_equals_tiktoken_path(tokenizer, held_out):
    for text in held_out:
        assert tokenizer.encode_reference(text) == tokenizer.encode(text)
        assert tokenizer.encode_reference(text, "all") == tokenizer.encode(text, "all")


def test_exported_tokenizer_json_encodes_identically(tokenizer, held_out, tmp_path):
    save_hf(tokenizer, tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in held_out:
        ids = tokenizer.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids
        assert hf.decode(ids, skip_special_tokens=False) == text


def test_transformers_loads_the_export(tokenizer, held_out, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_hf(tokenizer, tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert auto.eos_token == "<|endoftext|>"
    assert auto.eos_token_id == tokenizer.special_tokens["<|endoftext|>"]
    assert auto.pad_token_id == tokenizer.special_tokens["<|pad|>"]
    for text in held_out[:20]:
        ids = tokenizer.encode(text)
        assert auto(text, add_special_tokens=False)["input_ids"] == ids
        assert fast(text, add_special_tokens=False)["input_ids"] == ids
    # HF always parses added tokens in text; ours does when they are allowed.
    text = "hello<|endoftext|>world"
    assert auto(text)["input_ids"] == tokenizer.encode(text, allowed_special="all")


def test_tiktoken_export_rebuilds_an_equal_encoding(tokenizer, held_out, tmp_path):
    from lmforge.tokenizer.tiktoken_file import save_tiktoken

    save_tiktoken(tokenizer, tmp_path)
    ranks = tiktoken.load.load_tiktoken_bpe(str(tmp_path / "tokenizer.tiktoken"))
    meta = json.loads((tmp_path / "tiktoken.json").read_text())
    enc = tiktoken.Encoding("exported", pat_str=meta["pat_str"], mergeable_ranks=ranks,
                            special_tokens=meta["special_tokens"])
    for text in held_out:
        assert enc.encode_ordinary(text) == tokenizer.encode(text)


def test_import_hf_tokenizer_json_keeps_ids(held_out, tmp_path):
    docs = synthetic_documents(200, seed=3)
    hf = hf_train(docs, 700, GPT4_PATTERN, ["<|endoftext|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    imported = load_hf(tmp_path)
    assert imported.special_tokens == {"<|endoftext|>": 0}
    for text in held_out:
        assert imported.encode(text) == hf.encode(text).ids
        assert imported.encode_reference(text) == hf.encode(text).ids
    assert imported.encode("<|endoftext|>", "all") == [0]


def test_import_gpt2_style_vocab_and_merges(held_out, tmp_path):
    docs = synthetic_documents(200, seed=4)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own regex
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(docs, trainer)
    hf.model.save(str(tmp_path))  # vocab.json + merges.txt
    imported = load_hf(tmp_path / "vocab.json")
    assert imported.pattern == GPT2_PATTERN
    assert imported.special_tokens == {"<|endoftext|>": 0}
    for text in held_out:
        assert imported.encode(text) == hf.encode(text).ids


def test_round_trip_through_hf_export_keeps_fingerprint(tokenizer, tmp_path):
    save_hf(tokenizer, tmp_path)
    assert load_hf(tmp_path / "tokenizer.json").fingerprint == tokenizer.fingerprint
