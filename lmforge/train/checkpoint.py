"""Checkpoints: atomic files in ``RUN/checkpoints/``, an index, and clear errors when one is bad.

A checkpoint holds everything a bit-exact resume needs: model and optimizer state, the step, the
data loader's position, every RNG state, the spike detector's window, the resolved config and the
tokenizer fingerprint. ``index.json`` lists them with their validation loss and whether they were
saved while training was healthy (*clean*: a rollback target). The last ``keep_last`` and the best
by validation loss are kept; older ones are deleted.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import InputError
from lmforge.files import atomic_path, atomic_write_text
from lmforge.rundir import RunDir

INDEX = "index.json"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """The checkpoint folder of one run."""

    def __init__(self, run: RunDir, keep_last: int = 3) -> None:
        self.dir = run.checkpoints
        self.keep_last = keep_last

    def entries(self) -> list[dict[str, Any]]:
        path = self.dir / INDEX
        if not path.exists():
            return []
        try:
            return json.loads(path.read_text())["checkpoints"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{path}: corrupt checkpoint index ({e})") from None

    def save(self, state: dict[str, Any], step: int, val_loss: float | None, clean: bool) -> Path:
        path = self.dir / f"step_{step:07d}.pt"
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        entries = [e for e in self.entries() if e["step"] != step]
        entries.append({"step": step, "path": path.name, "val_loss": val_loss, "clean": clean})
        entries.sort(key=lambda e: e["step"])
        keep = {e["path"] for e in entries[-self.keep_last:]}
        best = _best(entries)
        if best is not None:
            keep.add(best["path"])
        atomic_write_text(self.dir / INDEX, json.dumps(
            {"checkpoints": [e for e in entries if e["path"] in keep]}, indent=2))
        for e in entries:  # delete only after the index no longer lists them
            if e["path"] not in keep:
                (self.dir / e["path"]).unlink(missing_ok=True)
        return path

    def latest(self, clean_only: bool = False) -> Path | None:
        entries = [e for e in self.entries() if e["clean"] or not clean_only]
        return self.dir / entries[-1]["path"] if entries else None

    def best(self) -> Path | None:
        best = _best(self.entries())
        return self.dir / best["path"] if best is not None else None


def _best(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The entry with the lowest validation loss, if any has one."""
    scored = [e for e in entries if e["val_loss"] is not None]
    return min(scored, key=lambda e: e["val_loss"]) if scored else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file; a missing, truncated or foreign file is named in the error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint")
    try:
        # weights_only=False: our checkpoints hold RNG states and config dicts, not just tensors;
        # load only checkpoints you made.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a damaged archive
        hint = (" (for a Hugging Face model, give its directory)"
                if path.suffix in (".json", ".safetensors") else "")
        # torch's messages run to paragraphs: the first sentence names the problem
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        raise InputError(f"{path}: unreadable checkpoint, expected a .pt file saved by lmforge "
                         f"training{hint} ({type(e).__name__}: {reason})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise InputError(f"{path}: not an lmforge checkpoint (no model/config inside)")
    return state
