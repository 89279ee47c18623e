"""Continuous batching: one thread owns the model and serves every request, token by token.

Each step the scheduler thread (1) runs queued scoring jobs, (2) frees the slots of cancelled
requests, (3) admits queued requests into free slots of one preallocated multi-slot KV cache —
each prompt prefilled into its own slot, those of one length together, unpadded
(:func:`lmforge.inference.engine.prefill_rows`, as generation does) — and (4) decodes one
token for every active slot in one batched forward, each row at its own position. A request
leaves at its own stop condition and frees its slot at once. Active requests always occupy slots
0..A-1 (a freed slot takes the last active row's cache), so a decode step reads a contiguous
prefix of the cache.

Every request samples with its own generator, seeded by its own seed, and a row's computation
never mixes with its neighbours' (attention is masked per row), so a request's tokens do not
depend on what else is in the batch. The scheduler works on token ids; text (stop strings,
detokenization) stays at the HTTP edge (:mod:`lmforge.serve.app`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import InputError, LmforgeError
from lmforge.inference import SamplingParams
from lmforge.inference.engine import KVCache, forward_slots, prefill_rows, sample
from lmforge.model import Transformer

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]


class QueueFull(LmforgeError):
    """The bounded queue of waiting requests is full (HTTP 429)."""


class Observer(Protocol):
    """What the scheduler reports after each step (the server's metrics)."""

    def step(self, queue_depth: int, active: int) -> None: ...


@dataclass
class Event:
    """A new token of a request, or its end (``token`` None, ``finish_reason`` set)."""

    token: int | None
    finish_reason: FinishReason | None = None
    time: float = field(default_factory=time.perf_counter)


class Stream:
    """One request's tokens as the scheduler produces them: iterate it (blocking) or
    ``async for`` it (from the event loop it was submitted with); ``cancel()`` ends it within
    one step and frees its slot."""

    def __init__(self, prompt: list[int], params: SamplingParams, stop_ids: Sequence[int],
                 loop: asyncio.AbstractEventLoop | None) -> None:
        self.prompt, self.params, self.stop_ids = prompt, params, frozenset(stop_ids)
        self.submitted = time.perf_counter()
        self.tokens: list[int] = []
        self.stop_token: int | None = None  # the stop id that ended it (not in ``tokens``)
        self.finish_reason: FinishReason | None = None
        self.cancelled = False
        self._events: collections.deque[Event] = collections.deque()
        self._ready = threading.Condition()
        self._loop = loop
        self._wake = asyncio.Event() if loop is not None else None

    def cancel(self) -> None:
        """Stop generating (a client left, or a stop string was found); idempotent."""
        self.cancelled = True

    # scheduler side
    def _push(self, event: Event) -> None:
        with self._ready:
            self._events.append(event)
            self._ready.notify_all()
        if self._loop is not None and self._wake is not None:
            # RuntimeError: the event loop has closed, so nobody is listening
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake.set)

    def _emit(self, token: int) -> None:
        self.tokens.append(token)
        self._push(Event(token))

    def _finish(self, reason: FinishReason) -> None:
        self.finish_reason = reason
        self._push(Event(None, reason))

    # consumer side
    def __iter__(self) -> Iterator[Event]:
        while True:
            with self._ready:
                while not self._events:
                    self._ready.wait()
                event = self._events.popleft()
            yield event
            if event.token is None:
                return

    async def __aiter__(self) -> Any:
        assert self._wake is not None, "submit with loop= to iterate asynchronously"
        while True:
            while True:
                with self._ready:
                    event = self._events.popleft() if self._events else None
                if event is None:
                    break
                yield event
                if event.token is None:
                    return
            self._wake.clear()
            with self._ready:
                empty = not self._events
            if empty:
                await self._wake.wait()


@dataclass
class _Row:
    """An active request in its slot."""

    stream: Stream
    generator: torch.Generator | None  # None: greedy
    length: int  # cache positions filled (prompt + tokens fed back)
    max_new: int  # tokens it may still generate in all


