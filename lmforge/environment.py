"""The machine and software a figure was measured with: CPU, accelerator, memory, versions.

One description for every place that records it: ``eval.json`` and the report card."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux
    return platform.processor() or platform.machine() or "unknown"


def memory_gib() -> float | None:
    """Physical memory in GiB (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def describe_machine() -> dict[str, str]:
    """Hardware, then the versions that shape results, as ``{item: value}``."""
    import numpy
    import torch

    import lmforge

    ram = memory_gib()
    cuda = (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            if torch.cuda.is_available() else "none")
    return {"CPU": cpu_model(), "CPU cores": str(os.cpu_count() or "unknown"),
            "torch threads": str(torch.get_num_threads()),
            "memory": f"{ram:.1f} GiB" if ram is not None else "unknown",
            "CUDA devices": cuda, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "lmforge": lmforge.__version__}
