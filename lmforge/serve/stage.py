"""``lmforge serve``: any model ``lmforge.load`` opens, behind an OpenAI-compatible HTTP API.

Threads, chosen deliberately: uvicorn's event loop (HTTP, JSON, detokenization) runs in the main
thread and the scheduler in one thread that owns the model; torch's intra-op threads are the
cores left after one for the event loop (``--threads 0``). On a 2-core machine that is one torch
thread: decode with 2 intra-op threads, competing with the event loop and the scheduler for 2
cores, was measured ≈ 10× slower than with 1 (serving issue; see docs/serving.md).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import check_at_least, option
from lmforge.errors import ConfigError, InputError

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """What ``lmforge serve`` serves and how."""

    checkpoint: str = option("", "the model: run directory, checkpoint, quantized file, Hugging "
                                 "Face directory or fine-tuning run")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, "TCP port")
    api_key: str = option("", "require 'Authorization: Bearer KEY' on /v1 (default: none; "
                              "also LMFORGE_API_KEY)")
    model_name: str = option("", "the model id clients name (default: the checkpoint's "
                                 "directory or file name)")
    max_batch: int = option(8, "requests decoded together (KV-cache slots)")
    max_queue: int = option(64, "requests waiting for a slot before new ones get 429")
    max_body_kb: int = option(1024, "largest request body accepted (413 above)")
    threads: int = option(0, "torch intra-op threads (0: the CPU cores minus one for the HTTP "
                             "event loop, at least 1)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = option("", "cast float weights: fp32 or bf16 (default: as stored)")

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint: required")
        check_at_least(self, 1, "max_batch", "max_body_kb", "port")
        check_at_least(self, 0, "max_queue", "threads")
        if self.port > 65535:
            raise ConfigError(f"port: must be 1 .. 65535, got {self.port}")
        self.api_key = self.api_key or os.environ.get("LMFORGE_API_KEY", "")


def torch_threads(requested: int) -> int:
    """The intra-op threads to use: ``requested``, or the cores minus one (at least one)."""
    return requested or max(1, (os.cpu_count() or 1) - 1)


def serve(config: ServeConfig) -> None:
    """Run the server until interrupted (Ctrl-C / SIGTERM end it cleanly)."""
    import uvicorn

    from lmforge.hardware import resolve_device
    from lmforge.loading import open_model
    from lmforge.serve.app import ServerSettings, create_app

    if not Path(config.checkpoint).exists():  # fail now, not after the server started
        raise InputError(f"{config.checkpoint}: no such run directory, checkpoint, quantized "
                         "file or Hugging Face directory")
    threads = torch_threads(config.threads)
    torch.set_num_threads(threads)
    device = resolve_device(config.device)
    name = config.model_name or Path(config.checkpoint).resolve().name

    def loader() -> tuple[torch.nn.Module, object]:
        loaded = open_model(config.checkpoint, device, config.dtype or None)
        log.info("serving %s as %r on %s:%d (%d torch threads, %d slots)", loaded.describe(),
                 name, config.host, config.port, threads, config.max_batch)
        return loaded.model, loaded.tokenizer

    settings = ServerSettings(model_name=name, api_key=config.api_key,
                              max_batch=config.max_batch, max_queue=config.max_queue,
                              max_body_bytes=config.max_body_kb * 1024)
    print(f"lmforge serve: http://{config.host}:{config.port}/ (chat page), OpenAI API at "
          f"http://{config.host}:{config.port}/v1", flush=True)
    uvicorn.run(create_app(settings, loader), host=config.host, port=config.port,
                log_level="warning")


class BackgroundServer:
    """The server app in a thread on 127.0.0.1 and a free port, for tests and benchmarks:
    ``with BackgroundServer(settings, loader) as url: ...`` (``url`` ends without a slash);
    ready (``/health`` 200) when the block starts, shut down cleanly when it ends."""

    def __init__(self, settings: Any, loader: Callable[[], tuple[Any, Any]],
                 timeout: float = 60.0) -> None:
        self.settings, self.loader, self.timeout = settings, loader, timeout

    def __enter__(self) -> str:
        import uvicorn

        from lmforge.serve.app import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.app = create_app(self.settings, self.loader)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return url
            except OSError:
                pass
            time.sleep(0.05)
        self.__exit__(None, None, None)
        raise TimeoutError(f"the server at {url} was not ready within {self.timeout:g} s")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
