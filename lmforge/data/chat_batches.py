"""Chat fine-tuning batches: conversations as token ids with an assistant-only loss mask.

A conversation renders in the chat format (:mod:`lmforge.tokenizer.chat`) with a mask that is 1
on the assistant's replies and their ``<|end|>``. One longer than the model's context (+1 token,
for the last target) loses the start of its history, the system prompt included: the replies at
the end are what is learned. A batch is ``(ids, targets)``, int64 (B, T): ``targets[t]`` is
``ids[t + 1]`` where that token is learned and -100 (ignored by the loss) elsewhere, padding
included. Rows are padded to the longest in the batch, and each batch is drawn from examples of
similar length to waste little compute on padding; packing several conversations into one row
would need the model to mask attention between documents, which it does not do.

Batch k is a function of k alone (as in :class:`~lmforge.data.loader.TokenLoader`): each epoch
is a permutation seeded with (seed, epoch), so a resumed run, or a rollback that moves ``step``
past some data, sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from lmforge.data.conversations import PreferencePair
from lmforge.errors import ConfigError, InputError
from lmforge.tokenizer.chat import Message, render_chat, render_chat_masked
from lmforge.tokenizer.tokenizer import PAD, Tokenizer

IGNORE = -100  # the targets' "no loss here" value (the model's loss ignores it)
GROUP = 64  # length grouping: sort runs of GROUP·batch_size examples by length, then cut


@dataclass(frozen=True, eq=False)
class Example:
    """One rendered conversation, at most context + 1 tokens."""

    ids: np.ndarray  # (n,) int32 token ids (half the memory of int64; ids < 2³¹)
    mask: np.ndarray  # (n,) bool: True on the tokens the model learns to write
    truncated: bool  # the start of the history was cut to fit the context

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def learns(self) -> bool:
        """Whether any token is a target (the first token never is: nothing precedes it)."""
        return bool(self.mask[1:].any())


@dataclass
class RenderReport:
    """What rendering did to a data set, for the run's log."""

    kept: int = 0
    truncated: int = 0  # kept, but cut from the left to fit
    dropped: int = 0  # nothing (SFT) or not the whole reply (preferences) was left to learn

    def __str__(self) -> str:
        return f"{self.kept} kept, {self.truncated} truncated, {self.dropped} dropped"


class TokenCount(NamedTuple):
    real: int  # input tokens that are not padding
    targets: int  # positions with a loss


def render_example(tokenizer: Tokenizer, conversation: Sequence[Message], context: int
                   ) -> Example:
    """``conversation`` as ids and assistant-only mask, keeping its last ``context + 1`` tokens.
    The result may have nothing left to learn (see :attr:`Example.learns`)."""
    ids, mask = render_chat_masked(tokenizer, conversation)
    return _cut(ids, mask, context)


def render_examples(tokenizer: Tokenizer, conversations: Iterable[Sequence[Message]],
                    context: int) -> tuple[list[Example], RenderReport]:
    """The examples that still have something to learn after cutting, and what was done."""
    examples, report = [], RenderReport()
    for conversation in conversations:
        example = render_example(tokenizer, conversation, context)
        if not example.learns:
            report.dropped += 1
            continue
        examples.append(example)
        report.kept += 1
        report.truncated += example.truncated
    return examples, report


def render_pair(tokenizer: Tokenizer, pair: PreferencePair, context: int
                ) -> tuple[Example, Example]:
    """prompt + chosen and prompt + rejected, each masked on its final reply only (earlier
    assistant turns are prompt), each cut from the left to ``context + 1`` tokens."""
    prompt_len = len(render_chat(tokenizer, pair.prompt, add_generation_prompt=False))
    sides = []
    for reply in (pair.chosen, pair.rejected):
        ids, mask = render_chat_masked(tokenizer, [*pair.prompt, Message("assistant", reply)])
        mask[:prompt_len] = [0] * prompt_len
        sides.append(_cut(ids, mask, context))
    return sides[0], sides[1]


