"""A run's report card (``lmforge report``): one Markdown file and one self-contained HTML page.

- :mod:`.stage` — :class:`ReportConfig` and :func:`write_report`, the ``lmforge report`` stage.
- :mod:`.sections` — what the report says: summary, configs, data, tokenizer, training curves,
  evaluation, samples, timings, environment, each read from the run directory.
- :mod:`.machine` — the hardware and versions the report was made with.
- :mod:`.render` — the blocks a section holds, written as Markdown or as HTML.
"""

from lmforge.report.stage import ReportConfig, write_report

__all__ = ["ReportConfig", "write_report"]
