"""Run bookkeeping shared by benchmarks and the command line: versions, peak memory."""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from typing import Any

import torch

__all__ = ["environment", "PeakRSS", "current_rss"]


def environment() -> dict[str, Any]:
    """Versions and machine facts to store next to every result."""
    import numpy

    from . import __version__

    return {
        "ibau": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakRSS:
    """Context manager sampling the process RSS every ``interval`` seconds.

    ``peak - start`` is the extra memory the block needed at its worst; on a GPU,
    ``torch.cuda.max_memory_allocated`` is recorded as well.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = 0
        self.cuda_peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = current_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, current_rss())
        if torch.cuda.is_available():
            self.cuda_peak = torch.cuda.max_memory_allocated()

    @property
    def extra(self) -> int:
        return self.peak - self.start
