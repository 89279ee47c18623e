"""tiktoken interchange: the ``.tiktoken`` rank file (``base64(token) rank`` per line) plus a JSON
sidecar with the split pattern and special tokens, which together rebuild a ``tiktoken.Encoding``:

    ranks = tiktoken.load.load_tiktoken_bpe("tokenizer.tiktoken")
    meta = json.load(open("tiktoken.json"))
    enc = tiktoken.Encoding("mine", pat_str=meta["pat_str"], mergeable_ranks=ranks,
                            special_tokens=meta["special_tokens"])
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from lmforge.files import atomic_write_text
from lmforge.tokenizer.tokenizer import Tokenizer

RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tiktoken.json"


def save_tiktoken(tok: Tokenizer, out_dir: str | Path) -> Path:
    """Write the rank file and its sidecar into ``out_dir``. Ranks are token ids."""
    out_dir = Path(out_dir)
    if tok._rank_to_id is not None:
        raise ValueError("this tokenizer's ids do not follow its merge order, so they cannot be "
                         "tiktoken ranks; export it with --format hf instead")
    vocab = tok.vocab
    regular = sorted(i for i in vocab if i not in tok.special_tokens.values())
    lines = [f"{base64.b64encode(vocab[i]).decode('ascii')} {i}\n" for i in regular]
    atomic_write_text(out_dir / RANKS_FILE, "".join(lines))
    meta = {"pat_str": tok.pattern, "special_tokens": tok.special_tokens}
    atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2))
    return out_dir
