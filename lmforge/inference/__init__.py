"""Fast incremental decoding on token ids: static KV cache, prefill, one-token decode, sampling."""

from lmforge.inference.engine import (
    KVCache,
    decode_one_token,
    forward_cached,
    generate,
    generate_batch,
    prefill,
    sample,
)
from lmforge.inference.text import generate_text

__all__ = ["KVCache", "decode_one_token", "forward_cached", "generate", "generate_batch",
           "generate_text", "prefill", "sample"]
