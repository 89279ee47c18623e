"""Fine-tuning data as published: conversations and preference pairs from JSON lines.

A file is JSON lines, or one JSON array (its text starts with ``[``); either may be gzipped
(``.gz``). Each row's format is recognised by its keys.

Conversations (:func:`read_conversations`):

* ``{"messages": [{"role", "content"}, …]}`` — OpenAI chat: multi-turn, system turns allowed;
* ``{"instruction", "input", "output"}`` — Alpaca: user = instruction, + "\\n\\n" + input if any;
* ``{"prompt", "completion"}`` — each a string or a list of messages;
* ``{"question", "answer"}`` — GSM8K: the answer verbatim, its ``#### N`` line included.

Preference pairs (:func:`read_preferences`):

* ``{"prompt", "chosen", "rejected"}`` — strings, or TRL's conversational format (the prompt a
  list of messages, each reply a list of one assistant message);
* ``{"chosen", "rejected"}`` — Anthropic HH-RLHF transcripts ("\\n\\nHuman: …\\n\\nAssistant: …")
  that share all but the last reply, or TRL message lists that share all but the last message.

A row that cannot be used is skipped and reported as a :class:`Skipped` (file, line, reason), or
with ``strict=True`` raises :class:`~lmforge.errors.InputError` naming ``file:line``. In a JSON
array, "line" is the element's 1-based position.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lmforge.errors import InputError
from lmforge.tokenizer.chat import ROLES, Message

Conversation = list[Message]
T = TypeVar("T")

# HH-RLHF turn markers: every turn starts with a blank line and the speaker's name.
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class PreferencePair:
    """Two replies to the same prompt, one preferred (DPO and reward-model data)."""

    prompt: tuple[Message, ...]  # the conversation so far; it ends with the user's turn
    chosen: str  # the preferred assistant reply
    rejected: str  # the other reply


@dataclass(frozen=True)
class Skipped:
    """A row left out, and why."""

    path: str
    line: int  # 1-based line of a JSON-lines file, or element of a JSON array
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class _BadRow(Exception):
    """A row's reason for being skipped (caught and recorded by :func:`_read`)."""


def read_conversations(path: str | Path, strict: bool = False
                       ) -> tuple[list[Conversation], list[Skipped]]:
    """The conversations in ``path``, each with at least one non-empty assistant turn, and the
    rows skipped."""
    return _read(path, parse_conversation, strict)


def read_preferences(path: str | Path, strict: bool = False
                     ) -> tuple[list[PreferencePair], list[Skipped]]:
    """The preference pairs in ``path``, and the rows skipped."""
    return _read(path, parse_preference, strict)


def parse_conversation(row: Any) -> Conversation:
    """One row as a conversation; raises :class:`InputError` saying what was expected."""
    try:
        return _conversation(_object(row))
    except _BadRow as e:
        raise InputError(str(e)) from None


def parse_preference(row: Any) -> PreferencePair:
    """One row as a preference pair; raises :class:`InputError` saying what was expected."""
    try:
        return _preference(_object(row))
    except _BadRow as e:
        raise InputError(str(e)) from None


# --- files ---------------------------------------------------------------------------------------

def _read(path: str | Path, parse: Callable[[Any], T], strict: bool
          ) -> tuple[list[T], list[Skipped]]:
    items: list[T] = []
    skipped: list[Skipped] = []
    for line, row in _rows(Path(path)):
        try:
            if isinstance(row, _BadRow):
                raise row
            items.append(parse(row))
        except (_BadRow, InputError) as e:
            if strict:
                raise InputError(f"{path}:{line}: {e}") from None
            skipped.append(Skipped(str(path), line, str(e)))
    return items, skipped


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, parsed row or the :class:`_BadRow` of a line that is not JSON); blank lines are
    passed over."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it as (gzipped) UTF-8 text: {e}") from None
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not a valid JSON array: {e}") from None
        yield from enumerate(array, start=1)
        return
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as e:
            yield line, _BadRow(f"invalid JSON ({e.msg} at column {e.colno})")


# --- rows ----------------------------------------------------------------------------------------

