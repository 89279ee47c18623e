"""``lmforge serve`` end to end: the real app under uvicorn on 127.0.0.1 with a tiny seeded model,
driven by the official ``openai`` client, raw HTTP (httpx, sockets) and lm-eval's
``local-completions`` backend.

What the server answers is checked against the model itself: greedy and seeded texts equal the
in-process engine's (:func:`lmforge.inference.generate`), log-probs equal a direct log-softmax, a
request's tokens are the same alone and in a batch of eight, and lm-eval scores MMLU through the
server as it does in process (:class:`~lmforge.eval.harness.LmforgeLM`). Cases that depend on
timing (a full queue, a client that leaves, requests decoded together) are made deterministic by a
gate on the model's decode steps (:class:`Hooks`), not by sleeps; waits are polls with a deadline.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi", reason="the server needs fastapi: pip install 'lmforge[serve]'")
pytest.importorskip("uvicorn", reason="the server needs uvicorn: pip install 'lmforge[serve]'")
openai = pytest.importorskip("openai", reason="needs the openai client: pip install "
                                              "'lmforge[serve]'")
httpx = pytest.importorskip("httpx", reason="needs httpx: pip install 'lmforge[serve]'")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from lmforge.errors import ConfigError, LmforgeError  # noqa: E402
from lmforge.inference import SamplingParams, generate  # noqa: E402
from lmforge.model import Transformer  # noqa: E402
from lmforge.serve.app import ServerSettings, create_app  # noqa: E402
from lmforge.serve.stage import BackgroundServer, ServeConfig  # noqa: E402
from lmforge.tokenizer import ENDOFTEXT, Tokenizer  # noqa: E402
from lmforge.tokenizer.chat import END, Message, render_chat  # noqa: E402

from .conftest import tiny_model  # noqa: E402

CONTEXT = 128  # the served model's context (tokens)
NAME = "tiny-serve"  # the model id the servers answer to
TIMEOUT = 30  # seconds any one wait may take: generous for a loaded machine
SUBJECT = "college_mathematics"
PROMPT = "the quick brown fox jumps over"
SENTENCE = ("the quick brown fox jumps over the lazy dog while a small cat sleeps in the warm "
            "sun and the birds sing")
WORDS = SENTENCE.split()
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 7 plus 26?"}]
ACTIVE, QUEUE = "lmforge_active_slots", "lmforge_queue_depth"
PROMPT_TOKENS = "lmforge_prompt_tokens_total"
COMPLETIONS_200 = 'lmforge_requests_total{endpoint="/v1/completions",status="200"}'


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the machine is shared, and the model is tiny."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def _close_http() -> Iterator[None]:
    yield
    http().close()
    http.cache_clear()


@functools.cache
def http() -> httpx.Client:
    """One client for the whole module (a new one per call costs an SSL context, ~0.1 s)."""
    return httpx.Client(timeout=TIMEOUT)


# ------------------------------------------------------------------------------------ helpers


class Hooks:
    """Forward hooks on a served model, inert until a test turns them on.

    A *decode step* is a forward over one new token per row (input ids (B, 1)). While the gate is
    closed each decode step waits until the test ``allow``s it or ``open``s the gate, so a request
    keeps its slot exactly as long as the test wants; ``steps`` counts decode steps begun.
    ``forcing(token, after)`` makes ``token`` the most likely next token everywhere once ``after``
    more decode steps have begun (0: from the prefill on)."""

    def __init__(self, model: Transformer) -> None:
        self._cond = threading.Condition()
        self.closed, self.allowed, self.steps = False, 0, 0
        self.force: int | None = None
        self.force_from = 0
        model.embed_tokens.register_forward_pre_hook(self._before)
        model.lm_head.register_forward_hook(self._after)

    def _before(self, _module: object, inputs: tuple) -> None:
        if inputs[0].shape[-1] != 1:  # a prefill or a scoring pass (a 1-token prompt's prefill
            return  # would count as a step: the gated tests' prompts are longer)
        with self._cond:
            self.steps += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self.closed or self.allowed > 0, TIMEOUT)
            if self.closed and self.allowed:
                self.allowed -= 1

    def _after(self, _module: object, _inputs: tuple, logits: torch.Tensor) -> torch.Tensor | None:
        if self.force is None or self.steps < self.force_from:
            return None
        logits = logits.clone()  # (B, T, vocab)
        logits[..., self.force] = logits.amax(dim=-1) + 1.0
        return logits

    def allow(self, n: int = 1) -> None:
        with self._cond:
            self.allowed += n
            self._cond.notify_all()

    def open(self) -> None:
        with self._cond:
            self.closed = False
            self._cond.notify_all()

    def wait_steps(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.steps >= n, TIMEOUT), (
                f"decode step {n} never began (at {self.steps})")

    @contextmanager
    def gated(self) -> Iterator[None]:
        with self._cond:
            self.closed, self.allowed = True, 0
        try:
            yield
        finally:
            self.open()

    @contextmanager
    def forcing(self, token: int, after: int = 0) -> Iterator[None]:
        self.force_from, self.force = self.steps + after, token
        try:
            yield
        finally:
            self.force = None


@dataclass
class Served:
    """A running server and what it serves."""

    url: str
    model: Transformer
    tok: Tokenizer
    hooks: Hooks

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=f"{self.url}/v1", max_retries=0, timeout=TIMEOUT,
                             **kwargs)

    def greedy(self, prompt: list[int], n: int, stop: tuple[str, ...] = (ENDOFTEXT,)
               ) -> list[int]:
        """The in-process engine's greedy tokens (stopping where the server's endpoint does)."""
        stop_ids = [self.tok.special_tokens[s] for s in stop]
        return list(generate(self.model, prompt, SamplingParams.greedy(n), stop_ids=stop_ids,
                             vocab_size=self.tok.vocab_size))

    def log_softmax(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), vocab): the model's next-token log-probs after every position."""
        with torch.no_grad():
            return F.log_softmax(self.model(torch.tensor([ids]))[0].float(), dim=-1)


