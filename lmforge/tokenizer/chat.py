"""The chat format: a conversation as token ids, with the chat special tokens as real special ids.

Each message renders as ``<|role|>`` "\\n" content ``<|end|>`` "\\n"; a generation prompt appends
``<|assistant|>`` "\\n", after which the model writes its reply and ends it with ``<|end|>``. The
role markers and ``<|end|>`` are always special ids, and the content is always ordinary text, so
a user who types "<|end|>" cannot forge a turn boundary. :func:`render_chat_masked` also marks the
tokens that fine-tuning learns: each assistant reply and its ``<|end|>``.

:data:`CHAT_TEMPLATE` is the same format as a Jinja template, for ``transformers``'
``apply_chat_template`` (the Hugging Face export writes it into ``tokenizer_config.json``). It
gives the same ids, except that HF reads special-token strings inside the content as special
tokens unless it is called with ``sanitize_control_tokens=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lmforge.errors import InputError
from lmforge.tokenizer.tokenizer import CHAT_TOKENS, Tokenizer

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")
END = "<|end|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('message role ' + message['role'] + ' is not one of system, user, "
    "assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: Role  # who speaks: "system" (instructions), "user" or "assistant" (the model)
    content: str  # plain text; special-token strings in it stay text

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InputError(f"message role {self.role!r} is not one of "
                             f"{', '.join(map(repr, ROLES))}")
        if not isinstance(self.content, str):
            raise InputError(f"message content must be a string, got "
                             f"{type(self.content).__name__}")


def render_chat(tokenizer: Tokenizer, messages: Sequence[Message],
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` in the chat format; with ``add_generation_prompt`` they end
    where the assistant's reply begins."""
    return _render(tokenizer, messages, add_generation_prompt)[0]


def render_chat_masked(tokenizer: Tokenizer, messages: Sequence[Message]
                       ) -> tuple[list[int], list[int]]:
    """``render_chat(tokenizer, messages, add_generation_prompt=False)`` and a loss mask of the
    same length: 1 on each assistant message's content tokens and its ``<|end|>``, 0 elsewhere.

    The mask starts after ``<|assistant|>`` "\\n", where generation starts from the generation
    prompt, so a fine-tuned model learns to write the reply and to end it. The "\\n" after a role
    marker is its own pretoken unless the content itself begins with line-break characters; then
    the token that holds both is learned too (it carries content)."""
    return _render(tokenizer, messages, False)


def _render(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool
            ) -> tuple[list[int], list[int]]:
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
    if missing:
        raise InputError(f"the tokenizer lacks the chat special tokens {missing}; chat needs "
                         f"{', '.join(CHAT_TOKENS)} (lmforge tokenizers have them by default)")
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Message):
            raise InputError(f"messages[{i}]: expected a Message, got "
                             f"{type(message).__name__} (build one with Message(role, content))")
        # "\n" + content is one piece of ordinary text, as HF tokenizes the rendered template
        body = tokenizer.encode("\n" + message.content)
        learn = int(message.role == "assistant")
        # the reply is learned from where the generation prompt <|assistant|> "\n" leaves off
        lead = len(newline) if body[: len(newline)] == newline else 0
        ids.append(tokenizer.token_id(f"<|{message.role}|>"))
        ids += body
        ids.append(tokenizer.token_id(END))
        mask += [0] * (1 + lead) + [learn] * (len(body) - lead + 1)
        ids += newline
        mask += [0] * len(newline)
    if add_generation_prompt:
        ids.append(tokenizer.token_id("<|assistant|>"))
        ids += newline
        mask += [0] * (1 + len(newline))
    return ids, mask

