"""Byte-level BPE tokenizer: training, encoding, files and Hugging Face / tiktoken interchange."""

from lmforge.tokenizer.chat import CHAT_TEMPLATE, Message, render_chat
from lmforge.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN, PATTERNS
from lmforge.tokenizer.tokenizer import (
    CHAT_TOKENS,
    DEFAULT_SPECIAL_TOKENS,
    ENDOFTEXT,
    PAD,
    StreamDecoder,
    Tokenizer,
)

__all__ = ["CHAT_TEMPLATE", "CHAT_TOKENS", "DEFAULT_SPECIAL_TOKENS", "ENDOFTEXT", "GPT2_PATTERN",
           "GPT4_PATTERN", "PAD", "PATTERNS", "Message", "StreamDecoder", "Tokenizer",
           "render_chat"]