def text_of(tok: Tokenizer, ids: list[int]) -> str:
    """What the server sends for generated ``ids``: their text, special tokens left out."""
    return tok.decode([t for t in ids if t not in tok.special_tokens.values()])


def read_metrics(url: str) -> dict[str, float]:
    return parse_metrics(http().get(f"{url}/metrics").text)


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text page, keyed ``name{label="value",...}`` (labels
    sorted)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.01)


def idle(url: str) -> bool:
    m = read_metrics(url)
    return m[ACTIVE] == 0 and m[QUEUE] == 0


ANY = object()  # a param not checked


def assert_error(response: httpx.Response, status: int, param: object = None,
                 code: str | None = None, type_: str = "invalid_request_error") -> dict:
    """``response`` is ``status`` with OpenAI's error body naming ``param`` (unless ``ANY``);
    returns the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == type_
    assert param is ANY or error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def sse_events(lines: Iterator[str]) -> list[str]:
    """The ``data:`` payloads of a server-sent event stream, in order."""
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


@contextmanager
def uvicorn_thread(app: Any) -> Iterator[str]:
    """``app`` under uvicorn in a thread at a free port, without waiting for ``/health`` (a
    loading server is tested), and shut down within seconds even with a request left hanging."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        assert server.started, "uvicorn did not start (see its log)"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


