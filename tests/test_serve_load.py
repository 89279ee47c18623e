"""The server under load and faults, on loopback, against a tiny model (bounded: it stops by
itself). 200 concurrent streaming requests get exactly the greedy text the engine gives each
prompt alone, while 50 malformed requests get their 4xx with OpenAI's error body and 20 clients
drop their streams midway; afterwards no slot is held, nothing waits, memory is back near its
level before the load, and the server still answers. No 5xx anywhere.

More tests pin faults found here. One is fixed and stays as a regression test (a seed out of
torch's range broke the scheduler thread); three are expected failures until the server is
fixed: sampling values that pass validation but overflow at a decode step (the whole batch
fails), a client that leaves while its stream waits to be sent (decoding goes on for nobody),
and one that leaves while sending its body (an internal error). The last two drive the ASGI app
directly, as uvicorn does, to reach those states deterministically.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs fastapi and uvicorn")
pytest.importorskip("uvicorn", reason="the server needs fastapi and uvicorn")
httpx = pytest.importorskip("httpx", reason="the load test's client is httpx")

from lmforge.inference import SamplingParams, generate  # noqa: E402  (after the skips)
from lmforge.model import Transformer  # noqa: E402
from lmforge.serve.app import ServerSettings, create_app  # noqa: E402
from lmforge.serve.stage import BackgroundServer  # noqa: E402
from lmforge.tokenizer import ENDOFTEXT, Tokenizer  # noqa: E402
from lmforge.tokenizer.chat import END, Message, render_chat  # noqa: E402

from .conftest import synthetic_documents, tiny_model  # noqa: E402

CONTEXT = 256
MAX_BATCH = 8
LOAD_SECONDS = 120  # the whole load phase, every request included, must end within this
TIMEOUT = httpx.Timeout(60.0)  # any one connect, read or write

COMPLETION_PROMPTS = ["the model learns", "café 日本語 données", "    x_12 = f(", "тексты and code"]
CONVERSATIONS = [
    [("user", "hello")],
    [("system", "Be brief."), ("user", "count to three")],
    [("user", "🙂👍 naïves")],
    [("user", "tab\tend"), ("assistant", "ok"), ("user", "more, please")],
]
MAX_TOKENS = (8, 12, 16)
DROPPED_MAX_TOKENS = 192  # what the clients that leave midway ask for


@dataclass(frozen=True)
class Expected:
    text: str
    tokens: int
    finish_reason: str


@dataclass
class Served:
    model: Transformer
    tokenizer: Tokenizer
    # greedy answer of (endpoint, prompt index, max_tokens), computed by the engine alone
    expected: dict[tuple[str, int, int], Expected]

    def prompt(self, endpoint: str, index: int) -> tuple[list[int], tuple[int, ...]]:
        """Prompt ``index`` of ``endpoint`` as the server renders it, and its stop ids."""
        tok = self.tokenizer
        eot, end = tok.special_tokens[ENDOFTEXT], tok.special_tokens[END]
        if endpoint == "completions":
            return tok.encode(COMPLETION_PROMPTS[index]), (eot,)
        conversation = [Message(r, c) for r, c in CONVERSATIONS[index]]
        return render_chat(tok, conversation), (end, eot)

    def greedy(self, endpoint: str, index: int, max_tokens: int) -> list[int]:
        ids, stop_ids = self.prompt(endpoint, index)
        return list(generate(self.model, ids, SamplingParams.greedy(max_tokens),
                             stop_ids=stop_ids, vocab_size=self.tokenizer.vocab_size))

    def answer(self, tokens: list[int], max_tokens: int) -> Expected:
        """What the server sends for these generated tokens: their text, special tokens left
        out (they are control, not text), and why they ended."""
        specials = set(self.tokenizer.special_tokens.values())
        text = self.tokenizer.decode([t for t in tokens if t not in specials])
        return Expected(text, len(tokens), "length" if len(tokens) == max_tokens else "stop")


def _messages(conversation: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in conversation]


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core machine; the server runs in this process
    tok = Tokenizer.train(synthetic_documents(300), 320, workers=1, show_progress=False)
    served = Served(tiny_model(vocab_size=tok.vocab_size, context=CONTEXT), tok, {})
    for endpoint, n in (("completions", len(COMPLETION_PROMPTS)), ("chat", len(CONVERSATIONS))):
        for index in range(n):
            longest = served.greedy(endpoint, index, max(MAX_TOKENS))
            for m in MAX_TOKENS:  # greedy: a shorter answer is a prefix of the longer one
                served.expected[endpoint, index, m] = served.answer(longest[:m], m)
    try:
        yield served
    finally:
        torch.set_num_threads(threads)


def _server(served: Served) -> BackgroundServer:
    settings = ServerSettings(model_name="tiny", max_batch=MAX_BATCH, max_queue=256,
                              max_body_bytes=1 << 20)
    return BackgroundServer(settings, lambda: (served.model, served.tokenizer))


def _body(endpoint: str, index: int, max_tokens: int, **extra: Any) -> tuple[str, dict]:
    """(path, JSON body) of a greedy request for prompt ``index`` of ``endpoint``."""
    if endpoint == "completions":
        body = {"prompt": COMPLETION_PROMPTS[index]}
    else:
        body = {"messages": _messages(CONVERSATIONS[index])}
    return (f"/v1/{'completions' if endpoint == 'completions' else 'chat/completions'}",
            {"model": "tiny", **body, "max_tokens": max_tokens, "temperature": 0, **extra})


def _rss_kb() -> int | None:
    """This process's resident memory (the server runs in it), or None off Linux."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1])


