"""Shared by the benchmark scripts: the median wall time of a callable, after one warm-up call."""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocations, lazy initialization, compilation caches
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