def render_pairs(tokenizer: Tokenizer, pairs: Iterable[PreferencePair], context: int
                 ) -> tuple[list[tuple[Example, Example]], RenderReport]:
    """The pairs whose two replies both survive the cut whole (a reply cut at its start would
    compare log-probabilities of different texts), and what was done."""
    kept, report = [], RenderReport()
    for pair in pairs:
        sides = render_pair(tokenizer, pair, context)
        # The reply is one masked run that ends the rows, and the cut keeps the end: it is whole
        # when the row starts before it.
        if not all(side.learns and not side.mask[0] for side in sides):
            report.dropped += 1
            continue
        kept.append(sides)
        report.kept += 1
        report.truncated += sides[0].truncated or sides[1].truncated
    return kept, report


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The id that fills padding: ``<|pad|>`` where the tokenizer has it, else 0."""
    return tokenizer.special_tokens.get(PAD, 0)


def count_tokens(batch: tuple[torch.Tensor, torch.Tensor], pad_id: int) -> TokenCount:
    """Real (non-pad) input tokens and loss positions of a batch; exact when ``pad_id`` is a
    token that text never encodes to, as ``<|pad|>``."""
    ids, targets = batch
    return TokenCount(int((ids != pad_id).sum()), int((targets != IGNORE).sum()))


class _Batches:
    """The order and the protocol, shared by :class:`SFTBatches` and :class:`PreferenceBatches`:
    items of ``lengths`` (for grouping), rendered as ``examples`` (checked, hashed)."""

    kind = ""

    def __init__(self, lengths: list[int], examples: list[Example], batch_size: int, seq_len: int,
                 seed: int, pad_id: int, rank: int, world_size: int,
                 device: str | torch.device) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ConfigError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        for k, e in enumerate(examples):
            if len(e) > seq_len + 1 or not e.learns:
                raise InputError(f"example {k}: {len(e)} tokens, {int(e.mask[1:].sum())} to "
                                 f"learn; expected at most seq_len + 1 = {seq_len + 1} tokens and "
                                 "some to learn (render with render_examples / render_pairs)")
        self.num_items = len(lengths)
        self.per_epoch = self.num_items // batch_size  # a partial last batch is left out
        if self.per_epoch < world_size:
            raise InputError(f"{self.num_items} items are too few for batches of {batch_size} "
                             f"on {world_size} rank(s)")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.pad_id, self.rank, self.world_size = pad_id, rank, world_size
        self.device = torch.device(device)
        digest = hashlib.sha256()
        for e in examples:
            digest.update(e.ids.tobytes() + e.mask.tobytes())
        self.data_hash = digest.hexdigest()[:16]  # a resume must see the same data
        self.step = 0
        self._plan: tuple[int, np.ndarray] | None = None  # (epoch, its batches) cache

    def _rows(self, items: np.ndarray) -> list[Example]:
        raise NotImplementedError

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """(batches per epoch, batch_size) item indices: a seeded permutation, sorted by length
        within runs of GROUP batches, cut into batches, the batches shuffled."""
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.num_items)[: self.per_epoch * self.batch_size]
            run = GROUP * self.batch_size
            for start in range(0, len(order), run):
                part = order[start : start + run]
                order[start : start + run] = part[np.argsort(self.lengths[part], kind="stable")]
            batches = order.reshape(self.per_epoch, self.batch_size)
            self._plan = (epoch, batches[rng.permutation(self.per_epoch)])
        return self._plan[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, j = divmod(self.step * self.world_size + self.rank, self.per_epoch)
        rows = self._rows(self.epoch_plan(epoch)[j])
        self.step += 1
        ids, targets = pad_rows(rows, self.pad_id)
        if self.device.type == "cuda":
            return (ids.pin_memory().to(self.device, non_blocking=True),
                    targets.pin_memory().to(self.device, non_blocking=True))
        return ids, targets

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "step": self.step, "seed": self.seed,
                "num_items": self.num_items, "data_hash": self.data_hash,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "rank": self.rank,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the data and the batch geometry must be the same."""
        for key in ("kind", "seed", "num_items", "data_hash", "batch_size", "seq_len", "rank",
                    "world_size"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(f"batch state does not match these batches: {key} was "
                                  f"{state.get(key)!r}, is {getattr(self, key)!r}")
        self.step = int(state["step"])


class SFTBatches(_Batches):
    """``next_batch()`` → ``(ids, targets)`` (B, T) from rendered conversations, T ≤ seq_len."""

    kind = "sft"

    def __init__(self, examples: Sequence[Example], batch_size: int, seq_len: int,
                 seed: int = 0, pad_id: int = 0, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu") -> None:
        self.examples = list(examples)
        super().__init__([len(e) for e in self.examples], self.examples, batch_size, seq_len,
                         seed, pad_id, rank, world_size, device)

    def _rows(self, items: np.ndarray) -> list[Example]:
        return [self.examples[i] for i in items]


class PreferenceBatches(_Batches):
    """``next_batch()`` → ``(ids, targets)`` (2B, T): the B chosen rows, then the B rejected
    rows of the same pairs in the same order, padded together (one forward pass for both)."""

    kind = "preference"

    def __init__(self, pairs: Sequence[tuple[Example, Example]], batch_size: int, seq_len: int,
                 seed: int = 0, pad_id: int = 0, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu") -> None:
        self.pairs = list(pairs)
        super().__init__([max(len(c), len(r)) for c, r in self.pairs],
                         [e for pair in self.pairs for e in pair], batch_size, seq_len, seed,
                         pad_id, rank, world_size, device)

    def _rows(self, items: np.ndarray) -> list[Example]:
        return pair_rows([self.pairs[i] for i in items])


def pair_rows(pairs: Sequence[tuple[Example, Example]]) -> list[Example]:
    """The rows of a preference batch: every chosen reply, then every rejected one, in order."""
    return [c for c, _ in pairs] + [r for _, r in pairs]


def _cut(ids: list[int], mask: list[int], context: int) -> Example:
    if context < 1:
        raise ConfigError(f"context must be >= 1, got {context}")
    keep = context + 1  # context inputs and, shifted by one, their targets
    return Example(np.asarray(ids[-keep:], dtype=np.int32),
                   np.asarray(mask[-keep:], dtype=bool), len(ids) > keep)


def pad_rows(rows: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of ``rows``, right-padded to the longest: (len(rows), T) int64."""
    width = max(len(r) for r in rows) - 1
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE, dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r) - 1
        ids[i, :n] = r.ids[:-1]
        targets[i, :n] = np.where(r.mask[1:], r.ids[1:], IGNORE)
    return torch.from_numpy(ids), torch.from_numpy(targets)
