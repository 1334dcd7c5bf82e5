"""Timing on the clock: CUDA events on a GPU, ``perf_counter`` on a CPU, medians after warm-up."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Union

import torch

__all__ = ["time_call", "synchronize"]


def synchronize(device: Union[str, torch.device]) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: Union[str, torch.device] = "cpu", warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls: CUDA events on a GPU, perf_counter on CPU."""
    device = torch.device(device)
    for _ in range(max(0, warmup)):
        fn()
    times = []
    if device.type == "cuda":
        synchronize(device)
        for _ in range(max(1, repeats)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
    else:
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
