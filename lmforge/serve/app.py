"""The HTTP edge: OpenAI's completions and chat completions API (FastAPI), the web chat page,
health and Prometheus metrics, over one :class:`~lmforge.serve.scheduler.Scheduler`.

Text lives here: prompts are encoded, the chat template applied, tokens detokenized and stop
strings found (:class:`~lmforge.serve.text.TextStream`); the scheduler sees token ids and one
:class:`~lmforge.inference.SamplingParams` per request. Bad input is a 4xx with OpenAI's error
body, never a 500 with a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from lmforge.errors import InputError, LmforgeError
from lmforge.inference import SamplingParams
from lmforge.serve.metrics import Metrics
from lmforge.serve.protocol import ChatRequest, CompletionRequest, Sampling, error_body
from lmforge.serve.scheduler import QueueFull, Scheduler, Stream
from lmforge.serve.text import TextStream
from lmforge.tokenizer import ENDOFTEXT, Tokenizer
from lmforge.tokenizer.chat import END, Message, render_chat

log = logging.getLogger(__name__)

Loader = Callable[[], tuple[Any, Tokenizer]]  # () → (model, tokenizer), run at start-up


@dataclass
class ServerSettings:
    """What the HTTP edge needs to know (the CLI's :class:`~lmforge.serve.stage.ServeConfig`
    makes one)."""

    model_name: str = "lmforge"
    api_key: str = ""  # "" : no key required
    max_batch: int = 8
    max_queue: int = 64
    max_body_bytes: int = 1 << 20


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


@dataclass
class _State:
    settings: ServerSettings
    metrics: Metrics
    tokenizer: Tokenizer | None = None
    scheduler: Scheduler | None = None
    error: str = ""  # why loading failed
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(settings: ServerSettings, loader: Loader) -> FastAPI:
    """The server app; ``loader`` runs in a thread at start-up (503 until it is done)."""
    state = _State(settings, Metrics(settings.max_batch))

    def load() -> None:
        try:
            model, tokenizer = loader()
            state.scheduler = Scheduler(model, max_batch=settings.max_batch,
                                        max_queue=settings.max_queue,
                                        vocab_size=tokenizer.vocab_size,
                                        observer=state.metrics).start()
            state.tokenizer = tokenizer
        except Exception as e:  # whatever it is, /health and every request must say so
            state.error = str(e) if isinstance(e, LmforgeError | OSError) else \
                f"{type(e).__name__}: {e}"
            log.error("could not load the model: %s", state.error)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loading = threading.Thread(target=load, name="lmforge-load", daemon=True)
        loading.start()
        yield
        loading.join()
        if state.scheduler is not None:
            state.scheduler.shutdown()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.lmforge = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)  # a bug: logged, not sent
        return JSONResponse(error_body("internal server error", "server_error"),
                            status_code=500)

    app.add_middleware(_CountRequests, metrics=state.metrics)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("lmforge.serve").joinpath(
            "static/index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.scheduler is None:
            return JSONResponse({"status": "error" if state.error else "loading",
                                 "detail": state.error}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(request, settings)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": state.created, "owned_by": "lmforge"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, state, CompletionRequest)
        return await _complete(request, state, body)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _parse(request, state, ChatRequest)
        return await _chat(request, state, body)

    return app


class _CountRequests:
    """Counts /v1 requests by endpoint and status. Plain ASGI, not ``BaseHTTPMiddleware``:
    that one hides the client's disconnect from ``request.is_disconnected()``, which is how a
    non-streaming request learns that its client left."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


# ----------------------------------------------------------------------------------- parsing


def _authorize(request: Request, settings: ServerSettings) -> None:
    if not settings.api_key:
        return
    given = request.headers.get("authorization", "")
    expected = f"Bearer {settings.api_key}"
    if not hmac.compare_digest(given.encode(), expected.encode()):  # constant time
        raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


