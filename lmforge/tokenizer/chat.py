"""The chat format: a conversation as token ids, with the chat special tokens as real special ids.

Each message renders as ``<|role|>`` "\\n" content ``<|end|>`` "\\n"; a generation prompt appends
``<|assistant|>`` "\\n", after which the model writes its reply and ends it with ``<|end|>``. The
role markers and ``<|end|>`` are always special ids, and the content is always ordinary text, so
a user who types "<|end|>" cannot forge a turn boundary.

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
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
    if missing:
        raise InputError(f"the tokenizer lacks the chat special tokens {missing}; chat needs "
                         f"{', '.join(CHAT_TOKENS)} (lmforge tokenizers have them by default)")
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Message):
            raise InputError(f"messages[{i}]: expected a Message, got "
                             f"{type(message).__name__} (build one with Message(role, content))")
        ids.append(tokenizer.token_id(f"<|{message.role}|>"))
        # "\n" + content is one piece of ordinary text, as HF tokenizes the rendered template
        ids += tokenizer.encode("\n" + message.content)
        ids.append(tokenizer.token_id(END))
        ids += newline
    if add_generation_prompt:
        ids.append(tokenizer.token_id("<|assistant|>"))
        ids += newline
    return ids