def raw_request(url: str, path: str, body: dict) -> socket.socket:
    """A POST sent on a socket of its own, so that a test can hang up at a moment it picks."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


# ----------------------------------------------------------------------------------- fixtures


def _mmlu_row(i: int) -> list[str]:
    a, b = 2 + i, 11 + 3 * i
    choices = [str(a + b), str(a * b), "None", f"{a - b}.50"]
    k = i % 4
    choices[0], choices[k] = choices[k], choices[0]
    return [f"What is {a} plus {b}?", *choices, "ABCD"[k]]


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> Path:
    """A tiny MMLU in the layout ``--task-data`` reads (one subject: 1 dev, 4 test questions)."""
    root = tmp_path_factory.mktemp("serve-tasks")
    for split, rows in (("dev", [_mmlu_row(0)]), ("test", [_mmlu_row(i) for i in range(5, 9)])):
        (root / "mmlu" / split).mkdir(parents=True)
        with open(root / "mmlu" / split / f"{SUBJECT}_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return root


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [" ".join(_mmlu_row(i)) for i in range(10)] + [
        " ".join(WORDS), "The following are multiple choice questions (with answers) about "
        "college mathematics.\nAnswer: A B C D", "Be brief. Hello, how are you today?"]
    return Tokenizer.train(texts * 3, 300, workers=1, show_progress=False)


@contextmanager
def tiny_server(tok: Tokenizer, **settings: Any) -> Iterator[Served]:
    model = tiny_model(context=CONTEXT, vocab_size=tok.vocab_size)
    hooks = Hooks(model)
    with BackgroundServer(ServerSettings(model_name=NAME, **settings),
                          lambda: (model, tok)) as url:
        yield Served(url, model, tok, hooks)


@pytest.fixture(scope="module")
def served(tok) -> Iterator[Served]:
    """The server most tests share: 8 slots, no key."""
    with tiny_server(tok, max_batch=8) as s:
        yield s


@pytest.fixture(scope="module")
def narrow(tok) -> Iterator[Served]:
    """One slot and a queue of one: the queue and cancellation tests."""
    with tiny_server(tok, max_batch=1, max_queue=1) as s:
        yield s


# ------------------------------------------------------------------- the openai client: basics


def test_models_list_names_the_served_model(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert models.data[0].owned_by == "lmforge"


def test_greedy_completion_equals_the_in_process_engine(served):
    client, ids = served.client(), served.tok.encode(PROMPT)
    want = served.greedy(ids, 20)
    for prompt in (PROMPT, ids):  # text, and the same prompt as token ids
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
        (choice,) = out.choices
        assert choice.text == text_of(served.tok, want)
        assert choice.index == 0
        assert choice.finish_reason == ("length" if len(want) == 20 else "stop")
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(want))
        assert out.usage.total_tokens == len(ids) + len(want)
        assert out.model == NAME and out.object == "text_completion"


def test_several_prompts_and_n_give_indexed_choices(served):
    prompts = [PROMPT, "the lazy dog while a small cat"]
    out = served.client().completions.create(model=NAME, prompt=prompts, max_tokens=6,
                                             temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]  # prompt i, choice j: index i·n + j
    for c in out.choices:
        assert c.text == text_of(served.tok, served.greedy(served.tok.encode(prompts[c.index // 2]),
                                                         6))
    assert out.usage.prompt_tokens == sum(len(served.tok.encode(p)) for p in prompts)
    ids_out = served.client().completions.create(
        model=NAME, prompt=[served.tok.encode(p) for p in prompts], max_tokens=6, temperature=0)
    assert [c.text for c in ids_out.choices] == [out.choices[0].text, out.choices[2].text]


def test_a_seed_reproduces_a_sample_and_the_engines_draws(served):
    client, tok, ids = served.client(), served.tok, served.tok.encode(PROMPT)
    kwargs = {"model": NAME, "prompt": PROMPT, "max_tokens": 16, "temperature": 1.5}
    first = client.completions.create(**kwargs, seed=7).choices[0].text
    assert client.completions.create(**kwargs, seed=7).choices[0].text == first

    def engine(seed: int, **params: Any) -> str:
        params = {"max_new_tokens": 16, "temperature": 1.5, "top_k": None, **params}
        return text_of(tok, list(generate(served.model, ids,
                                          SamplingParams(**params, seed=seed),
                                          stop_ids=[tok.special_tokens[ENDOFTEXT]],
                                          vocab_size=tok.vocab_size)))

    assert first == engine(7)
    two = client.completions.create(**kwargs, seed=7, n=2).choices  # choice j: seed + j
    assert [c.text for c in two] == [first, engine(8)]
    others = {client.completions.create(**kwargs, seed=s).choices[0].text for s in range(8, 12)}
    assert len(others | {first}) > 1  # the seed matters
    # the extra fields (vLLM's names) reach the sampler as the engine takes them
    extra = {"top_k": 5, "top_p": 0.9, "repetition_penalty": 1.3}
    out = client.completions.create(**kwargs, seed=3, extra_body=extra)
    assert out.choices[0].text == engine(3, **extra)
    greedy = client.completions.create(**{**kwargs, "temperature": 0}, extra_body={
        "repetition_penalty": 1.3})
    assert greedy.choices[0].text == engine(0, temperature=0.0, repetition_penalty=1.3)


def test_stop_strings_cut_the_text(served):
    client, ids = served.client(), served.tok.encode(PROMPT)
    full = text_of(served.tok, served.greedy(ids, 24))
    at = next(i for i in range(3, len(full) - 2) if full[i:i + 2].isascii()
              and full[i:i + 2].isprintable())
    stop = full[at:at + 2]
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0,
                                    stop=[stop, "never in this text \u2603"])
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[:full.index(stop)]


def test_echo_puts_the_prompt_first(served):
    client, ids = served.client(), served.tok.encode(PROMPT)
    want = PROMPT + text_of(served.tok, served.greedy(ids, 5))
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0,
                                    echo=True)
    assert out.choices[0].text == want
    streamed = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5,
                                         temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want
    nothing = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=0, echo=True)
    assert nothing.choices[0].text == PROMPT
    assert nothing.choices[0].finish_reason == "length"
    assert (nothing.usage.prompt_tokens, nothing.usage.completion_tokens) == (len(ids), 0)


@pytest.mark.parametrize(("echo", "max_tokens"), [(True, 0), (True, 1), (False, 3)])
def test_logprobs_equal_the_models_log_softmax(served, echo, max_tokens):
    tok, ids = served.tok, served.tok.encode(PROMPT)
    out = served.client().completions.create(model=NAME, prompt=ids, max_tokens=max_tokens,
                                             echo=echo, logprobs=1, temperature=0)
    generated = served.greedy(ids, max_tokens)
    everything = ids + generated
    logp = served.log_softmax(everything)
    first = 0 if echo else len(ids)
    lp = out.choices[0].logprobs
    assert lp.tokens == [tok.decode([t]) for t in everything[first:]]
    want = [float(logp[p - 1, everything[p]]) for p in range(max(first, 1), len(everything))]
    if echo:
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before it
    assert lp.token_logprobs[int(echo):] == pytest.approx(want, abs=1e-5)
    for p, top in zip(range(max(first, 1), len(everything)), lp.top_logprobs[int(echo):],
                      strict=True):
        best = int(logp[p - 1].argmax())
        assert top == pytest.approx({tok.decode([best]): float(logp[p - 1, best])}, abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


# ----------------------------------------------------------------------------------------- chat


def chat_prompt(tok: Tokenizer) -> list[int]:
    return render_chat(tok, [Message(m["role"], m["content"]) for m in CHAT])


def test_chat_completion_reply_usage_and_finish_reason(served):
    prompt = chat_prompt(served.tok)
    want = served.greedy(prompt, 12, stop=(END, ENDOFTEXT))
    out = served.client().chat.completions.create(model=NAME, messages=CHAT, max_tokens=12,
                                                  temperature=0)
    same = served.client().chat.completions.create(model=NAME, messages=CHAT, temperature=0,
                                                   max_completion_tokens=12)
    assert same.choices[0].message.content == out.choices[0].message.content
    (choice,) = out.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == text_of(served.tok, want)
    assert choice.finish_reason == ("length" if len(want) == 12 else "stop")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), len(want))
    assert out.object == "chat.completion"


def test_chat_finishes_with_stop_when_the_model_ends_its_turn(served):
    prompt, end = chat_prompt(served.tok), served.tok.special_tokens[END]
    want = served.greedy(prompt, 3, stop=(END, ENDOFTEXT))  # its first three tokens, then <|end|>
    with served.hooks.forcing(end, after=3):
        out = served.client().chat.completions.create(model=NAME, messages=CHAT, max_tokens=12,
                                                      temperature=0)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == text_of(served.tok, want)
    assert out.usage.completion_tokens == len(want)  # <|end|> itself is not returned


# ------------------------------------------------------------------------------------ streaming


def test_streamed_completion_concatenates_to_the_greedy_text(served):
    client = served.client()
    whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    *with_text, last = chunks
    assert len(with_text) > 2  # it streamed, not in one piece
    assert "".join(c.choices[0].text for c in with_text) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in with_text][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_text[:-1])
    assert last.choices == [] and last.usage == whole.usage


def test_streamed_chat_concatenates_to_the_greedy_reply(served):
    client = served.client()
    whole = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12,
                                           temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    *deltas, last = chunks
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == (
        whole.choices[0].message.content)
    assert deltas[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in deltas[:-1])
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert last.choices == [] and last.usage == whole.usage


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_raw_event_stream_ends_with_done(served, path):
    body = {"model": NAME, "max_tokens": 4, "temperature": 0, "stream": True,
            **({"prompt": PROMPT} if path == "/v1/completions" else {"messages": CHAT})}
    with http().stream("POST", served.url + path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = sse_events(iter(raw.split("\n")))
    assert raw.endswith("data: [DONE]\n\n") and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[-1]["choices"][0]["finish_reason"]


# ------------------------------------------------------------------------------------- batching


def test_a_request_decodes_the_same_alone_and_in_a_batch_of_eight(served):
    """Eight greedy requests of different prompt lengths and token budgets, decoded together
    (rows join and leave the batch at different steps), equal each request sent alone and the
    in-process engine."""
    tok, url = served.tok, served.url
    prompts = [" ".join(WORDS[:2 + 3 * i]) for i in range(8)]
    budgets = [30 - 3 * i for i in range(8)]
    client = served.client()
    alone = [client.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0)
             .choices[0].text for p, n in zip(prompts, budgets, strict=True)]
    assert alone == [text_of(tok, served.greedy(tok.encode(p), n))
                     for p, n in zip(prompts, budgets, strict=True)]
    before = read_metrics(url)
    submitted = before[PROMPT_TOKENS] + sum(len(tok.encode(p)) for p in prompts)

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                      timeout=TIMEOUT) as aclient:
            tasks = [asyncio.create_task(aclient.completions.create(
                model=NAME, prompt=p, max_tokens=n, temperature=0))
                for p, n in zip(prompts, budgets, strict=True)]
            async with httpx.AsyncClient(timeout=TIMEOUT) as ahttp:
                deadline = time.monotonic() + TIMEOUT
                while True:  # until the server has taken all eight (decoding is held)
                    text = (await ahttp.get(f"{url}/metrics")).text
                    if parse_metrics(text)[PROMPT_TOKENS] >= submitted:
                        break
                    assert time.monotonic() < deadline, "the eight requests never all arrived"
                    await asyncio.sleep(0.01)
            served.hooks.open()
            return [r.choices[0].text for r in await asyncio.gather(*tasks)]

    with served.hooks.gated():
        batched = asyncio.run(together())
    assert batched == alone

    def steps_of_8(m: dict[str, float]) -> float:
        return m['lmforge_batch_size_bucket{le="8.0"}'] - m['lmforge_batch_size_bucket{le="7.0"}']

    assert steps_of_8(read_metrics(url)) > steps_of_8(before)  # they were decoded together


# --------------------------------------------------------------------------------------- errors


def _chat(**extra: Any) -> dict:
    return {"model": NAME, "messages": CHAT, **extra}


def _completion(**extra: Any) -> dict:
    return {"model": NAME, "prompt": PROMPT, "max_tokens": 2, **extra}


BAD_REQUESTS = [  # (name, path, body (bytes as they are, or JSON), the param named)
    ("malformed-json", "/v1/completions", b'{"prompt": ', None),
    ("invalid-utf8", "/v1/completions", b'{"prompt": "\xff\xfe"}', None),
    ("not-an-object", "/v1/completions", b"[1, 2]", None),
    ("max_tokens-string", "/v1/completions", _completion(max_tokens="5"), "max_tokens"),
    ("temperature-string", "/v1/completions", _completion(temperature="hot"), "temperature"),
    ("negative-temperature", "/v1/completions", _completion(temperature=-0.5), "temperature"),
    ("negative-max_tokens", "/v1/completions", _completion(max_tokens=-1), "max_tokens"),
    ("unknown-field", "/v1/completions", _completion(frobnicate=1), "frobnicate"),
    ("five-stops", "/v1/completions", _completion(stop=list("abcde")), "stop"),
    ("n-17", "/v1/completions", _completion(n=17), "n"),
    ("logprobs-6", "/v1/completions", _completion(logprobs=6), "logprobs"),
    ("stream-with-logprobs", "/v1/completions", _completion(stream=True, logprobs=1),
     "logprobs"),
    ("no-prompt", "/v1/completions", {"model": NAME}, "prompt"),
    ("empty-prompt-list", "/v1/completions", _completion(prompt=[]), "prompt"),
    ("chat-no-messages", "/v1/chat/completions", _chat(messages=[]), "messages"),
    ("chat-bad-role", "/v1/chat/completions",
     _chat(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role"),
    ("chat-unknown-field", "/v1/chat/completions", _chat(tools=[]), "tools"),
    ("chat-temperature-string", "/v1/chat/completions", _chat(temperature="hot"),
     "temperature"),
    ("chat-logprobs", "/v1/chat/completions", _chat(logprobs=True), None),
    # wrong types inside the prompt union: a 400 (its param: see the test below)
    ("prompt-number", "/v1/completions", _completion(prompt=5), ANY),
    ("prompt-mixed-list", "/v1/completions", _completion(prompt=["a", 1]), ANY),
    ("prompt-bad-ids", "/v1/completions", _completion(prompt=[[1, "a"]]), ANY),
    ("prompt-null", "/v1/completions", _completion(prompt=None), ANY),
    ("messages-not-a-list", "/v1/chat/completions", _chat(messages="hi"), "messages"),
    ("content-not-a-string", "/v1/chat/completions",
     _chat(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
    ("seed-float", "/v1/completions", _completion(seed=1.5), "seed"),
    ("infinite-top_p", "/v1/completions",
     b'{"prompt": "hi", "top_p": Infinity}', "top_p"),
]


@pytest.mark.parametrize(("path", "body", "param"), [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_400_with_openais_error_body(served, path, body, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http().post(served.url + path, content=content,
                           headers={"Content-Type": "application/json"})
    assert_error(response, 400, param)


def test_an_unknown_model_is_refused_by_name(served):
    with pytest.raises(openai.BadRequestError) as refused:
        served.client().completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert refused.value.status_code == 400
    assert (refused.value.code, refused.value.param) == ("model_not_found", "model")
    assert NAME in refused.value.message


def test_a_prompt_of_the_wrong_type_names_the_prompt_param(served):
    response = http().post(served.url + "/v1/completions", json=_completion(prompt=5))
    assert_error(response, 400, "prompt")


def test_the_context_limits_are_400_context_length_exceeded(served):
    url, tok = served.url, served.tok

    def post(path: str, body: dict) -> httpx.Response:
        return http().post(url + path, json=body)

    too_long = " ".join(WORDS * 20)
    assert len(tok.encode(too_long)) > CONTEXT
    for prompt in (too_long, [5] * CONTEXT):  # text, ids: no room left for one new token
        assert_error(post("/v1/completions", _completion(prompt=prompt, max_tokens=1)), 400,
                     "prompt", "context_length_exceeded")
    chat = _chat(messages=[{"role": "user", "content": too_long}])
    assert_error(post("/v1/chat/completions", chat), 400, "messages", "context_length_exceeded")
    # the edge: prompt + max_tokens may fill the context exactly, not one more
    ok = post("/v1/completions", _completion(prompt=[5] * (CONTEXT - 2), max_tokens=2,
                                             temperature=0))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
    assert_error(post("/v1/completions", _completion(prompt=[5] * (CONTEXT - 2), max_tokens=3)),
                 400, "max_tokens", "context_length_exceeded")
    assert_error(post("/v1/chat/completions", _chat(max_tokens=CONTEXT)), 400, "max_tokens",
                 "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as refused:
        served.client().completions.create(model=NAME, prompt=too_long)
    assert refused.value.code == "context_length_exceeded"


def test_bad_token_ids_are_not_called_context_length_exceeded(served):
    for prompt in ([served.tok.vocab_size + 5], ""):
        response = http().post(served.url + "/v1/completions", json=_completion(prompt=prompt))
        error = assert_error(response, 400, "prompt")
        assert error["code"] != "context_length_exceeded", error


def test_an_api_key_guards_v1_and_a_body_limit_gives_413(tok):
    with tiny_server(tok, api_key="sekrit", max_body_bytes=512) as strict:
        url = strict.url
        for path in ("/health", "/", "/metrics"):  # open to probes and browsers
            assert http().get(url + path).status_code == 200
        assert_error(http().get(url + "/v1/models"), 401, code="invalid_api_key")
        assert_error(http().post(url + "/v1/completions", json=_completion(),
                                 headers={"Authorization": "Bearer wrong"}), 401,
                     code="invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            strict.client(api_key="wrong").completions.create(model=NAME, prompt=PROMPT,
                                                               max_tokens=2)
        good = strict.client(api_key="sekrit")
        assert [m.id for m in good.models.list().data] == [NAME]
        assert good.completions.create(model=NAME, prompt=PROMPT, max_tokens=2).choices

        key = {"Authorization": "Bearer sekrit", "Content-Type": "application/json"}
        big = json.dumps(_completion(prompt="x" * 600)).encode()
        assert_error(http().post(url + "/v1/completions", content=big, headers=key), 413)
        # chunked, so no Content-Length to refuse it by: the limit holds while reading
        chunks = iter([big[:300], big[300:]])
        assert_error(http().post(url + "/v1/completions", content=chunks, headers=key), 413)
        small = iter([json.dumps(_completion()).encode()])
        assert http().post(url + "/v1/completions", content=small, headers=key).status_code == 200


# ------------------------------------------------------------------------ queue and cancellation


def _stream_body(max_tokens: int = 100) -> dict:
    return {"model": NAME, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}


def test_a_full_queue_answers_429_and_then_drains(narrow):
    url, hooks = narrow.url, narrow.hooks
    wait_until(lambda: idle(url), "an idle server")
    with httpx.Client(timeout=TIMEOUT) as client, hooks.gated():
        start = hooks.steps
        with client.stream("POST", url + "/v1/completions", json=_stream_body()) as first:
            assert first.status_code == 200
            hooks.wait_steps(start + 1)  # the first request holds the only slot
            with client.stream("POST", url + "/v1/completions", json=_stream_body()) as second:
                assert second.status_code == 200  # queued: its response has begun
                hooks.allow(1)  # one step ends, so the scheduler reports the queue and slot
                hooks.wait_steps(start + 2)
                m = read_metrics(url)
                assert (m[ACTIVE], m[QUEUE]) == (1, 1)

                with pytest.raises(openai.RateLimitError) as refused:
                    narrow.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=1)
                assert refused.value.status_code == 429
                assert (refused.value.code, refused.value.type) == ("queue_full",
                                                                   "rate_limit_error")
                raw = http().post(url + "/v1/chat/completions", json=_chat())
                assert_error(raw, 429, code="queue_full", type_="rate_limit_error")

                hooks.open()
                texts = [sse_events(r.iter_lines()) for r in (first, second)]
    want = narrow.tok.decode(narrow.greedy(narrow.tok.encode(PROMPT), 100))
    for events in texts:
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == want
    wait_until(lambda: idle(url), "queue depth 0 and no active slot after the requests ended")
    assert read_metrics(url)['lmforge_requests_total{endpoint="/v1/completions",status="429"}'] > 0


def _steps_until_free(served: Served, limit: int, pace: float) -> int:
    """Let decode steps run one at a time, at most one each ``pace`` seconds, until ``/metrics``
    shows no active slot; how many ran. The caller has made sure the slot was last reported
    active, so a 0 is news."""
    hooks = served.hooks
    for used in range(1, limit + 1):
        seen, began = hooks.steps, time.monotonic()
        hooks.allow(1)
        wait_until(lambda seen=seen: hooks.steps > seen or read_metrics(served.url)[ACTIVE] == 0,
                   "the next decode step or a free slot")
        if read_metrics(served.url)[ACTIVE] == 0:
            return used
        time.sleep(max(0.0, pace - (time.monotonic() - began)))
    pytest.fail(f"the slot was still held after {limit} decode steps")


@pytest.mark.parametrize("stream", [
    True,
    False],
    ids=["streaming", "non-streaming"])
def test_a_client_that_hangs_up_frees_its_slot(narrow, stream):
    url, hooks, max_tokens = narrow.url, narrow.hooks, 60
    wait_until(lambda: idle(url), "an idle server")
    with hooks.gated():
        start = hooks.steps
        sock = raw_request(url, "/v1/completions", {**_stream_body(max_tokens), "stream": stream})
        try:
            hooks.wait_steps(start + 1)
            hooks.allow(1)  # one step ends: the slot is reported active
            hooks.wait_steps(start + 2)
            assert read_metrics(url)[ACTIVE] == 1
            if stream:  # the first token's chunk arrived before the client left
                received = b""
                while b"data: " not in received:
                    received += sock.recv(4096)
                assert received.startswith(b"HTTP/1.1 200")
        finally:
            sock.close()
        # a step each 20 ms: a request that is not cancelled would hold its slot ~1.2 s
        used = _steps_until_free(narrow, max_tokens, pace=0.02)
    assert used < max_tokens - 2  # cancelled, not run to its end
    if stream:
        assert used <= 10  # the hang-up is seen at once, not when the next token is sent
    after = narrow.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=5,
                                               temperature=0)
    assert after.choices[0].finish_reason == "length"
    assert after.choices[0].text == narrow.tok.decode(narrow.greedy(narrow.tok.encode(PROMPT), 5))
    wait_until(lambda: idle(url), "an idle server at the end")


# ------------------------------------------------------------------------- loading and failure


def test_503_with_an_openai_body_until_the_model_is_loaded(tok):
    from starlette.testclient import TestClient

    release = threading.Event()
    model = tiny_model(context=CONTEXT, vocab_size=tok.vocab_size)

    def loader() -> tuple[Transformer, Tokenizer]:
        assert release.wait(TIMEOUT), "the test never released the loader"
        return model, tok

    app = create_app(ServerSettings(model_name=NAME), loader)
    with TestClient(app) as client:  # runs the lifespan: loading starts in a thread
        try:
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "loading"
            for path, body in (("/v1/completions", _completion()), ("/v1/chat/completions",
                                                                    _chat())):
                assert_error(client.post(path, json=body), 503, type_="service_unavailable")
            assert client.get("/").status_code == 200  # the page itself is there
        finally:
            release.set()
        wait_until(lambda: client.get("/health").status_code == 200, "the model to load")
        out = client.post("/v1/completions", json=_completion(temperature=0))
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 2


def _loaded() -> None:
    """Wait for the app's loading thread to end (it may have already)."""
    for thread in threading.enumerate():
        if thread.name == "lmforge-load":
            thread.join(TIMEOUT)