async def _parse(request: Request, state: _State, model: type[BaseModel]) -> Any:
    """The request body as ``model``, after the key, size, UTF-8 and JSON checks."""
    settings = state.settings
    _authorize(request, settings)
    if state.scheduler is None:
        raise ApiError(503, state.error or "the model is still loading; retry shortly",
                       "server_error" if state.error else "service_unavailable")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise ApiError(413, f"request body larger than {settings.max_body_bytes} bytes")
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > settings.max_body_bytes:
                raise ApiError(413, f"request body larger than {settings.max_body_bytes} bytes")
    except ClientDisconnect:  # nobody is left to answer: no error of ours
        raise ApiError(400, "the client disconnected while sending the request") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid UTF-8") from None
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        # the field as the client wrote it: list indices kept, pydantic's union tags dropped
        loc = first["loc"]
        param = ".".join(str(p) for p in loc[:1] + tuple(
            p for p in loc[1:] if isinstance(p, int) or p in ("role", "content", "name",
                                                             "include_usage"))) or None
        what = ("unrecognized request argument" if first["type"] == "extra_forbidden"
                else first["msg"])
        raise ApiError(400, f"{param}: {what}" if param else what, param=param) from None
    if body.model not in (None, settings.model_name):
        raise ApiError(400, f"model {body.model!r} is not served here; this server serves "
                            f"{settings.model_name!r}", param="model", code="model_not_found")
    return body


def _check_prompt(scheduler: Scheduler, ids: list[int], param: str) -> None:
    """A 400 naming ``param`` for a prompt the model cannot continue."""
    problem = scheduler.prompt_problem(ids)
    if problem:
        code, message = problem
        raise ApiError(400, f"{param}: {message}", param=param,
                       code=None if code == "empty_prompt" else code)


def _params(body: Sampling, prompt_len: int, context: int, index: int) -> SamplingParams:
    """The request's sampling settings for choice ``index`` (its seed + index)."""
    room = context - prompt_len
    max_new = room if body.max_tokens is None else body.max_tokens
    if max_new > room:
        raise ApiError(400, f"this model's context is {context} tokens; the prompt has "
                            f"{prompt_len} and max_tokens asks for {max_new} more",
                       param="max_tokens", code="context_length_exceeded")
    seed = body.seed if body.seed is not None else secrets.randbits(62)
    return SamplingParams(max_new_tokens=max_new, temperature=body.temperature,
                          top_k=body.top_k, top_p=body.top_p if body.top_p < 1 else None,
                          repetition_penalty=body.repetition_penalty, seed=seed + index)


# -------------------------------------------------------------------------------- generating


@dataclass
class _Choice:
    """One choice being generated: its stream and its text so far."""

    index: int
    stream: Stream
    text: TextStream
    finish_reason: str | None = None


def _submit(state: _State, prompt: list[int], params: SamplingParams, stop: list[str],
            stop_ids: tuple[int, ...], index: int) -> _Choice:
    assert state.scheduler is not None and state.tokenizer is not None
    try:
        stream = state.scheduler.submit(prompt, params, stop_ids,
                                        loop=asyncio.get_running_loop())
    except QueueFull as e:
        raise ApiError(429, str(e), "rate_limit_error", code="queue_full") from None
    except InputError as e:  # checked before: only a direct caller gets here
        raise ApiError(400, str(e), param="prompt") from None
    state.metrics.prompt_tokens.inc(len(prompt))
    return _Choice(index, stream, TextStream(state.tokenizer, stop))


def _submit_all(state: _State, wanted: list[tuple[int, list[int], SamplingParams]],
                stop: list[str], stop_ids: tuple[int, ...]) -> list[_Choice]:
    """Submit every choice of a request, or none: a refusal cancels those already queued."""
    choices: list[_Choice] = []
    try:
        for index, prompt, params in wanted:
            choices.append(_submit(state, prompt, params, stop, stop_ids, index))
    except ApiError:
        for c in choices:
            c.stream.cancel()
        raise
    return choices