class Scheduler:
    """Serve ``model`` to many requests at once with continuous batching.

    ``max_batch``: slots in the KV cache (requests decoded together); ``max_queue``: requests
    waiting for a slot before :meth:`submit` refuses more (a bounded queue: a full one answers
    429, it never grows without end); ``vocab_size``: the tokenizer's (draws stay below it).
    """

    def __init__(self, model: Transformer, *, max_batch: int = 8, max_queue: int = 64,
                 vocab_size: int | None = None, observer: Observer | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise InputError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, "
                             f"{max_queue}")
        self.model = model.eval()
        self.device = model.embed_tokens.weight.device
        self.context = model.config.context
        self.max_batch, self.max_queue = max_batch, max_queue
        self.vocab_size = vocab_size
        self.observer = observer
        self.cache = KVCache.allocate(model, max_batch)
        self.rows: list[_Row] = []
        self.queue: collections.deque[Stream] = collections.deque()
        self.jobs: collections.deque[tuple[Future, list[int]]] = collections.deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------ public side

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._run, name="lmforge-scheduler", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Cancel everything and stop the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()

    def prompt_problem(self, prompt: Sequence[int]) -> tuple[str, str] | None:
        """Why the model cannot continue ``prompt`` — ``(code, message)`` with the code one of
        ``empty_prompt``, ``invalid_token_id``, ``context_length_exceeded`` — or None."""
        if not prompt:
            return "empty_prompt", "empty; give at least one token"
        vocab = self.vocab_size or self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            return "invalid_token_id", f"token ids must be in 0 .. {vocab - 1}, got {bad[:5]}"
        if len(prompt) >= self.context:
            return ("context_length_exceeded", f"{len(prompt)} tokens; the model's context is "
                    f"{self.context}, which must also hold at least one new token")
        return None

    def check_prompt(self, prompt: Sequence[int]) -> None:
        """Refuse a prompt the model cannot continue, with :meth:`prompt_problem`'s reason."""
        problem = self.prompt_problem(prompt)
        if problem:
            raise InputError(f"prompt: {problem[1]}")

    def submit(self, prompt: Sequence[int], params: SamplingParams,
               stop_ids: Sequence[int] = (),
               loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Queue a request; its tokens arrive on the returned stream. Raises
        :class:`QueueFull` when ``max_queue`` requests already wait."""
        self.check_prompt(prompt)
        stream = Stream(list(prompt), params, stop_ids, loop)
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            free = self.max_batch - len(self.rows)  # slots the next step fills at once
            if len(self.queue) >= self.max_queue + max(free, 0):
                raise QueueFull(f"{len(self.queue)} requests are already waiting "
                                f"(--max-queue {self.max_queue}); retry later")
            self.queue.append(stream)
            self._lock.notify_all()
        return stream

    def score(self, prompt: Sequence[int]) -> Future:
        """Log-softmax (len(prompt), vocab) of every position of ``prompt`` (float32, on the
        CPU), computed on the scheduler thread between steps; a future."""
        if not prompt or len(prompt) > self.context:
            raise InputError(f"the text to score has {len(prompt)} tokens; it must have 1 .. "
                             f"{self.context} (the model's context)")
        future: Future = Future()
        with self._lock:
            self.jobs.append((future, list(prompt)))
            self._lock.notify_all()
        return future

    # ---------------------------------------------------------------------- the thread

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self.queue or self.rows or self.jobs or self._stopping):
                    self._lock.wait()
                if self._stopping:
                    break
                jobs = list(self.jobs)
                self.jobs.clear()
            try:
                self._step(jobs)
            except Exception as e:  # a bug must not leave clients hanging: end their streams
                log.exception("scheduler step failed")
                for row in self.rows:
                    row.stream._finish("error")
                self.rows.clear()
                for future, _ in jobs:
                    if not future.done():
                        future.set_exception(e)
            if self.observer is not None:
                self.observer.step(len(self.queue), len(self.rows))
        for row in self.rows:
            row.stream._finish("cancelled")
        self.rows.clear()
        while self.queue:
            self.queue.popleft()._finish("cancelled")

    @torch.no_grad()
    def _step(self, jobs: list[tuple[Future, list[int]]]) -> None:
        for future, prompt in jobs:
            ids = torch.tensor([prompt], device=self.device)
            future.set_result(F.log_softmax(self.model(ids)[0].float(), dim=-1).cpu())
        for i in reversed(range(len(self.rows))):
            if self.rows[i].stream.cancelled:
                self._free(i, "cancelled")
        admitted: list[Stream] = []
        while len(self.rows) + len(admitted) < self.max_batch:
            with self._lock:
                if not self.queue:
                    break
                stream = self.queue.popleft()
            if stream.cancelled:
                stream._finish("cancelled")
            else:
                admitted.append(stream)
        if admitted:
            self._admit(admitted)
        if self.rows:
            self._decode()

    def _admit(self, streams: list[Stream]) -> None:
        """Prefill the prompts of ``streams``, each into the next free slot (prompts of one
        length together, :func:`prefill_rows`), and draw their first tokens."""
        rows = []
        for stream in streams:
            params = stream.params
            try:  # a seed torch refuses ends its own request only
                generator = (torch.Generator(self.device).manual_seed(params.seed)
                             if params.temperature > 0 else None)
            except (RuntimeError, ValueError, OverflowError):
                log.exception("a request's sampling generator could not be seeded")
                stream._finish("error")
                continue
            T = len(stream.prompt)
            rows.append(_Row(stream, generator, T, min(params.max_new_tokens, self.context - T)))
        if not rows:
            return
        first, k = len(self.rows), len(rows)
        try:
            logits = prefill_rows(self.model, self.cache, [r.stream.prompt for r in rows],
                                  rows=range(first, first + k))
        except Exception:
            log.exception("a prefill failed")
            for r in rows:
                r.stream._finish("error")
            return
        self.rows.extend(rows)
        for i in reversed(range(k)):  # back to front: freeing moves the last row into slot i
            if rows[i].max_new <= 0:
                self._free(first + i, "length")
            else:
                self._take(first + i, logits[i])

    def _decode(self) -> None:
        """One token for every active row, in one forward over slots 0..A-1."""
        A = len(self.rows)
        end = max(r.length for r in self.rows) + 1
        tokens = torch.tensor([[r.stream.tokens[-1]] for r in self.rows], device=self.device)
        positions = torch.tensor([[r.length] for r in self.rows], device=self.device)
        logits = forward_slots(self.model, [k[:A, :, :end] for k in self.cache.k],
                               [v[:A, :, :end] for v in self.cache.v], self.cache.valid[:A, :end],
                               tokens, positions, positions)[:, -1]
        for row in self.rows:
            row.length += 1
        for i in reversed(range(A)):  # back to front: freeing moves the last row into slot i
            self._take(i, logits[i])

    def _take(self, slot: int, logits: Tensor) -> None:
        """:meth:`_draw`, but a failure (a bug, or a request's settings that the sampler
        cannot handle) ends that request alone, with an error."""
        try:
            self._draw(slot, logits)
        except Exception:
            log.exception("sampling a request's next token failed")
            self._free(slot, "error")

    def _draw(self, slot: int, logits: Tensor) -> None:
        """Draw row ``slot``'s next token from its logits (vocab,), emit it, end the row on a
        stop id or its length limit."""
        row = self.rows[slot]
        params = row.stream.params
        previous = (torch.tensor([row.stream.tokens], device=self.device, dtype=torch.long)
                    if params.repetition_penalty != 1.0 and row.stream.tokens else None)
        token = int(sample(logits[None], params, row.generator, previous, self.vocab_size)[0])
        if token in row.stream.stop_ids:
            row.stream.stop_token = token
            self._free(slot, "stop")
            return
        row.stream._emit(token)
        if len(row.stream.tokens) >= row.max_new:
            self._free(slot, "length")

    def _free(self, slot: int, reason: FinishReason) -> None:
        """End row ``slot``; the last active row moves into its slot (cache rows copied)."""
        row = self.rows[slot]
        last = len(self.rows) - 1
        if slot != last:
            self.cache.move_row(last, slot, self.rows[last].length)
            self.rows[slot] = self.rows[last]
        self.rows.pop()
        row.stream._finish(reason)