def test_a_model_that_cannot_be_loaded_is_a_503_naming_why():
    from starlette.testclient import TestClient

    def loader() -> tuple[Transformer, Tokenizer]:
        raise LmforgeError("no model at /nowhere")

    with TestClient(create_app(ServerSettings(model_name=NAME), loader)) as client:
        _loaded()
        health = client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "error",
                                                               "detail": "no model at /nowhere"}
        error = assert_error(client.post("/v1/completions", json=_completion()), 503,
                             type_="server_error")
        assert "no model at /nowhere" in error["message"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_loader_crash_of_any_kind_is_reported_not_loading_forever():
    from starlette.testclient import TestClient

    def loader() -> tuple[Transformer, Tokenizer]:
        raise RuntimeError("size mismatch for layers.0.mlp.up.weight")

    with TestClient(create_app(ServerSettings(model_name=NAME), loader)) as client:
        _loaded()
        assert client.get("/health").json()["status"] == "error"


def test_a_seed_torch_cannot_take_harms_no_request(tok):
    model = tiny_model(context=CONTEXT, vocab_size=tok.vocab_size)
    hooks = Hooks(model)
    app = create_app(ServerSettings(model_name=NAME, max_batch=2), lambda: (model, tok))
    ids = tok.encode(PROMPT)
    want = tok.decode(list(generate(model, ids, SamplingParams.greedy(40),
                                    stop_ids=[tok.special_tokens[ENDOFTEXT]],
                                    vocab_size=tok.vocab_size)))
    with uvicorn_thread(app) as url:
        wait_until(lambda: http().get(url + "/health").status_code == 200, "the model to load")
        pool = ThreadPoolExecutor(2)
        try:
            with hooks.gated():
                victim = pool.submit(httpx.post, url + "/v1/completions", timeout=TIMEOUT,
                                     json=_completion(max_tokens=40, temperature=0))
                hooks.wait_steps(1)  # the victim is decoding
                bad = pool.submit(httpx.post, url + "/v1/completions", timeout=5,
                                  json=_completion(temperature=1.0, seed=2**64))
                wait_until(lambda: bad.done() or read_metrics(url)[PROMPT_TOKENS] >= 2 * len(ids),
                           "the second request to be answered or queued")
            out = victim.result(TIMEOUT).json()
            assert out["choices"][0]["finish_reason"] == "length"
            assert out["choices"][0]["text"] == want
            answer = bad.result(TIMEOUT)  # refused (400 naming the seed) or served
            assert answer.status_code in (200, 400), answer.text
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------- lm-eval


@pytest.fixture(scope="module")
def lm_eval_env(tmp_path_factory) -> Iterator[Path]:
    """lm-eval with its API models importable, kept offline (everything it reads is local)."""
    pytest.importorskip("lm_eval", reason="needs lm-eval: pip install 'lmforge[eval]'")
    pytest.importorskip("tenacity", reason="lm-eval's local-completions backend needs "
                                           "tenacity (pip install 'lm-eval[api]')")
    pytest.importorskip("transformers", reason="lm-eval's huggingface tokenizer backend needs "
                                               "transformers")
    root = tmp_path_factory.mktemp("serve-lm-eval")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(name, "1")
        mp.setenv("HF_HOME", str(root / "hf-home"))
        yield root


def test_lm_evals_local_completions_scores_mmlu_as_the_in_process_adapter(served, task_data,
                                                                            lm_eval_env):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmforge.eval.harness import LmforgeLM, write_local_tasks
    from lmforge.export.hf import export_hf

    hf = lm_eval_env / "hf"
    export_hf(served.model, served.tok, hf)  # the served weights, and the tokenizer HF reads
    write_local_tasks(str(task_data), lm_eval_env / "tasks", ["mmlu"])
    manager = TaskManager(include_path=[str(lm_eval_env / "tasks")])
    common = {"tasks": ["mmlu_local"], "num_fewshot": 0, "task_manager": manager,
              "log_samples": True}
    via_server = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={NAME},base_url={served.url}/v1/completions,tokenizer={hf},"
                   f"tokenizer_backend=huggingface,max_length={CONTEXT},num_concurrent=1,"
                   "max_retries=1", **common)
    in_process = lm_eval.simple_evaluate(model=LmforgeLM(str(hf), batch_size=4, device="cpu"),
                                         **common)
    task = f"mmlu_local_{SUBJECT}"
    theirs = {s["doc_id"]: s for s in via_server["samples"][task]}
    ours = {s["doc_id"]: s for s in in_process["samples"][task]}
    assert theirs.keys() == ours.keys() and len(ours) == 4
    for doc_id, sample in ours.items():
        assert theirs[doc_id]["arguments"] == sample["arguments"]
        got = [resp[0][0] for resp in theirs[doc_id]["resps"]]  # one (logprob, greedy) a choice
        want = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(want, abs=1e-4)
        assert [r[0][1] for r in theirs[doc_id]["resps"]] == [r[0][1] for r in sample["resps"]]
        assert theirs[doc_id]["acc"] == sample["acc"]
    assert via_server["results"][task]["acc,none"] == in_process["results"][task]["acc,none"]


