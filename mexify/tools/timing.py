"""The one timing primitive: warm-up, repeats, device synchronisation on CUDA, median.

Everything mexify times goes through :func:`time_calls`: the latency profile's stages, heads,
decisions and masks (``mexify profile``), ``bench``'s pieces and its policy, original and
exits-off passes, ``compare``'s measured speed-ups and the engine comparison. A timed call starts on
an idle device and ends when its device work is done: on CUDA the device is synchronised before it
and CUDA events bracket it (waited for); on a CPU ``perf_counter``. Several calls are timed in
rounds, each call once per round, so that drift on a shared machine falls on all of them alike.
:func:`timed_pass` is what one call is when a dataset is timed: every batch, each waited for.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

__all__ = ["time_call", "time_calls", "timed_pass", "synchronize"]

Device = Union[str, torch.device]


def synchronize(device: Device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn``, from an idle device to the end of its device work."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def time_calls(calls: Dict[str, Callable[[], Any]], device: Device = "cpu", warmup: int = 2, repeats: int = 5,
               progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, float]:
    """Median seconds of each call: ``warmup`` untimed rounds, then ``repeats`` timed rounds, each
    round running every call once, in turn (see the module docstring for how a call is timed).

    Args:
        calls: name -> a callable without arguments.
        device: where the calls run (CUDA: synchronised and timed with events; else ``perf_counter``).
        warmup, repeats: untimed and timed rounds (at least one timed).
        progress: ``progress(rounds_done, repeats)`` after each timed round.
    """
    device = torch.device(device)
    for _ in range(max(0, warmup)):
        for fn in calls.values():
            fn()
    rounds = max(1, repeats)
    samples: Dict[str, List[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name, fn in calls.items():
            samples[name].append(_seconds(fn, device))
        if progress is not None:
            progress(r + 1, rounds)
    return {name: statistics.median(v) for name, v in samples.items()}


def time_call(fn: Callable[[], Any], device: Device = "cpu", warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` (:func:`time_calls` with one call)."""
    return time_calls({"call": fn}, device, warmup, repeats)["call"]


def timed_pass(predict: Callable[[Any], Any], batches: Sequence[Any], device: Device, keep: Optional[List[Any]] = None) -> Callable[[], None]:
    """A call for :func:`time_calls`: ``predict`` over every batch's images (``(x, y)`` pairs), each batch
    waited for before the next starts (latency, as a camera loop sees it: the runtime must wait anyway,
    to know which images leave). The last pass's outputs replace the contents of ``keep``."""
    def run() -> None:
        outs = []
        for x, _ in batches:
            outs.append(predict(x))
            synchronize(device)
        if keep is not None:
            keep[:] = outs
    return run
