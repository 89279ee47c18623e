"""``lmforge report RUN_DIR``: write a run's report card, ``report.md`` and ``report.html``.

The two files are derived outputs that lmforge owns: in the run directory (the default) a new
report replaces the old one without asking — regenerating a report as the run goes on is the
point. In another ``--out`` directory an existing ``report.md``/``report.html`` may be someone
else's, so it is replaced only with ``--force``. Nothing is written under any other name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.config import option
from lmforge.errors import ConfigError, InputError
from lmforge.files import atomic_write_text, check_output
from lmforge.loading import find_run
from lmforge.report.render import to_html, to_markdown
from lmforge.report.sections import RunRecords, sections
from lmforge.rundir import TOKENIZER_FILE, RunDir

MARKDOWN = "report.md"
HTML = "report.html"


@dataclass
class ReportConfig:
    """What ``lmforge report`` reads and where it writes."""

    run: str = option("", "the run directory (`lmforge train --out`); a directory holding its "
                          "run in train/, like runs/quickstart, works too")
    out: str = option("", "directory to write report.md and report.html into (default: the run "
                          "directory, where they are regenerated freely)")
    force: bool = option(False, "replace report.md/report.html in an --out other than the run "
                                "directory")

    def __post_init__(self) -> None:
        if not self.run:
            raise ConfigError("run: required: the run directory to report on")


def open_run(path: str | Path) -> RunDir:
    """The run at ``path`` or in ``path/train``; a directory that is not a run is refused."""
    run = find_run(path)
    if run is None:
        raise InputError(f"{path}: not a run directory (no checkpoints/ or {TOKENIZER_FILE}, "
                         "here or in train/); give the --out of `lmforge train`")
    return run


def write_report(config: ReportConfig) -> list[Path]:
    """Write ``report.md`` and a self-contained ``report.html``; returns their paths."""
    run = open_run(config.run)
    out = Path(config.out) if config.out else run.path
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; give a directory for --out")
    if out.resolve() != run.path.resolve():
        for name in (MARKDOWN, HTML):
            check_output(out / name, config.force)
    parts = sections(RunRecords.read(run), out)
    title = f"Report card: {run.path}"
    return [atomic_write_text(out / MARKDOWN, to_markdown(title, parts)),
            atomic_write_text(out / HTML, to_html(title, parts))]
