"""The byte-level BPE tokenizer: vocabulary, merges, special tokens, encoding and decoding.

A token is a byte string; ids index the vocabulary. Tokenizers trained here lay ids out as
tiktoken does: the 256 single bytes (id = byte value), merged tokens in merge order, then the
special tokens. Imported tokenizers keep their own ids.

Two encoders give the same ids:

* :meth:`Tokenizer.encode_reference`, a readable Python implementation of BPE: split the text at
  allowed special tokens, pre-tokenize with the regex, then in each piece repeatedly merge the
  adjacent pair with the earliest merge rank;
* :meth:`Tokenizer.encode` (and :meth:`encode_batch`), a ``tiktoken.Encoding`` built from our
  ranks, which is what every later stage uses.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import multiprocessing as mp
from collections.abc import Collection, Iterable, Sequence
from functools import cached_property
from itertools import pairwise
from pathlib import Path
from typing import Literal

import numpy as np
import regex
import tiktoken

from lmforge.errors import ConfigError, InputError, TokenizerFileError
from lmforge.files import atomic_write_text
from lmforge.progress import progress_bar
from lmforge.tokenizer.bpe_train import train_bpe
from lmforge.tokenizer.bytelevel import bytes_to_str, str_to_bytes
from lmforge.tokenizer.pretokenize import GPT4_PATTERN, count_words, special_pattern

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
DEFAULT_SPECIAL_TOKENS = (ENDOFTEXT, PAD, *CHAT_TOKENS)

FILE_FORMAT = "lmforge-tokenizer"
FILE_VERSION = 1

AllowedSpecial = Literal["all"] | Collection[str]


class Tokenizer:
    """Byte-level BPE. Build it with :meth:`train`, :meth:`load` or ``lmforge.tokenizer.hf``."""

    def __init__(
        self,
        tokens: dict[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: dict[str, int],
        pattern: str = GPT4_PATTERN,
    ) -> None:
        self._tokens = dict(tokens)
        self.merges = [tuple(m) for m in merges]
        self.special_tokens = dict(special_tokens)
        self.pattern = pattern
        self._validate()
        self._id_of = {t: i for i, t in self._tokens.items()}
        self._merge_rank = {pair: r for r, pair in reversed(list(enumerate(self.merges)))}
        self._special_of_id = {i: s for s, i in self.special_tokens.items()}
        self._pieces = regex.compile(pattern)

    def _validate(self) -> None:
        known = set(self._tokens.values())
        missing = [b for b in range(256) if bytes([b]) not in known]
        if missing:
            raise TokenizerFileError(f"vocabulary lacks {len(missing)} of the 256 single-byte "
                                     f"tokens (e.g. byte {missing[0]}): not a byte-level BPE")
        if len(known) != len(self._tokens):
            raise TokenizerFileError("vocabulary has the same byte string under two ids")
        clash = set(self.special_tokens.values()) & set(self._tokens)
        if clash:
            raise TokenizerFileError(f"special token ids {sorted(clash)} are also regular ids")
        for i, (a, b) in enumerate(self.merges):
            if a not in known or b not in known or a + b not in known:
                raise TokenizerFileError(f"merge #{i} ({a!r}, {b!r}) uses or makes a token that is "
                                         "not in the vocabulary")
        try:
            regex.compile(self.pattern)
        except regex.error as e:
            raise TokenizerFileError(f"pre-tokenization pattern does not compile: {e}") from None

    # --- training -------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        pattern: str = GPT4_PATTERN,
        workers: int | None = None,
        show_progress: bool = True,
    ) -> Tokenizer:
        """Train on whole documents. ``vocab_size`` counts the 256 bytes, merges and specials.

        Text is split at the special-token strings before counting, so they are never learned.
        The vocabulary can come out smaller when the corpus runs out of pairs to merge.
        """
        special_tokens = list(dict.fromkeys(special_tokens))
        if vocab_size < 256 + len(special_tokens):
            raise ConfigError(f"vocab_size {vocab_size} is too small: it must be at least 256 "
                             f"bytes + {len(special_tokens)} special tokens = "
                             f"{256 + len(special_tokens)}")
        with progress_bar(show_progress, desc="pre-tokenize", unit="char", unit_scale=True) as bar:
            counts = count_words(texts, pattern, special_tokens, workers, progress=bar.update)
        num_new = vocab_size - 256 - len(special_tokens)
        with progress_bar(show_progress, desc="merge", total=num_new, unit="tok") as bar:
            vocab, merges = train_bpe(counts, num_new, progress=lambda n: bar.update(n - bar.n))
        tokens = dict(enumerate(vocab))
        specials = {s: len(vocab) + k for k, s in enumerate(special_tokens)}
        return cls(tokens, [(vocab[a], vocab[b]) for a, b in merges], specials, pattern)

    # --- vocabulary -----------------------------------------------------------------------------

    @property
    def vocab(self) -> dict[int, bytes]:
        """id → bytes, special tokens included (as their UTF-8 text)."""
        out = dict(self._tokens)
        out.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        return out

    @property
    def vocab_size(self) -> int:
        return max(*self._tokens, *self.special_tokens.values()) + 1

    def token_id(self, special: str) -> int:
        try:
            return self.special_tokens[special]
        except KeyError:
            raise KeyError(f"{special!r} is not a special token of this tokenizer; it has "
                           f"{sorted(self.special_tokens)}") from None

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the canonical file content: equal fingerprints, equal tokenizers."""
        body = json.dumps(self._body(), ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(body.encode("utf-8")).hexdigest()

    # --- encoding -------------------------------------------------------------------------------

    def _allowed(self, allowed_special: AllowedSpecial) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ConfigError(f"allowed_special names tokens this tokenizer does not have: "
                             f"{sorted(unknown)}")
        return allowed

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Token ids of ``text``. Special-token strings are plain text unless allowed."""
        if allowed_special:
            ids = self._tiktoken.encode(text, allowed_special=self._allowed(allowed_special),
                                        disallowed_special=())
        else:  # tiktoken's special-token scan costs as much as the BPE itself: skip it
            ids = self._tiktoken.encode_ordinary(text)
        return self._from_ranks(ids)

    def encode_batch(self, texts: Sequence[str], allowed_special: AllowedSpecial = (),
                     workers: int | None = None) -> list[list[int]]:
        """Encode many documents in ``workers`` processes (default: all cores)."""
        workers = workers or mp.cpu_count()
        if workers == 1 or len(texts) < 2:
            return [self.encode(t, allowed_special) for t in texts]
        allowed = self._allowed(allowed_special)
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        # Few, large tasks: each costs a round trip.
        step = -(-len(texts) // (workers * 4))
        chunks = [(texts[i : i + step], allowed) for i in range(0, len(texts), step)]
        with mp.get_context(method).Pool(workers, _init_worker, (self,)) as pool:
            return [ids for chunk in pool.imap(_encode_in_worker, chunks) for ids in chunk]

    def encode_reference(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """The same ids as :meth:`encode`, computed step by step in Python (slow, readable)."""
        special_re = special_pattern(self._allowed(allowed_special))
        ids: list[int] = []
        pos = 0
        # Alternate ordinary text and allowed special tokens.
        for match in (special_re.finditer(text) if special_re else ()):
            ids += self._encode_ordinary(text[pos : match.start()])
            ids.append(self.special_tokens[match.group()])
            pos = match.end()
        ids += self._encode_ordinary(text[pos:])
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._pieces.findall(text):
            ids += [self._id_of[t] for t in self._bpe(piece.encode("utf-8"))]
        return ids

    def _bpe(self, piece: bytes) -> list[bytes]:
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:
            # The adjacent pair merged earliest in training goes first, everywhere in the piece.
            ranks = [self._merge_rank.get(pair, len(self.merges)) for pair in pairwise(parts)]
            best = min(ranks)
            if best == len(self.merges):
                break
            a, b = self.merges[best]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    # --- the tiktoken fast path -----------------------------------------------------------------

    @cached_property
    def _rank_to_id(self) -> np.ndarray | None:
        """tiktoken merges by rank = id. Where ids do not grow with merge order (some imported
        vocabularies), ranks are assigned in merge order and mapped back to ids with this table."""
        # Only merged tokens are ever compared by rank (a single byte is never a merge result).
        first = list(dict.fromkeys(self._id_of[a + b] for a, b in self.merges))
        if all(x < y for x, y in pairwise(first)):
            return None
        order = [self._id_of[bytes([b])] for b in range(256)] + first
        order += sorted(set(self._tokens) - set(order))
        order += sorted(self.special_tokens.values())
        return np.asarray(order, dtype=np.int64)

    @cached_property
    def _tiktoken(self) -> tiktoken.Encoding:
        if self._rank_to_id is None:
            ranks = {t: i for i, t in self._tokens.items()}
            specials = self.special_tokens
        else:
            rank_of = {int(i): r for r, i in enumerate(self._rank_to_id)}
            ranks = {t: rank_of[i] for i, t in self._tokens.items()}
            specials = {s: rank_of[i] for s, i in self.special_tokens.items()}
        return tiktoken.Encoding(name=f"lmforge-{self.fingerprint[:12]}", pat_str=self.pattern,
                                 mergeable_ranks=ranks, special_tokens=specials)

    def _from_ranks(self, ranks: list[int]) -> list[int]:
        if self._rank_to_id is None:
            return ranks
        return self._rank_to_id[np.asarray(ranks, dtype=np.int64)].tolist()

    # --- decoding -------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        vocab = self._tokens
        try:
            return b"".join(vocab[i] if i in vocab else self._special_of_id[i].encode()
                            for i in ids)
        except KeyError as e:
            raise InputError(f"token id {e.args[0]} is not in this tokenizer's vocabulary "
                             f"(size {self.vocab_size})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; byte sequences that are not UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    # --- files ----------------------------------------------------------------------------------

    def _body(self) -> dict:
        tokens: list[str | None] = [None] * self.vocab_size
        for i, t in self._tokens.items():
            tokens[i] = bytes_to_str(t)
        return {
            "pattern": self.pattern,
            "tokens": tokens,
            "merges": [f"{bytes_to_str(a)} {bytes_to_str(b)}" for a, b in self.merges],
            "special_tokens": self.special_tokens,
        }

    def to_json(self) -> str:
        """The tokenizer file's text (JSON, versioned, with a fingerprint); :meth:`from_json`
        reads it back. Lets other files (a quantized model) embed the tokenizer."""
        doc = {"format": FILE_FORMAT, "version": FILE_VERSION, "fingerprint": self.fingerprint,
               **self._body()}
        return json.dumps(doc, ensure_ascii=False, indent=0)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer file (:meth:`to_json`), atomically."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise TokenizerFileError(f"{path}: no such tokenizer file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerFileError(f"{path}: not a tokenizer file (not valid JSON: {e})"
                                     ) from None
        return cls.from_json(text, path)

    @classmethod
    def from_json(cls, text: str, source: str | Path = "<tokenizer JSON>") -> Tokenizer:
        """The tokenizer in ``text`` (a tokenizer file's content); errors name ``source``."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise TokenizerFileError(f"{source}: not a tokenizer file (not valid JSON: {e})"
                                     ) from None
        if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
            hint = (" It looks like a Hugging Face tokenizer.json: use `lmforge tokenizer import`."
                    if isinstance(doc, dict) and "model" in doc else "")
            raise TokenizerFileError(f"{source}: not an lmforge tokenizer file "
                                     f"(no \"format\": \"{FILE_FORMAT}\").{hint}")
        if doc.get("version") != FILE_VERSION:
            raise TokenizerFileError(f"{source}: tokenizer file version {doc.get('version')!r} is "
                                     f"not supported (this lmforge reads version {FILE_VERSION})")
        try:
            tokens = {i: str_to_bytes(t, f"{source}: tokens[{i}]")
                      for i, t in enumerate(doc["tokens"]) if t is not None}
            merges = []
            for k, m in enumerate(doc["merges"]):
                a, b = m.split(" ")
                merges.append((str_to_bytes(a, f"{source}: merges[{k}]"),
                               str_to_bytes(b, f"{source}: merges[{k}]")))
            tok = cls(tokens, merges, dict(doc["special_tokens"]), doc["pattern"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, TokenizerFileError):
                raise TokenizerFileError(f"{source}: {e}") from None
            raise TokenizerFileError(f"{source}: corrupt tokenizer file ({type(e).__name__}: {e})"
                                     ) from None
        if tok.fingerprint != doc.get("fingerprint"):
            raise TokenizerFileError(f"{source}: corrupt tokenizer file (content does not match "
                                     "its fingerprint; was it edited or truncated?)")
        return tok

    def __getstate__(self) -> dict:
        return {"tokens": self._tokens, "merges": self.merges,
                "special_tokens": self.special_tokens, "pattern": self.pattern}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tokens"], state["merges"], state["special_tokens"], state["pattern"])

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={len(self.special_tokens)})")


class StreamDecoder:
    """Turns ids into text as they arrive, never emitting half a UTF-8 character.

    ``push(id)`` returns the text completed so far (possibly ""), ``flush()`` what is left. The
    concatenation equals ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(job: tuple[Sequence[str], set[str]]) -> list[list[int]]:
    texts, allowed = job
    assert _WORKER_TOKENIZER is not None
    return [_WORKER_TOKENIZER.encode(t, allowed) for t in texts]