async def _metrics(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    return {name: float(value) for name, _, value in
            (line.rpartition(" ") for line in text.splitlines() if line and line[0] != "#")}


async def _idle(client: httpx.AsyncClient, seconds: float = 20.0) -> dict[str, float]:
    """The metrics once nothing waits and no slot is held (bounded polling)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        metrics = await _metrics(client)
        if metrics["lmforge_queue_depth"] == 0 and metrics["lmforge_active_slots"] == 0:
            return metrics
        if loop.time() > deadline:
            raise AssertionError(f"not idle after {seconds:g} s: queue depth "
                                 f"{metrics['lmforge_queue_depth']:g}, active slots "
                                 f"{metrics['lmforge_active_slots']:g} (a leaked slot?)")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------- requests


@dataclass
class StreamResult:
    status: int
    text: str
    finish_reason: str | None
    usage: dict | None
    error: dict | None = None  # an error event in the stream (a failure after the 200)


async def _stream(client: httpx.AsyncClient, path: str, body: dict) -> StreamResult:
    """Send a streaming request; check that the stream is well-formed SSE ending in [DONE]."""
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        raw = "".join([chunk async for chunk in r.aiter_text()])
    if r.status_code != 200:
        return StreamResult(r.status_code, raw, None, None)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw[:500]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    errors = [c["error"] for c in chunks if "error" in c]
    if errors:
        return StreamResult(200, raw, None, None, errors[0])
    assert len({c["id"] for c in chunks}) == 1, "every chunk of one response has its id"
    text, finish, usage = "", None, None
    chat = path.endswith("/chat/completions")
    for c in chunks:
        assert c["object"] == ("chat.completion.chunk" if chat else "text_completion")
        assert c["model"] == "tiny"
        if not c["choices"]:
            usage = c["usage"]  # include_usage: a last chunk without choices
            continue
        (choice,) = c["choices"]
        assert choice["index"] == 0 and finish is None, "nothing after the finish chunk"
        text += choice["delta"].get("content", "") if chat else choice["text"]
        finish = choice["finish_reason"]
    return StreamResult(200, text, finish, usage)


async def _drop_midway(client: httpx.AsyncClient, path: str, body: dict) -> int:
    """Start a long stream, read its first two events, then close the connection."""
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        seen = 0
        async for line in r.aiter_lines():
            seen += line.startswith("data: ")
            if seen == 2:
                break
        return r.status_code  # leaving the block unread closes the connection


async def _ten_megabytes() -> AsyncIterator[bytes]:
    """A 10 MB body sent chunked (no Content-Length: the server must count as it reads)."""
    for _ in range(10):
        yield b"a" * (1 << 20)


_BIG = b'{"prompt": "' + b"a" * (10 << 20) + b'"}'  # declared Content-Length, 10 MB
_HELLO = [{"role": "user", "content": "hi"}]
C, CHAT = "/v1/completions", "/v1/chat/completions"

# (what is wrong, path, JSON value or raw bytes or a body factory, the status it must get)
MALFORMED: list[tuple[str, str, Any, int]] = [
    ("bad JSON", C, b'{"prompt": "x", "max_tokens": ', 400),
    ("empty body", CHAT, b"", 400),
    ("a JSON array, not an object", C, ["x"], 400),
    ("invalid UTF-8", C, b'{"prompt": "\xff\xfe x"}', 400),
    ("max_tokens as a string", C, {"prompt": "x", "max_tokens": "8"}, 400),
    ("prompt as a number", C, {"prompt": 5}, 400),
    ("temperature as a string", CHAT, {"messages": _HELLO, "temperature": "hot"}, 400),
    ("content as a list", CHAT, {"messages": [{"role": "user", "content": ["x"]}]}, 400),
    ("max_tokens far beyond the context", C, {"prompt": "x", "max_tokens": 100_000}, 400),
    ("max_tokens far beyond the context", CHAT, {"messages": _HELLO, "max_tokens": 10**9}, 400),
    ("negative temperature", C, {"prompt": "x", "temperature": -0.5}, 400),
    ("NaN temperature", CHAT, b'{"messages": [{"role": "user", "content": "x"}], '
                              b'"temperature": NaN}', 400),
    ("negative max_tokens", CHAT, {"messages": _HELLO, "max_tokens": -1}, 400),
    ("10 MB body", C, _BIG, 413),
    ("10 MB chunked body", CHAT, _ten_megabytes, 413),
    ("unknown field", C, {"prompt": "x", "frobnicate": True}, 400),
    ("unknown field in a message", CHAT,
     {"messages": [{"role": "user", "content": "x", "mood": "happy"}]}, 400),
    ("empty messages", CHAT, {"messages": []}, 400),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("empty prompt", C, {"prompt": ""}, 400),
    ("token id out of range", C, {"prompt": [10**6]}, 400),
    ("prompt longer than the context", C, {"prompt": [65] * (CONTEXT + 10)}, 400),
    ("logprobs with stream", C, {"prompt": "x", "stream": True, "logprobs": 2}, 400),
    ("a model not served here", C, {"prompt": "x", "model": "gpt-4"}, 400),
    ("too many stop strings", C, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400),
]


async def _malformed(client: httpx.AsyncClient, case: tuple[str, str, Any, int]) -> None:
    what, path, body, status = case
    if isinstance(body, bytes):
        r = await client.post(path, content=body, headers={"content-type": "application/json"})
    elif callable(body):
        r = await client.post(path, content=body())
    else:
        r = await client.post(path, json=body)
    assert r.status_code == status, f"{what}: {r.status_code} {r.text[:300]}"
    error = r.json()["error"]  # OpenAI's error object
    assert set(error) == {"message", "type", "param", "code"}, what
    assert isinstance(error["message"], str) and error["message"], what
    assert error["type"] == "invalid_request_error", what


# ----------------------------------------------------------------------------------- tests


def test_load_faults_and_disconnects(served):
    asyncio.run(_load(served))


async def _load(served: Served) -> None:
    keys = sorted(served.expected)
    # No keep-alive: a pooled connection reused just as the server's keep-alive timeout (5 s)
    # closes it fails on the client (HTTP/1.1's reuse race, not this server's fault).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    with _server(served) as url:
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
            # Each prompt alone, not streamed: the server agrees with the engine.
            for endpoint, index, m in keys:
                path, body = _body(endpoint, index, m)
                r = await client.post(path, json=body)
                assert r.status_code == 200, r.text
                (choice,) = r.json()["choices"]
                got = choice["text"] if endpoint == "completions" else \
                    choice["message"]["content"]
                assert got == served.expected[endpoint, index, m].text

            async def wave(streams: int, malformed: int, drops: int) -> list[Any]:
                """Streaming requests over every prompt, malformed requests and clients that
                leave midway, all at once; the streaming results, in ``keys`` order cycled."""
                wanted = list(itertools.islice(itertools.cycle(keys), streams))
                jobs = [_stream(client, *_body(e, i, m, **({"stream_options": {
                    "include_usage": True}} if n % 3 == 0 else {})))
                    for n, (e, i, m) in enumerate(wanted)]
                jobs += [_malformed(client, case) for case in
                         itertools.islice(itertools.cycle(MALFORMED), malformed)]
                # long generations, so that they are still running when dropped
                jobs += [_drop_midway(client, *_body(e, i, DROPPED_MAX_TOKENS))
                         for e, i, _ in itertools.islice(itertools.cycle(keys), drops)]
                results = await asyncio.wait_for(asyncio.gather(*jobs), LOAD_SECONDS)
                assert results[streams + malformed:] == [200] * drops
                return list(zip(wanted, results[:streams], strict=True))

            # Warm-up at a small scale of the same mix, so that the allocator's pools and the
            # 10 MB buffers exist before the baseline: RSS right after one request is noisy
            # (it grows by tens of MB on the first concurrent load, then stays).
            await wave(24, len(MALFORMED), 4)
            await _idle(client)
            gc.collect()
            baseline = _rss_kb()
            before = await _metrics(client)

            results = await wave(200, 50, 20)

            for (endpoint, index, m), result in results:
                want = served.expected[endpoint, index, m]
                assert result.status == 200 and result.error is None, result.text[:300]
                assert (result.text, result.finish_reason) == (want.text, want.finish_reason), \
                    f"{endpoint} prompt {index}, max_tokens {m}"
                if result.usage is not None:
                    assert result.usage["completion_tokens"] == want.tokens

            after = await _idle(client)  # no slot leaked by the dropped streams
            gc.collect()
            rss = _rss_kb()
            if baseline is not None and rss is not None:
                assert rss <= 1.10 * baseline, f"RSS grew from {baseline} kB to {rss} kB"

            def count(metrics: dict[str, float], status: str) -> float:
                return sum(v for k, v in metrics.items() if k.startswith(
                    "lmforge_requests_total{") and f'status="{status}' in k)

            assert count(after, "5") == 0, "a 5xx answer"
            assert count(after, "200") - count(before, "200") == 220
            assert count(after, "4") - count(before, "4") == 50
            # The batch was full at times (continuous batching under load, not one by one).
            assert after["lmforge_batch_size_count"] > after['lmforge_batch_size_bucket{le="7.0"}']
            # A dropped stream stops generating: the 20 dropped requests made far fewer tokens
            # than in full (measured: 1 or 2 each, the ones their clients read).
            good = sum(served.expected[key].tokens for key, _ in results)
            dropped = after["lmforge_generated_tokens_total"] - \
                before["lmforge_generated_tokens_total"] - good
            assert 0 <= dropped < 20 * DROPPED_MAX_TOKENS / 4, dropped

            # and the server still answers, correctly
            endpoint, index, m = keys[0]
            result = await _stream(client, *_body(endpoint, index, m))
            assert result.error is None
            assert result.text == served.expected[endpoint, index, m].text


# ------------------------------------------------------- faults in the scheduler thread


class Gate:
    """A forward pre-hook that, while ``hold`` is set, stops the scheduler at its ``at``-th
    decode step (one token per row) until ``release``: the requests in the batch keep their
    slots for as long as the test needs, with no timing guesses."""

    def __init__(self, model: Transformer, at: int = 1) -> None:
        self.hold, self.entered, self.release = (threading.Event() for _ in range(3))
        self.at, self.steps = at, 0
        self.handle = model.embed_tokens.register_forward_pre_hook(self._before)

    def _before(self, _module: object, inputs: tuple) -> None:
        if self.hold.is_set() and inputs[0].shape[-1] == 1:  # ids (B, 1): a decode step
            self.steps += 1
            if self.steps >= self.at:
                self.entered.set()
                self.release.wait(LOAD_SECONDS)


async def _bad_neighbour(served: Served, bad_index: int, bad: dict[str, Any]) -> None:
    """Four greedy streams hold slots while a request for completion prompt ``bad_index`` with
    ``bad`` parameters joins them: it must get a 400, or a whole answer (no error); the four
    must be intact."""
    gate = Gate(served.model)
    try:
        with _server(served) as url:
            try:
                await _join_a_held_batch(served, url, gate, bad_index, bad)
            finally:
                gate.release.set()  # never leave the scheduler stopped at shutdown
    finally:
        gate.handle.remove()


async def _join_a_held_batch(served: Served, url: str, gate: Gate, bad_index: int,
                             bad: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(10.0)) as client:
        keys = [("completions", i, max(MAX_TOKENS)) for i in range(4)]
        gate.hold.set()
        good = [asyncio.create_task(_stream(client, *_body(*key))) for key in keys]
        try:
            assert await asyncio.to_thread(gate.entered.wait, LOAD_SECONDS), \
                "the batch never started decoding"
            path, body = _body("completions", bad_index, max(MAX_TOKENS), **bad)
            async with client.stream("POST", path, json={**body, "stream": True}) as r:
                gate.release.set()  # the answer's head comes once it is queued (or refused)
                for key, task in zip(keys, good, strict=True):
                    result = await task
                    assert result.error is None, (key, result.error)
                    assert (result.text, result.finish_reason) == (
                        served.expected[key].text, served.expected[key].finish_reason), key
                raw = "".join([chunk async for chunk in r.aiter_text()])
        finally:
            for task in good:
                task.cancel()
            await asyncio.gather(*good, return_exceptions=True)
        if r.status_code == 200:
            assert raw.endswith("data: [DONE]\n\n"), raw[-300:]
            events = [json.loads(e.removeprefix("data: ")) for e in raw.split("\n\n")[:-2]]
            assert not [e for e in events if "error" in e], raw[-300:]
            assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        else:
            assert r.status_code == 400 and json.loads(raw)["error"]["param"], raw
        await _idle(client)


def test_a_seed_out_of_range_is_refused_and_harms_nobody(served):
    # It once reached torch.Generator.manual_seed on the scheduler thread, which raised and
    # ended every request in the batch (and left this one's client hanging).
    asyncio.run(asyncio.wait_for(
        _bad_neighbour(served, 0, {"seed": 2**64, "temperature": 1.0}), LOAD_SECONDS))


# Completion prompt 1's first greedy token has a positive logit at the next step (2.9 with this
# model): divided by the penalty, then by the temperature, it overflows float32 at that step,
# though the first token (no penalty yet) is drawn fine. Both values are valid for the API.
TINY_PENALTY = {"repetition_penalty": 1e-20, "temperature": 1e-19, "seed": 0}


def test_a_tiny_penalty_and_temperature_are_served_and_harm_nobody(served):
    ids, _ = served.prompt("completions", 1)
    first = served.greedy("completions", 1, 1)
    with torch.no_grad():  # the precondition, checked outside the expected failure
        logit = served.model(torch.tensor([ids + first]))[0, -1, first[0]]
    if not logit / TINY_PENALTY["repetition_penalty"] / TINY_PENALTY["temperature"] > \
            torch.finfo(torch.float32).max:
        raise RuntimeError(f"the step-1 logit of the first token is {logit:.2f}: no overflow")
    asyncio.run(asyncio.wait_for(_bad_neighbour(served, 1, TINY_PENALTY), LOAD_SECONDS))


# ------------------------------------------------------- the ASGI app driven directly


def _scope(path: str, length: int | None) -> dict[str, Any]:
    """An HTTP request's ASGI scope, as uvicorn (ASGI spec 2.3) builds it."""
    headers = [(b"host", b"test"), (b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}


@asynccontextmanager
async def _app(served: Served) -> AsyncIterator[tuple[Any, Any]]:
    """The server app with its lifespan running, and its state, once the model is loaded."""
    app = create_app(ServerSettings(model_name="tiny", max_batch=MAX_BATCH),
                     lambda: (served.model, served.tokenizer))
    state = app.state.lmforge
    async with app.router.lifespan_context(app):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOAD_SECONDS
        while state.scheduler is None:  # the loader runs in a thread
            assert loop.time() < deadline and not state.error, state.error
            await asyncio.sleep(0.01)
        yield app, state


def test_a_client_that_leaves_while_its_socket_is_full_frees_its_slot(served):
    asyncio.run(asyncio.wait_for(_leave_while_blocked(served), LOAD_SECONDS))


async def _leave_while_blocked(served: Served) -> None:
    """Drive the app as uvicorn does, for a client that reads the first chunk of a stream, stops
    reading (``send`` blocks: the socket is full — on loopback the kernel takes megabytes, too
    many to fill from a test) and then leaves: its request must be cancelled at once. Here the
    blocked ``send`` returns only after the disconnect has been handled (uvicorn wakes both
    waiters on the same event, in no promised order)."""
    body = json.dumps({**_body("completions", 0, 200)[1], "stream": True}).encode()
    gone, blocked, unblocked = asyncio.Event(), asyncio.Event(), asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message["body"] and not gone.is_set():
            blocked.set()
            await unblocked.wait()  # uvicorn waits for the socket to drain

    # the scheduler stops at its third decode step: three tokens made, 197 to go
    gate = Gate(served.model, at=3)
    gc_was_enabled = gc.isenabled()
    try:
        async with _app(served) as (app, state):
            try:
                gate.hold.set()
                task = asyncio.create_task(app(_scope("/v1/completions", len(body)), receive,
                                               send))
                await blocked.wait()
                assert await asyncio.to_thread(gate.entered.wait, LOAD_SECONDS)
                (row,) = state.scheduler.rows
                gc.disable()  # what happens must not depend on when the collector runs
                gone.set()
                cancelled = await _until(lambda: row.stream.cancelled, 2.0)
                unblocked.set()
                await task
                assert cancelled, "the client left, its request was not cancelled"
            finally:
                gate.release.set()
                unblocked.set()
                if gc_was_enabled:
                    gc.enable()
            assert await _until(lambda: not state.scheduler.rows, LOAD_SECONDS)
            assert row.stream.finish_reason == "cancelled"
    finally:
        gate.handle.remove()


async def _until(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether ``condition()`` holds within ``seconds`` (bounded polling)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def test_a_client_that_leaves_while_sending_its_body_is_no_internal_error(served, caplog):
    asyncio.run(asyncio.wait_for(_leave_while_sending(served), LOAD_SECONDS))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def _leave_while_sending(served: Served) -> None:
    messages = [{"type": "http.disconnect"},
                {"type": "http.request", "body": b'{"prompt": "the mo', "more_body": True}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async with _app(served) as (app, _state):
        try:
            await app(_scope("/v1/completions", 100), receive, send)
        except Exception as e:  # what uvicorn would log as "Exception in ASGI application"
            raise AssertionError(f"the app raised {e!r}") from e
    statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert all(s < 500 for s in statuses), statuses
