"""The chat page of ``lmforge serve`` (``lmforge/serve/static/index.html``) driven in real headless
Chromium against the real server and a tiny model: a reply streams into the page chunk by chunk,
and a full queue (429) shows the busy message, after which the same message goes through."""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer

from .conftest import tiny_model

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Chromium and chromedriver (Debian: apt-get install "
                                       "chromium chromium-driver)")
pytest.importorskip("selenium", reason="needs selenium (pip install selenium)")
pytest.importorskip("uvicorn", reason="the server needs uvicorn and fastapi")
pytest.importorskip("fastapi", reason="the server needs uvicorn and fastapi")

from selenium import webdriver  # noqa: E402  (after the skips)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TIMEOUT = 60  # seconds any one wait may take: generous for a loaded CI machine


@contextmanager
def serve(model: Transformer, tokenizer: Tokenizer, **settings: object) -> Iterator[str]:
    """The real server for ``model`` on 127.0.0.1 at a free port, in a background thread, ready;
    yields its base URL. ``settings``: :class:`ServerSettings` fields. The one place that knows
    how the server is started."""
    from lmforge.serve.app import ServerSettings
    from lmforge.serve.stage import BackgroundServer

    with BackgroundServer(ServerSettings(**settings), lambda: (model, tokenizer)) as url:
        yield url


class Gate:
    """Forward hooks on a model. Its special tokens are never drawn, so every reply runs to
    ``max_tokens`` and streams many chunks. While ``hold`` is set, a decode step (one new token
    per row, after a prefill) signals ``entered`` and waits for ``release``: the request then
    keeps its batch slot for as long as the test needs, with no sleeps and no timing guesses."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer) -> None:
        self.hold, self.entered, self.release = (threading.Event() for _ in range(3))
        specials = torch.tensor(sorted(tokenizer.special_tokens.values()))
        model.embed_tokens.register_forward_pre_hook(self._before_embedding)
        model.lm_head.register_forward_hook(
            lambda _module, _inputs, logits: logits.index_fill(-1, specials, float("-inf")))

    def _before_embedding(self, _module: object, inputs: tuple) -> None:
        ids = inputs[0]  # (B, T)
        if self.hold.is_set() and ids.shape[-1] == 1:
            self.entered.set()
            self.release.wait(TIMEOUT)


@pytest.fixture
def gated_model(tokenizer: Tokenizer) -> tuple[Transformer, Gate]:
    model = tiny_model(vocab_size=tokenizer.vocab_size, context=256)
    return model, Gate(model, tokenizer)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1000,800"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: webdriver.Chrome) -> WebDriverWait:
    return WebDriverWait(driver, TIMEOUT)


def open_page(driver: webdriver.Chrome, url: str) -> None:
    """Load the page and wait until it has asked the server for the model id."""
    driver.get(url + "/")
    wait(driver).until(lambda d: d.find_element(By.ID, "model").text.startswith("model: "))
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .error") == []


def finished(driver: webdriver.Chrome) -> bool:
    """The reply (or error) is in: the status says so and Send works again."""
    return (driver.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error")
            and driver.find_element(By.ID, "send").is_enabled())


def screenshot(driver: webdriver.Chrome, path: Path) -> Path:
    """Save a screenshot at ``path`` and a copy under $LMFORGE_TEST_ARTIFACTS when it is set."""
    assert driver.save_screenshot(str(path))
    artifacts = Path(os.environ.get("LMFORGE_TEST_ARTIFACTS", path.parent))
    artifacts.mkdir(parents=True, exist_ok=True)
    if artifacts.resolve() != path.parent.resolve():
        shutil.copy(path, artifacts / path.name)
    assert path.stat().st_size > 5_000  # a real rendering, not a blank page
    return path


def test_a_reply_streams_into_the_page(gated_model, tokenizer, browser, tmp_path):
    model, _ = gated_model
    with serve(model, tokenizer) as url:
        open_page(browser, url)
        browser.find_element(By.CSS_SELECTOR, "details summary").click()  # open the settings
        assert browser.find_element(By.ID, "temperature").get_attribute("value") == "0.8"
        max_tokens = browser.find_element(By.ID, "max-tokens")
        max_tokens.clear()
        max_tokens.send_keys("24")
        browser.find_element(By.ID, "system").send_keys("Be brief.")

        box = browser.find_element(By.ID, "input")
        box.send_keys("hello", Keys.SHIFT, Keys.ENTER, Keys.NULL, "world")  # Shift+Enter: newline
        box.send_keys(Keys.ENTER)  # Enter: send
        wait(browser).until(finished)

        assert browser.find_elements(By.CSS_SELECTOR, "#messages .error") == []
        assert [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#messages .user")] == [
            "hello\nworld"]
        (reply,) = browser.find_elements(By.CSS_SELECTOR, "#messages .assistant")
        assert reply.text.strip()
        assert int(reply.get_attribute("data-chunks")) > 1  # it streamed, not in one piece
        assert reply.get_attribute("data-finish") == "length"  # the 24 tokens, all of them
        assert browser.find_element(By.ID, "input").get_attribute("value") == ""
        screenshot(browser, tmp_path / "chat.png")


def test_a_full_queue_shows_the_busy_message(gated_model, tokenizer, browser, tmp_path):
    model, gate = gated_model
    with serve(model, tokenizer, max_batch=1, max_queue=0) as url:
        open_page(browser, url)
        # Another client takes the only slot, and keeps it while the page asks.
        gate.hold.set()
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}],
                           "stream": True, "max_tokens": 8}).encode()
        request = urllib.request.Request(url + "/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
        answers: list[bytes] = []
        other = threading.Thread(target=lambda: answers.append(
            urllib.request.urlopen(request, timeout=TIMEOUT).read()), daemon=True)
        other.start()
        try:
            assert gate.entered.wait(TIMEOUT), "the other request never started decoding"
            box = browser.find_element(By.ID, "input")
            box.send_keys("are you there?", Keys.ENTER)
            wait(browser).until(finished)
            (error,) = browser.find_elements(By.CSS_SELECTOR, "#messages .error")
            assert "The server is busy" in error.text
            # the refused turn is taken back, its text left in the box to resend
            assert browser.find_elements(By.CSS_SELECTOR, "#messages .user") == []
            assert box.get_attribute("value") == "are you there?"
            screenshot(browser, tmp_path / "busy.png")
        finally:
            gate.hold.clear()
            gate.release.set()
            other.join(TIMEOUT)
        assert answers and answers[0].rstrip().endswith(b"data: [DONE]")  # it was served in full

        browser.find_element(By.ID, "send").click()  # the slot is free again: resend
        wait(browser).until(finished)
        assert browser.find_element(By.ID, "status").get_attribute("data-state") == "done"
        (reply,) = browser.find_elements(By.CSS_SELECTOR, "#messages .assistant")
        assert reply.text.strip()
