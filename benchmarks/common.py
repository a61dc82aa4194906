"""Timing helpers for the benchmarks: interleaved repeats, medians, one-line reports."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2,
                     device: str = "cpu", samples_out: dict[str, list[float]] | None = None
                     ) -> dict[str, float]:
    """Median seconds per call of each function, run round-robin so that drift in the machine's
    speed hits all of them alike. ``samples_out`` (a dict) receives every timing, in order."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
    if samples_out is not None:
        samples_out.update(samples)
    return {k: statistics.median(v) for k, v in samples.items()}


def paired_ratio(samples: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """Median, min and max over rounds of ``num / den`` timed in the same round: each round's
    pair saw the same machine state, so this is steadier than a ratio of medians on a shared
    machine."""
    r = sorted(a / b for a, b in zip(samples[num], samples[den]))
    return statistics.median(r), r[0], r[-1]


def machine() -> str:
    if torch.cuda.is_available():
        return f"CUDA {torch.cuda.get_device_name()}"
    return f"CPU, {torch.get_num_threads()} threads"
