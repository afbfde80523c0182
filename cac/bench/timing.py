"""Timing that survives a noisy machine: interleaved repetitions and the load other processes add."""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Mapping

__all__ = ["time_interleaved", "summarise_times", "ForeignLoad", "device_sync", "set_flush_denormal"]


def time_interleaved(fns: Mapping[str, Callable[[], Any]], warmup: int, repeats: int,
                     sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each function. The call order rotates every repetition, so whatever else
    the machine does falls on every function alike; the ``warmup`` rounds are not timed."""
    labels = list(fns)
    times: dict[str, list[float]] = {k: [] for k in labels}
    for rep in range(warmup + repeats):
        shift = rep % len(labels)
        for label in labels[shift:] + labels[:shift]:
            sync()
            t0 = time.perf_counter()
            fns[label]()
            sync()
            if rep >= warmup:
                times[label].append(time.perf_counter() - t0)
    return times


def summarise_times(seconds: list[float], batch_size: int) -> dict[str, float]:
    """fps from the median; min and spread (IQR / median) to judge the noise."""
    med = statistics.median(seconds)
    q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [med, med, med]
    return {"fps": batch_size / med, "time_ms_median": med * 1e3, "time_ms_min": min(seconds) * 1e3,
            "time_spread_pct": (q[2] - q[0]) / med * 100}


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy since boot, CPU seconds this process has used)."""
    import resource

    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:]]
    busy = sum(ticks[:3]) + sum(ticks[5:8])  # user nice system | irq softirq steal (not idle, iowait)
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


class ForeignLoad:
    """``with ForeignLoad() as load: ...`` -> ``load.cores``: the cores' worth of CPU time other
    processes used meanwhile (NaN where ``/proc/stat`` is missing). Interleaving spreads such load
    over the rows, but a large one still makes small differences unmeasurable."""

    cores = float("nan")

    def __enter__(self) -> "ForeignLoad":
        self._t0 = time.perf_counter()
        try:
            self._busy0, self._own0 = _cpu_seconds()
        except OSError:
            self._busy0 = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._busy0 is None:
            return
        busy, own = _cpu_seconds()
        wall = time.perf_counter() - self._t0
        self.cores = max(0.0, (busy - self._busy0) - (own - self._own0)) / wall if wall > 0 else 0.0


def device_sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def set_flush_denormal(on: bool) -> bool:
    """Set flush-to-zero for subnormals; returns the previous setting (False where unsupported)."""
    import torch

    previous = (torch.tensor([1e-30]) * 1e-10).item() == 0.0  # a subnormal product is flushed iff on
    torch.set_flush_denormal(on)
    return previous