async def _events(state: _State, choices: list[_Choice]
                  ) -> AsyncIterator[tuple[_Choice, str, bool]]:
    """(choice, new text, finished) as the choices' tokens arrive, interleaved."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: _Choice) -> None:
        last = None
        async for event in choice.stream:
            if event.token is not None:
                if last is None:
                    state.metrics.ttft.observe(event.time - choice.stream.submitted)
                else:
                    state.metrics.itl.observe(event.time - last)
                last = event.time
                state.metrics.generated_tokens.inc()
                text = choice.text.feed(event.token)
                if choice.text.stopped:  # a stop string: no more tokens needed
                    choice.stream.cancel()
                    choice.finish_reason = "stop"
                await queue.put((choice, text, False))
            else:
                if choice.finish_reason is None:  # "cancelled": the client left
                    choice.finish_reason = {"length": "length", "error": "error"}.get(
                        event.finish_reason or "", "stop")
                await queue.put((choice, choice.text.finish(), True))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        for _ in range(len(choices)):
            while True:
                choice, text, done = await queue.get()
                yield choice, text, done
                if done:
                    break
    finally:
        for c in choices:
            c.stream.cancel()
        for t in tasks:
            t.cancel()


async def _collect(request: Request, state: _State, choices: list[_Choice]) -> dict[int, str]:
    """Every choice's whole text; a client that leaves cancels them."""
    texts = {c.index: "" for c in choices}

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        for c in choices:
            c.stream.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for choice, text, _ in _events(state, choices):
            texts[choice.index] += text
    finally:
        watcher.cancel()
    return texts


class _EventStream(StreamingResponse):
    """Server-Sent Events whose requests are cancelled however the response ends — also when
    the client leaves while a send is blocked, which cancels the response outside the frame
    generator and would leave its own clean-up to the garbage collector."""

    def __init__(self, frames: AsyncIterator[str], choices: list[_Choice]) -> None:
        super().__init__(frames, media_type="text/event-stream")
        self.choices = choices

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for c in self.choices:
                c.stream.cancel()


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _generation_failed() -> ApiError:
    return ApiError(500, "generation failed (a server error, logged there)", "server_error")


def _check_generated(choices: list[_Choice]) -> None:
    if any(c.finish_reason == "error" for c in choices):
        raise _generation_failed()


