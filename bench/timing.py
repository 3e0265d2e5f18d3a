"""Timing helpers shared by the benchmark scripts (standard library only: the peers' environment imports it too)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def summary(samples: list[float]) -> dict[str, float]:
    """Median with min-max: absolute times drift on shared machines, so the spread is shown too."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def timed(fn: Callable[[], Any], repeats: int) -> tuple[dict[str, float], Any]:
    """Run `fn` `repeats` times; return the timing summary and the last result."""
    samples, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - start)
    return summary(samples), result


def machine() -> dict[str, Any]:
    """Threads, Python and PyTorch of the measuring machine (PyTorch imported here: only our own benches call this)."""
    import platform

    import torch

    return {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}
