"""The chat loop behind ``lmforge chat``: read user lines, answer each with the model, stream it.

The whole conversation is rendered with :func:`lmforge.tokenizer.render_chat` on every turn (the
model has no memory of its own). When it grows too long for the context, the oldest user/assistant
turns are dropped, never the system message. The loop takes its input lines and output functions
as arguments, so it runs the same on a terminal and in a test.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from lmforge.config import check_at_least, option
from lmforge.inference.params import SamplingParams
from lmforge.inference.text import generate_text
from lmforge.model import Transformer
from lmforge.tokenizer import CHAT_TOKENS, ENDOFTEXT, Message, Tokenizer, render_chat

COMMANDS = {"/reset": "forget the conversation, keep the system message",
            "/exit": "quit, as does the end of the input"}


@dataclass
class ChatConfig(SamplingParams):
    """How ``lmforge chat`` answers: the sampling settings, and these."""

    checkpoint: str = option("", "the model: run directory, checkpoint file, quantized file or "
                                 "Hugging Face directory")
    system: str | None = option(None, "system message that starts every conversation")
    dtype: Literal["fp32", "bf16"] | None = option(
        None, "cast the weights to this dtype (default: as stored); bf16 pays off on large "
              "models")
    compile: bool = option(False, "torch.compile the decode step (the first reply waits for "
                                  "the compilation)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, 1, "max_new_tokens")


def chat(model: Transformer, tokenizer: Tokenizer, lines: Iterable[str],
         write: Callable[[str], None], config: ChatConfig, *, prompt: str = "",
         notify: Callable[[str], None] | None = None) -> list[Message]:
    """Answer each line of ``lines`` (a user message, or a command: /reset, /exit) with a reply
    streamed through ``write``; ``prompt`` is written before each line is read (without one —
    piped input — replies are separated by a blank line), notes (dropped turns, messages too
    long, a reply stopped by Ctrl-C) go to ``notify`` (default: standard error). Ctrl-C during a
    reply stops that reply only. Returns the history."""
    notify = notify or _to_stderr
    system = [Message("system", config.system)] if config.system is not None else []
    history = list(system)
    generator = config.generator()
    render_chat(tokenizer, [])  # a tokenizer without the chat tokens fails before any input
    # <|end|> ends the reply; so do a new turn's marker and a document end, should they come
    stop_ids = [tokenizer.token_id(s) for s in (*CHAT_TOKENS, ENDOFTEXT)
                if s in tokenizer.special_tokens]
    # at least this much of the context is kept free for the reply, however long the history
    reserve = min(config.max_new_tokens, model.config.context // 2)
    remaining = iter(lines)
    while True:
        if prompt:
            write(prompt)
        line = next(remaining, None)
        if line is None:
            if prompt:  # end the prompt's line, as the user's Enter would have
                write("\n")
            return history
        text = line.rstrip("\r\n")
        word = text.strip()
        if word == "/exit":
            return history
        if word == "/reset":
            history = list(system)
            notify("conversation reset")
            continue
        if word.startswith("/") and " " not in word:  # a one-word /command, mistyped
            notify(f"unknown command {word}; commands: "
                   + "; ".join(f"{c} ({what})" for c, what in COMMANDS.items()))
            continue
        if not word:
            continue
        history.append(Message("user", text))
        ids, dropped = _fit(tokenizer, history, len(system), model.config.context - reserve)
        if ids is None:
            history.pop()
            notify(f"message too long: in the chat format (with the system message, if any) "
                   f"it takes more than {model.config.context - reserve} of the model's "
                   f"{model.config.context} context tokens, the rest being kept for the reply; "
                   "shorten it")
            continue
        if dropped:
            turns = sum(m.role == "user" for m in history[len(system):len(system) + dropped])
            del history[len(system):len(system) + dropped]
            notify(f"dropped the oldest {turns} turn(s) of the conversation to fit the model's "
                   f"context of {model.config.context} tokens")
        reply = []
        try:
            for chunk in generate_text(model, tokenizer, ids, config, stop_ids=stop_ids,
                                       generator=generator, compile=config.compile):
                write(chunk)
                reply.append(chunk)
        except KeyboardInterrupt:  # Ctrl-C stops this reply; the conversation goes on
            notify("\n(reply stopped; the conversation goes on: /exit or Ctrl-D to quit)")
        # a terminal shows the next prompt after the reply; piped output a blank line
        write("\n" if prompt else "\n\n")
        history.append(Message("assistant", "".join(reply)))


def _fit(tokenizer: Tokenizer, history: list[Message], first: int, budget: int
         ) -> tuple[list[int] | None, int]:
    """Ids of the history with a generation prompt, after dropping the fewest oldest turns (from
    index ``first``, which follows the system message) so that they number at most ``budget``;
    and how many messages were dropped. None if even the last message alone is too long."""
    dropped = 0
    while True:
        kept = history[:first] + history[first + dropped:]
        ids = render_chat(tokenizer, kept)
        if len(ids) <= budget:
            return ids, dropped
        if first + dropped == len(history) - 1:  # only the new user message is left
            return None, 0
        # a turn is a user message and the replies after it, up to the next user message
        dropped += 1
        while history[first + dropped].role != "user":
            dropped += 1


def _to_stderr(note: str) -> None:
    print(note, file=sys.stderr, flush=True)
