"""Fast incremental decoding on token ids: static KV cache, prefill, one-token decode, sampling."""

from lmforge.inference.engine import (
    KVCache,
    decode_one_token,
    forward_cached,
    generate,
    generate_batch,
    prefill,
    prefill_rows,
    room_for,
    sample,
)
from lmforge.inference.params import SamplingParams
from lmforge.inference.text import generate_text

__all__ = ["KVCache", "SamplingParams", "decode_one_token", "forward_cached", "generate",
           "generate_batch", "generate_text", "prefill", "prefill_rows",
           "room_for", "sample"]