def test_echo_logprobs_keep_a_drawn_stop_token_as_lm_eval_reads_them(served):
    parser = pytest.importorskip("lm_eval.models.openai_completions",
                                 reason="needs lm-eval").LocalCompletionsAPI
    tok = served.tok
    context, continuation = tok.encode("What is 7 plus 26?\nAnswer:"), tok.encode(" B")
    ids = context + continuation
    with served.hooks.forcing(tok.special_tokens[ENDOFTEXT]):  # the model would end the text
        response = http().post(served.url + "/v1/completions", json={
            "model": NAME, "prompt": ids, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True})  # lm-eval's loglikelihood request, as it sends it
        logp = served.log_softmax(ids)
    assert response.status_code == 200
    want = sum(float(logp[p - 1, ids[p]]) for p in range(len(context), len(ids)))
    ((got, _),) = parser.parse_logprobs(response.json(), tokens=[ids], ctxlens=[len(context)])
    assert got == pytest.approx(want, abs=1e-4)


# ------------------------------------------------------------------------------------- metrics


def test_metrics_are_exposed_and_count_requests_and_tokens(served):
    url = served.url
    wait_until(lambda: idle(url), "an idle server")
    before = read_metrics(url)
    text = http().get(url + "/metrics").text
    for name in ("lmforge_requests_total", "lmforge_generated_tokens_total",
                 "lmforge_prompt_tokens_total", "lmforge_queue_depth", "lmforge_active_slots",
                 "lmforge_batch_size_bucket", "lmforge_time_to_first_token_seconds_bucket",
                 "lmforge_inter_token_latency_seconds_bucket"):
        assert name in text, name
    out = served.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=6,
                                             temperature=0)
    http().post(url + "/v1/completions", json=_completion(temperature="hot"))
    wait_until(lambda: idle(url), "an idle server after the request")
    after = read_metrics(url)
    n = out.usage.completion_tokens
    assert n > 1
    assert after[COMPLETIONS_200] - before.get(COMPLETIONS_200, 0) == 1
    bad = 'lmforge_requests_total{endpoint="/v1/completions",status="400"}'
    assert after[bad] - before.get(bad, 0) == 1
    assert after["lmforge_generated_tokens_total"] - before["lmforge_generated_tokens_total"] == n
    assert after[PROMPT_TOKENS] - before[PROMPT_TOKENS] == out.usage.prompt_tokens
    ttft, itl = ("lmforge_time_to_first_token_seconds_count",
                 "lmforge_inter_token_latency_seconds_count")
    assert after[ttft] - before[ttft] == 1
    assert after[itl] - before[itl] == n - 1
    assert after["lmforge_batch_size_count"] > before["lmforge_batch_size_count"]


# ----------------------------------------------------------------------------- command and config


def test_serve_help_lists_the_serving_flags(capsys):
    from lmforge.cli import main

    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--max-batch", "--max-queue", "--api-key", "--max-body-kb", "--port"):
        assert flag in out, flag


@pytest.mark.parametrize(("field", "value"), [("port", 0), ("port", 70000), ("max_batch", 0),
                                              ("max_queue", -1), ("max_body_kb", 0)])
def test_serve_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        ServeConfig(checkpoint="run", **{field: value})
    with pytest.raises(ConfigError, match="checkpoint"):
        ServeConfig()