def _object(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
    return row


def _conversation(row: dict[str, Any]) -> Conversation:
    if "messages" in row:
        messages = _messages(row["messages"], "messages")
    elif "instruction" in row and "output" in row:
        user = _text(row, "instruction")
        extra = _text(row, "input") if row.get("input") is not None else ""
        messages = [Message("user", f"{user}\n\n{extra}" if extra else user),
                    Message("assistant", _text(row, "output"))]
    elif "prompt" in row and "completion" in row:
        messages = [*_turns(row["prompt"], "prompt", "user"),
                    *_turns(row["completion"], "completion", "assistant")]
    elif "question" in row and "answer" in row:
        messages = [Message("user", _text(row, "question")),
                    Message("assistant", _text(row, "answer"))]
    elif "chosen" in row and "rejected" in row:
        raise _BadRow("a preference pair, not a conversation (read it with read_preferences)")
    else:
        raise _BadRow(f"unknown format (keys {sorted(row)}); expected messages, "
                      "instruction+output, prompt+completion or question+answer")
    replies = [m for m in messages if m.role == "assistant"]
    if not replies:
        raise _BadRow("no assistant turn to learn from")
    if any(not m.content.strip() for m in replies):
        raise _BadRow("empty assistant turn")
    return messages


def _preference(row: dict[str, Any]) -> PreferencePair:
    if "chosen" not in row or "rejected" not in row:
        raise _BadRow(f"unknown format (keys {sorted(row)}); expected prompt+chosen+rejected "
                      "or chosen+rejected")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        prompt = _turns(row["prompt"], "prompt", "user")
        pair = PreferencePair(tuple(prompt), _reply(chosen, "chosen"),
                              _reply(rejected, "rejected"))
    elif isinstance(chosen, str) and isinstance(rejected, str):
        pair = _hh_pair(chosen, rejected)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        chosen_turns, rejected_turns = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        if chosen_turns[:-1] != rejected_turns[:-1]:
            raise _BadRow("chosen and rejected must share every message but the last")
        pair = PreferencePair(tuple(chosen_turns[:-1]), _reply(chosen[-1:], "chosen"),
                              _reply(rejected[-1:], "rejected"))
    else:
        raise _BadRow("expected chosen and rejected both strings or both message lists")
    if not pair.prompt or pair.prompt[-1].role != "user":
        raise _BadRow("expected a prompt that ends with a user turn")
    if pair.chosen == pair.rejected:
        raise _BadRow("chosen equals rejected")
    return pair


def _hh_pair(chosen: str, rejected: str) -> PreferencePair:
    """An Anthropic HH-RLHF row: two transcripts that differ only after the last
    "\\n\\nAssistant:"."""
    cut_c, cut_r = chosen.rfind("\n\nAssistant:"), rejected.rfind("\n\nAssistant:")
    if cut_c < 0 or cut_r < 0:
        raise _BadRow('expected HH-RLHF transcripts with an "\\n\\nAssistant:" turn')
    if chosen[:cut_c] != rejected[:cut_r]:
        raise _BadRow("chosen and rejected must share the dialogue before the last Assistant turn")
    head = chosen[:cut_c]
    parts = _HH_TURN.split(head)  # [before the first turn, name, text, name, text, …]
    if parts[0].strip():
        raise _BadRow('expected the transcript to start with "\\n\\nHuman:"')
    prompt = tuple(Message(_HH_ROLE[name], text.strip())
                   for name, text in zip(parts[1::2], parts[2::2], strict=True))
    start = len("\n\nAssistant:")
    return PreferencePair(prompt, _reply(chosen[cut_c + start:].strip(), "chosen"),
                          _reply(rejected[cut_r + start:].strip(), "rejected"))


def _reply(value: Any, field: str) -> str:
    """An assistant reply given as a string or as a list of one assistant message."""
    if isinstance(value, list):
        turns = _messages(value, field)
        if len(turns) != 1 or turns[0].role != "assistant":
            raise _BadRow(f"{field}: expected a string or a list of one assistant message")
        value = turns[0].content
    if not isinstance(value, str):
        raise _BadRow(f"{field}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadRow(f"empty {field} reply")
    return value


def _turns(value: Any, field: str, role: str) -> list[Message]:
    """A string as one message of ``role``, or a list of messages as they are."""
    if isinstance(value, str):
        return [Message(role, value)]  # type: ignore[arg-type]
    return _messages(value, field)


def _messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _BadRow(f"{field}: expected a non-empty list of {{role, content}} messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m:
            raise _BadRow(f"{field}[{i}]: missing role (expected {{role, content}})")
        if m["role"] not in ROLES:
            raise _BadRow(f"{field}[{i}]: unknown role {m['role']!r}; expected one of "
                          f"{', '.join(ROLES)}")
        messages.append(Message(m["role"], _content(m.get("content"), f"{field}[{i}]")))
    return messages


def _content(value: Any, where: str) -> str:
    """A message's text; OpenAI's list of ``{"type": "text", "text"}`` parts is joined."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise _BadRow(f"{where}: expected string content, got {type(value).__name__}")
    return value


def _text(row: dict[str, Any], key: str) -> str:
    if not isinstance(row.get(key), str):
        raise _BadRow(f"{key}: expected a string, got {type(row.get(key)).__name__}")
    return row[key]
