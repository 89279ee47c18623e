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
from lmforge.inference.engine import KVCache, common_prefix, forward_cached, prefix_cache
from lmforge.model import Transformer


@dataclass(frozen=True)
class Score:
    """The continuation's summed log-probability (nats), and whether it is the greedy one."""

    logprob: float
    greedy: bool


@torch.no_grad()
def score_requests(model: Transformer, requests: Sequence[tuple[list[int], list[int]]],
                   batch_size: int = 16, progress: Callable[[int], None] | None = None
                   ) -> list[Score]:
    """A :class:`Score` per (context, continuation) request, in order. Contexts are shared
    as far as their common token prefix goes, and requests that feed the model the same tokens
    (multiple choice: one context, one-token answers) share one row of a batch;
    ``progress(n)`` is called as requests finish."""
    context = model.config.context
    rows: list[tuple[list[int], list[int]]] = []  # (context kept, continuation) per request
    for ctx, cont in requests:
        if len(ctx) + len(cont) <= context and ctx:
            rows.append((ctx, cont))
            continue
        whole = (ctx + cont)[-(context + 1):]  # cut from the left to fit, as lm-eval does
        keep = len(whole) - len(cont)
        if keep < 1:
            raise InputError(f"a continuation of {len(cont)} tokens does not fit the model's "
                             f"context of {context}")
        rows.append((whole[:keep], cont))
    scores: list[Score | None] = [None] * len(requests)
    fits = [i for i, (c, x) in enumerate(requests) if len(c) + len(x) <= context and c]
    fitting = set(fits)
    cut = [i for i in range(len(requests)) if i not in fitting]
    for group in (fits, cut):  # a cut context shares no prefix with the others
        if not group:
            continue
        # keep at least the last context token out of the prefix: its logits score the
        # continuation's first token
        shared = min(common_prefix([rows[i][0] for i in group]),
                     min(len(rows[i][0]) for i in group) - 1) if group is fits else 0
        cache = prefix_cache(model, rows[group[0]][0][:shared])
        feeds: dict[tuple[int, ...], list[int]] = {}  # the tokens fed → the requests they serve
        for i in group:
            ctx, cont = rows[i]
            feeds.setdefault(tuple(ctx[shared:] + cont[:-1]), []).append(i)
        unique = list(feeds.items())
        for start in range(0, len(unique), batch_size):
            batch = unique[start:start + batch_size]
            logprobs = _row_logprobs(model, cache, shared, [list(f) for f, _ in batch])
            for (_, served), row in zip(batch, logprobs, strict=True):
                for i in served:
                    ctx, cont = rows[i]
                    at = torch.arange(len(ctx) - shared - 1, len(ctx) - shared - 1 + len(cont),
                                      device=row.device)
                    target = torch.tensor(cont, device=row.device)
                    picked = row[at]  # (len(cont), vocab)
                    scores[i] = Score(float(picked.gather(1, target[:, None]).sum()),
                                      bool((picked.argmax(-1) == target).all()))
            if progress:
                progress(sum(len(served) for _, served in batch))
    return [s for s in scores if s is not None]


def _row_logprobs(model: Transformer, prefix: KVCache, shared: int,
                  feeds: list[list[int]]) -> Tensor:
    """Log-probabilities (B, T, vocab) of the next token after each position of ``feeds``
    (token rows fed after the cached ``shared``-token prefix).

    Rows are right-padded: a padding slot is marked invalid (position -1), and since attention
    is causal over slots no real token attends to the padding after it."""
    device = model.embed_tokens.weight.device
    width = max(len(f) for f in feeds)
    B = len(feeds)
    # The prefix is copied into every row: here the queries are whole suffixes, and the fused
    # attention over copies measured twice as fast as the engine's shared-prefix attention
    # (which pays off when decoding, one query per row).
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
    return F.log_softmax(forward_cached(model, cache, ids, positions).float(), dim=-1)


@torch.no_grad()
def rolling_logprobs(model: Transformer, ids: Sequence[int], batch_size: int = 8) -> Tensor:
    """Log-probability (nats) of every token of ``ids`` after the first, each predicted exactly
    once: windows of the model's context whose predicted tokens do not overlap, each read with
    the full context before it (lm-eval's ``loglikelihood_rolling``; ``ids[0]`` is the prefix,
    e.g. ``<|endoftext|>``), ``batch_size`` windows per forward pass. Returns a
    (len(ids) - 1,) tensor."""
    context = model.config.context
    device = model.embed_tokens.weight.device
    ids_t = torch.as_tensor(list(ids), dtype=torch.long, device=device)
    out = torch.empty(len(ids) - 1, device=device)
    # (first input index, one past the last target): windows of `context` inputs, the first
    # one shorter when the text is
    spans = []
    for target_start in range(1, len(ids), context):
        target_end = min(target_start + context, len(ids))
        spans.append((max(0, target_end - context - 1), target_end, target_end - target_start))
    for i in range(0, len(spans), batch_size):
        group = spans[i:i + batch_size]
        width = max(end - 1 - start for start, end, _ in group)
        x = torch.stack([F.pad(ids_t[start:end - 1], (0, width - (end - 1 - start)))
                         for start, end, _ in group])  # (B, T), right-padded
        logp = F.log_softmax(model(x).float(), dim=-1)  # (B, T, vocab)
        for row, (start, end, new) in enumerate(group):
            n = end - 1 - start
            targets = ids_t[start + 1:end]
            got = logp[row, :n].gather(1, targets[:, None])[:, 0]
            out[end - 1 - new:end - 1] = got[-new:]  # only the targets no window predicted yet
    return out