def _usage(prompt_tokens: int, choices: list[_Choice]) -> dict[str, int]:
    completion = sum(len(c.stream.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


# ------------------------------------------------------------------------------ completions


async def _complete(request: Request, state: _State, body: CompletionRequest) -> Response:
    tok, scheduler = state.tokenizer, state.scheduler
    assert tok is not None and scheduler is not None
    if body.stream and body.logprobs is not None:
        raise ApiError(400, "logprobs with stream are not supported; ask without stream",
                       param="logprobs")
    prompts = []
    for p in body.prompts():
        ids = tok.encode(p) if isinstance(p, str) else p
        _check_prompt(scheduler, ids, "prompt")
        prompts.append(ids)
    stop_ids = tuple(tok.special_tokens[s] for s in (ENDOFTEXT,) if s in tok.special_tokens)
    wanted = [(i * body.n + j, ids, _params(body, len(ids), scheduler.context, j))
              for i, ids in enumerate(prompts) for j in range(body.n)]
    choices = _submit_all(state, [w for w in wanted if w[2].max_new_tokens], body.stop,
                          stop_ids)
    prompt_tokens = sum(len(p) for p in prompts)
    echoes = {i * body.n + j: tok.decode(p) if body.echo else ""
              for i, p in enumerate(prompts) for j in range(body.n)}
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created,
            "model": state.settings.model_name}

    if body.stream:
        async def frames() -> AsyncIterator[str]:
            for index, echo in echoes.items():
                if echo:
                    yield _sse({**head, "choices": [{"text": echo, "index": index,
                                                     "logprobs": None, "finish_reason": None}]})
            async for choice, text, done in _events(state, choices):
                if done and choice.finish_reason == "error":
                    yield _sse(_generation_failed().body)
                    continue
                yield _sse({**head, "choices": [{
                    "text": text, "index": choice.index, "logprobs": None,
                    "finish_reason": choice.finish_reason if done else None}]})
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, choices)})
            yield "data: [DONE]\n\n"

        return _EventStream(frames(), choices)

    texts = await _collect(request, state, choices)
    _check_generated(choices)
    by_index = {c.index: c for c in choices}
    out = []
    for index, echo in echoes.items():
        choice = by_index.get(index)
        text = texts.get(index, "")
        entry = {"text": echo + text, "index": index, "logprobs": None,
                 "finish_reason": choice.finish_reason if choice else "length"}
        if body.logprobs is not None:
            prompt = prompts[index // body.n]
            entry["logprobs"] = await _logprobs(state, prompt, choice, body)
        out.append(entry)
    return JSONResponse({**head, "choices": out, "usage": _usage(prompt_tokens, choices)})


async def _logprobs(state: _State, prompt: list[int], choice: _Choice | None,
                    body: CompletionRequest) -> dict[str, Any]:
    """OpenAI's legacy logprobs object of the returned tokens: the prompt's too with
    ``echo`` (its first token has none), the generated ones after."""
    assert state.scheduler is not None and state.tokenizer is not None
    tok = state.tokenizer
    generated = list(choice.stream.tokens) if choice else []
    if choice and choice.stream.stop_token is not None:  # the token it drew to end, as OpenAI
        generated.append(choice.stream.stop_token)
    ids = prompt + generated
    if len(ids) > state.scheduler.context:
        ids = ids[:state.scheduler.context]
    logp = await asyncio.wrap_future(state.scheduler.score(ids))  # (len, vocab)
    start = 0 if body.echo else len(prompt)
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = 0
    for pos in range(start, len(ids)):
        piece = tok.decode([ids[pos]])
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        if pos == 0:
            token_logprobs.append(None)
            top.append(None)
            continue
        row = logp[pos - 1, :tok.vocab_size]
        token_logprobs.append(float(row[ids[pos]]))
        k = body.logprobs or 0
        best = row.topk(k) if k else None
        top.append({tok.decode([int(i)]): float(v) for v, i in
                    zip(best.values, best.indices, strict=True)} if best is not None else {})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


# ------------------------------------------------------------------------------------- chat


async def _chat(request: Request, state: _State, body: ChatRequest) -> Response:
    tok, scheduler = state.tokenizer, state.scheduler
    assert tok is not None and scheduler is not None
    prompt = render_chat(tok, [Message(m.role, m.content) for m in body.messages])
    _check_prompt(scheduler, prompt, "messages")
    stop_ids = tuple(tok.special_tokens[s] for s in (END, ENDOFTEXT) if s in tok.special_tokens)
    wanted = [(j, prompt, _params(body, len(prompt), scheduler.context, j))
              for j in range(body.n)]
    choices = _submit_all(state, wanted, body.stop, stop_ids)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk", "created": created,
            "model": state.settings.model_name}

    if body.stream:
        async def frames() -> AsyncIterator[str]:
            for c in choices:
                yield _sse({**head, "choices": [{"index": c.index, "delta": {
                    "role": "assistant", "content": ""}, "finish_reason": None}]})
            async for choice, text, done in _events(state, choices):
                if text:
                    yield _sse({**head, "choices": [{"index": choice.index,
                                                     "delta": {"content": text},
                                                     "finish_reason": None}]})
                if done and choice.finish_reason == "error":
                    yield _sse(_generation_failed().body)
                elif done:
                    yield _sse({**head, "choices": [{"index": choice.index, "delta": {},
                                                     "finish_reason": choice.finish_reason}]})
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(len(prompt), choices)})
            yield "data: [DONE]\n\n"

        return _EventStream(frames(), choices)

    texts = await _collect(request, state, choices)
    _check_generated(choices)
    return JSONResponse({**head, "object": "chat.completion", "choices": [
        {"index": c.index, "message": {"role": "assistant", "content": texts[c.index]},
         "finish_reason": c.finish_reason} for c in choices],
        "usage": _usage(len(prompt), choices)})
