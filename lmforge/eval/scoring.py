"""Log-likelihood scoring on the KV-cache engine: the one scorer every task shares.

A request is a (context, continuation) pair of token ids; its score is the summed log-probability
of the continuation given the context, and whether greedy decoding would have produced it —
lm-evaluation-harness's ``loglikelihood``. Requests whose contexts share a long prefix (few-shot
prompts: the same description and examples before every question) pay for that prefix once: its
keys and values are computed into a cache, copied to every row of a batch, and only each
request's own suffix runs through the model.

Rows longer than the model's context are cut from the left, as lm-eval does (the continuation is
always kept whole); they cannot share a prefix and are scored on their own windows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import InputError
from lmforge.inference.engine import KVCache, forward_cached
from lmforge.model import Transformer


@dataclass(frozen=True)
class Score:
    """The continuation's summed log-probability (nats), and whether it is the greedy one."""

    logprob: float
    greedy: bool


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all ``sequences``."""
    if not sequences:
        return 0
    first, n = sequences[0], min(len(s) for s in sequences)
    for seq in sequences[1:]:
        i = 0
        while i < n and seq[i] == first[i]:
            i += 1
        n = i
    return n


@torch.no_grad()
def score_requests(model: Transformer, requests: Sequence[tuple[list[int], list[int]]],
                   batch_size: int = 16, progress: Callable[[int], None] | None = None
                   ) -> list[Score]:
    """A :class:`Score` per (context, continuation) request, in order. Contexts are shared
    as far as their common token prefix goes; ``progress(n)`` is called as requests finish."""
    context = model.config.context
    scores: list[Score | None] = [None] * len(requests)
    fits = [i for i, (c, x) in enumerate(requests) if len(c) + len(x) <= context and c]
    fitting = set(fits)
    long = [i for i in range(len(requests)) if i not in fitting]
    if fits:
        # keep at least the last context token out of the prefix: its logits score the
        # continuation's first token
        shared = min(common_prefix([requests[i][0] for i in fits]),
                     min(len(requests[i][0]) for i in fits) - 1)
        prefix = requests[fits[0]][0][:shared]
        cache = _prefix_cache(model, prefix)
        for start in range(0, len(fits), batch_size):
            rows = fits[start:start + batch_size]
            batch = [(requests[i][0][shared:], requests[i][1]) for i in rows]
            for i, score in zip(rows, _score_rows(model, cache, shared, batch), strict=True):
                scores[i] = score
            if progress:
                progress(len(rows))
    empty = _prefix_cache(model, [])
    for start in range(0, len(long), batch_size):  # cut from the left to fit, no shared prefix
        rows = long[start:start + batch_size]
        batch = []
        for i in rows:
            ctx, cont = requests[i]
            whole = (ctx + cont)[-(context + 1):]
            keep = len(whole) - len(cont)
            if keep < 1:
                raise InputError(f"a continuation of {len(cont)} tokens does not fit the "
                                 f"model's context of {context}")
            batch.append((whole[:keep], cont))
        for i, score in zip(rows, _score_rows(model, empty, 0, batch), strict=True):
            scores[i] = score
        if progress:
            progress(len(rows))
    return [s for s in scores if s is not None]


def _prefix_cache(model: Transformer, prefix: list[int]) -> KVCache:
    """A batch-1 cache holding ``prefix``'s keys and values (length = len(prefix))."""
    cache = KVCache.allocate(model, 1, max(len(prefix), 1))
    if prefix:
        device = model.embed_tokens.weight.device
        ids = torch.tensor([prefix], device=device)
        forward_cached(model, cache, ids, torch.arange(len(prefix), device=device)[None])
    return cache


def _score_rows(model: Transformer, prefix: KVCache, shared: int,
                rows: list[tuple[list[int], list[int]]]) -> list[Score]:
    """Score rows of (context suffix, continuation) after the cached ``shared``-token prefix.

    Rows are right-padded: a padding slot is marked invalid (position -1), and since attention
    is causal over slots no real token attends to the padding after it."""
    device = model.embed_tokens.weight.device
    feeds = [ctx + cont[:-1] for ctx, cont in rows]  # the last token is only a target
    width = max(len(f) for f in feeds)
    B = len(rows)
    cache = KVCache.allocate(model, B, shared + width)
    for k, v, pk, pv in zip(cache.k, cache.v, prefix.k, prefix.v, strict=True):
        k[:, :, :shared] = pk[:, :, :shared]
        v[:, :, :shared] = pv[:, :, :shared]
    cache.valid[:, :shared] = True
    cache.length = shared
    ids = torch.zeros(B, width, dtype=torch.long, device=device)
    positions = torch.full((B, width), -1, dtype=torch.long, device=device)
    for r, feed in enumerate(feeds):
        ids[r, :len(feed)] = torch.tensor(feed, device=device)
        positions[r, :len(feed)] = torch.arange(shared, shared + len(feed), device=device)
    logprobs = F.log_softmax(forward_cached(model, cache, ids, positions).float(), dim=-1)
    out = []
    for r, (ctx, cont) in enumerate(rows):
        at = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont), device=device)
        target = torch.tensor(cont, device=device)
        row: Tensor = logprobs[r, at]  # (len(cont), vocab)
        out.append(Score(float(row.gather(1, target[:, None]).sum()),
                         bool((row.argmax(-1) == target).all())))
    return out


@torch.no_grad()
def rolling_logprobs(model: Transformer, ids: Sequence[int]) -> Tensor:
    """Log-probability (nats) of every token of ``ids`` after the first, each predicted exactly
    once: windows of the model's context whose predicted tokens do not overlap, each read with
    the full context before it (lm-eval's ``loglikelihood_rolling``; ``ids[0]`` is the prefix,
    e.g. ``<|endoftext|>``). Returns a (len(ids) - 1,) tensor."""
    context = model.config.context
    device = model.embed_tokens.weight.device
    ids_t = torch.as_tensor(list(ids), dtype=torch.long, device=device)
    out = torch.empty(len(ids) - 1, device=device)
    target_start = 1
    while target_start < len(ids):
        target_end = min(target_start + context, len(ids))
        window_start = max(0, target_end - context - 1)
        window = ids_t[window_start:target_end - 1][None]  # (1, T)
        logits = model(window).float()[0]  # (T, vocab)
        targets = ids_t[window_start + 1:target_end]
        logp = F.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
        # only the targets not predicted by an earlier window
        new = target_end - target_start
        out[target_start - 1:target_end - 1] = logp[-new:]
        target_start = target_end
    return out
