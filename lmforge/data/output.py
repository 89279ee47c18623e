"""The output directory of ``lmforge data prepare``: when a run may write into it, and how its
results replace what was there.

A prepare writes ``manifest.json``, the shards (``train_NNNNN.bin``, ``val_NNNNN.bin``) and, with
``rejects``, ``rejects.jsonl``; no other file in the directory is ever touched. It works in
``DIR/.work/``, stamped with the fingerprint of its config and tokenizer:

* ``DIR`` finished with this fingerprint: nothing to do (``force`` rebuilds it);
* ``.work/`` stamped with this fingerprint: an interrupted run of the same config, resumed;
* any other output, or another config's unfinished ``.work/``: refused unless ``force``.

New files are written to ``.work/out/`` and published (renamed into ``DIR``) only when all are
there: the old manifest is removed first (readers refuse a directory without one, so none sees a
mix of two runs), the new files are moved in, the other run's leftovers deleted, the new manifest
written and ``.work/`` removed. A failure before that leaves an earlier output whole.
"""

from __future__ import annotations

import re
from typing import Any

from lmforge.data.manifest import NAME as MANIFEST
from lmforge.data.manifest import load_manifest, write_manifest
from lmforge.data.storage import Store
from lmforge.errors import InputError

WORK = ".work"
STAGE = "out"  # new files wait in .work/out/ until published
REJECTS = "rejects.jsonl"
_STAMP = "config.sha256"
_OUTPUT = re.compile(rf"{re.escape(MANIFEST)}|{re.escape(REJECTS)}|(train|val)_\d+\.bin")


def _outputs(out: Store) -> list[Store]:
    """The files a prepare wrote into ``out``."""
    return [out / name for name in out.names() if _OUTPUT.fullmatch(name)]


def _stamp(work: Store) -> str | None:
    stamp = work / _STAMP
    return stamp.read_text() if stamp.is_file() else None


def finished(out: Store, fingerprint: str) -> dict[str, Any] | None:
    """The manifest of ``out`` when a prepare with ``fingerprint`` finished there (a ``.work/``
    it left behind is removed), else None."""
    try:
        manifest = load_manifest(out)
    except InputError:  # none yet, or unreadable: then it is an output to refuse or replace
        return None
    if manifest.get("fingerprint") != fingerprint:
        return None
    if _stamp(out / WORK) == fingerprint:  # stopped between writing the manifest and cleaning up
        (out / WORK).remove_tree()
    return manifest


def claim(out: Store, fingerprint: str, force: bool) -> Store:
    """``out/.work`` for a run with ``fingerprint``, with ``out/.work/out/`` for its new files;
    an interrupted run's is kept, to resume. Raises :class:`InputError` when ``out`` cannot be
    written, or holds what another prepare wrote and ``force`` is not set."""
    work = out / WORK
    try:
        out.mkdir()
        if _stamp(work) != fingerprint:
            found = [p.name for p in _outputs(out)] + ([f"{WORK}/"] if work.exists() else [])
            if found and not force:
                more = f" and {len(found) - 3} more" if len(found) > 3 else ""
                raise InputError(f"{out}: holds what another prepare wrote "
                                 f"({', '.join(found[:3])}{more}); choose another --out, or pass "
                                 "--force to replace it (the old files are removed once the new "
                                 "ones are written)")
            work.remove_tree()  # another config's cached chunks: never reuse them
        (work / STAGE).mkdir()
        (work / _STAMP).write_text(fingerprint)
    except OSError as e:
        raise InputError(f"{out}: cannot write here ({e.strerror or e}); give a writable "
                         "directory for --out") from None
    return work


def publish(out: Store, work: Store, files: dict[str, str], manifest: dict[str, Any]) -> None:
    """Move each file of ``work/out/`` named in ``files`` into ``out`` under its new name,
    delete what an earlier prepare left there, write ``manifest`` and remove ``work``."""
    (out / MANIFEST).remove()
    for staged, name in files.items():
        (work / STAGE / staged).move_to(out / name)
    for path in _outputs(out):
        if path.name not in files.values():
            path.remove()
    write_manifest(out, manifest)
    work.remove_tree()
