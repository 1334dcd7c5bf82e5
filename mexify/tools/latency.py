"""``mexify profile``: measured latency of every stage, head and policy step, kept in the bundle.

FLOPs are a poor cost model on dense hardware (early high-resolution layers are memory-bound,
small kernels launch-bound), so the bundle keeps what the target really spends. Each stage and
each early head is timed on a batch of random images at the bundle's input size (median of
``repeats`` after ``warmup``; CUDA events on a GPU, ``perf_counter`` on a CPU), and so is the
policy's decision at each early exit when the bundle has one. Tables are keyed by device name,
batch size, dtype and input size, so one bundle holds the profiles of several targets.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from mexify.errors import ConfigError
from mexify.nn import device_name, run_head
from mexify.runtime import capture, masks_of, resolve_policy
from mexify.runtime.latency import LatencyProfile, profile_key, select_profile
from mexify.tools.timing import time_call

__all__ = [
    "LatencyProfile", "ProfileReport", "profile_latency", "profile_key", "select_profile", "time_stages",
    "timer", "autocast_for", "DTYPES",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Progress = Optional[Callable[[str, int, int], None]]


@dataclasses.dataclass
class ProfileReport:
    """What ``mexify profile`` measured: one :class:`LatencyProfile` per batch size, and the bundle that keeps them
    (None: nothing written); ``to_dict`` is the ``--json`` output."""

    profiles: List[LatencyProfile]
    bundle: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"bundle": self.bundle, "profiles": [p.to_dict() for p in self.profiles]}


def autocast_for(device: torch.device, dtype: str) -> Callable[[], Any]:
    """A factory of the autocast context for ``dtype`` (a null context for float32)."""
    if dtype == "float32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=DTYPES[dtype], cache_enabled=False)


def timer(device: torch.device, warmup: int, repeats: int, graphs: bool, autocast: Callable[[], Any]) -> Callable[[Callable[[], Any]], float]:
    """``timed(fn)``: median seconds of ``fn()``, replayed from a CUDA graph when ``graphs``."""
    def timed(fn: Callable[[], Any]) -> float:
        if graphs:
            replay, _ = capture(fn, device, autocast)
            return time_call(replay, device, warmup, repeats)

        def run() -> None:
            with autocast():
                fn()
        return time_call(run, device, warmup, repeats)
    return timed


def time_stages(model: Any, x: torch.Tensor, device: torch.device, warmup: int, repeats: int,
                progress: Progress = None, policy: Any = None, graphs: bool = False,
                autocast: Callable[[], Any] = contextlib.nullcontext) -> Dict[str, Optional[List[float]]]:
    """Seconds of each stage, early head, decision (with ``policy``) and mask on batch ``x``
    (eagerly, or each replayed from its own CUDA graph with ``graphs``).

    Returns:
        ``{"stage": [E], "head": [E-1], "policy": [E-1] or None, "mask": [E]}``, and for a model with
        head candidates ``"candidate_head": {exit name: [K]}``.
    """
    e = model.num_exits
    size = (int(x.shape[-2]), int(x.shape[-1]))
    with autocast():
        states = [model.start(x)]
        for i in range(e):
            states.append(model.run_stage(i, states[-1]))
        logits = [model.exit_logits(i, states[i + 1]) for i in range(e)]
    timed = timer(device, warmup, repeats, graphs, autocast)
    out: Dict[str, Optional[List[float]]] = {"stage": [], "head": [], "policy": [] if policy is not None else None, "mask": []}
    for i in range(e):
        out["stage"].append(timed(lambda i=i: model.run_stage(i, states[i])))
        if i < e - 1:
            out["head"].append(timed(lambda i=i: model.exit_logits(i, states[i + 1])))
            if policy is not None:
                out["policy"].append(timed(lambda i=i: policy.decide(i, logits[i])))
        out["mask"].append(timed(lambda i=i: masks_of(logits[i], size)))
        if progress is not None:
            progress("stages", i + 1, e)
    candidates = getattr(model, "candidates", None)
    if candidates is not None:  # each candidate on its exit's features, timed like the head
        out["candidate_head"] = {
            name: [timed(lambda h=h, i=i: run_head(h, model.head_inputs(i, states[i + 1]))) for h in candidates[name]]
            for i, name in enumerate(model.exit_names[:-1]) if name in candidates
        }
    return out


@torch.no_grad()
def profile_latency(
    model: Any,
    device: torch.device,
    batch_sizes: Sequence[int] = (1,),
    dtype: str = "float32",
    warmup: int = 3,
    repeats: int = 10,
    progress: Progress = None,
    graphs: Optional[bool] = None,
) -> List[LatencyProfile]:
    """Measure every stage, head and policy step at the model's input size, per batch size.

    ``graphs`` (default: on a CUDA device) times each piece replayed from a CUDA graph, as the
    runtime runs them there; the profile's ``mode`` says which.

    Raises:
        ConfigError: an unknown dtype, or a half-precision dtype the device cannot run.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    if dtype == "float16" and device.type == "cpu":
        raise ConfigError("float16 is for GPUs", "profile the CPU with --dtype float32 or bfloat16")
    model.eval().to(device)
    try:
        policy = resolve_policy(model)
    except ConfigError:
        policy = None  # not calibrated yet: stages and heads only
    name = device_name(device)
    h, w = (int(v) for v in model.input_size)
    out = []
    graphs = device.type == "cuda" if graphs is None else bool(graphs)
    if graphs and device.type != "cuda":
        raise ConfigError("CUDA graphs need a CUDA device", "profile the CPU without --graphs")
    autocast = autocast_for(device, dtype)
    for b in batch_sizes:
        x = torch.randn(int(b), 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
        t = time_stages(model, x, device, warmup, repeats, progress, policy, graphs, autocast)
        original_s = timer(device, warmup, repeats, graphs, autocast)(lambda: masks_of(model(x), (h, w)))
        out.append(LatencyProfile(
            device=name, batch_size=int(b), dtype=dtype, input_size=(h, w),
            stage_ms=[1000 * s for s in t["stage"]], head_ms=[1000 * s for s in t["head"]],
            policy_ms=[1000 * s for s in t["policy"]] if t["policy"] is not None else None,
            mask_ms=[1000 * s for s in t["mask"]],
            warmup=int(warmup), repeats=int(repeats), exit_names=list(model.exit_names),
            flops_to_exit=[int(model.cost_to_exit(i)) for i in range(model.num_exits)],
            original_flops=int(model.original_flops), original_ms=1000 * original_s,
            mode="graphs" if graphs else "eager",
            candidate_head_ms={k: [1000 * s for s in v] for k, v in t["candidate_head"].items()} if "candidate_head" in t else None,
        ))
    return out
