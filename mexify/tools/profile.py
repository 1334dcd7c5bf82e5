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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mexify.config import json_safe
from mexify.errors import ConfigError
from mexify.nn import device_name
from mexify.runtime import capture, exit_ms_per_image, masks_of, resolve_policy
from mexify.tools.timing import time_call

__all__ = [
    "LatencyProfile", "profile_latency", "profile_key", "select_profile", "time_stages",
    "timer", "autocast_for", "DTYPES",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Progress = Optional[Callable[[str, int, int], None]]


def profile_key(device: str, batch_size: int, dtype: str, size: Tuple[int, int], mode: str = "eager") -> str:
    """How a profile is filed in the bundle: ``"<device name>|b<batch>|<dtype>|<H>x<W>|<eager|graphs>"``."""
    return f"{device}|b{int(batch_size)}|{dtype}|{int(size[0])}x{int(size[1])}|{mode}"


@dataclasses.dataclass
class LatencyProfile:
    """Milliseconds per batch of ``batch_size`` for each stage, early head and policy step (exit order)."""

    device: str
    batch_size: int
    dtype: str
    input_size: Tuple[int, int]
    stage_ms: List[float]
    head_ms: List[float]
    policy_ms: Optional[List[float]]
    warmup: int
    repeats: int
    exit_names: List[str] = dataclasses.field(default_factory=list)
    flops_to_exit: List[int] = dataclasses.field(default_factory=list)  # every head on the way, 1 multiply-add = 1 FLOP
    original_flops: int = 0
    original_ms: Optional[float] = None  # the model's plain forward and its masks: every stage, no head
    mask_ms: Optional[List[float]] = None  # masks of the batch at each exit (resize to the input, argmax)
    mode: str = "eager"  # or "graphs": each stage, head and decision replayed from a CUDA graph
    # bundles with head candidates (convert --heads): every candidate's time, by exit name (calibrate --search)
    candidate_head_ms: Optional[Dict[str, List[float]]] = None

    @property
    def key(self) -> str:
        return profile_key(self.device, self.batch_size, self.dtype, self.input_size, self.mode)

    def to_exit_ms(self) -> List[float]:
        """Time per batch to leave at each exit, every head (and policy step) on the way, masks aside."""
        pieces = {"batch_size": 1, "stage_ms": self.stage_ms, "head_ms": self.head_ms, "policy_ms": self.policy_ms}
        return exit_ms_per_image(pieces, range(len(self.stage_ms)))

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return json_safe(d)


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
            name: [timed(lambda h=h, i=i: h(model.exit_features(i, states[i + 1]))) for h in candidates[name]]
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


def select_profile(table: Optional[Dict[str, Any]], want: Optional[str] = None, device: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The latency profile a calibration costs exits by, from a bundle's ``latency:`` table.

    Args:
        table: ``config.latency`` (key -> profile dict).
        want: part of a key (``"H100|b8|bfloat16"``); the single match is taken.
        device: without ``want``, prefer this device name (``"cpu"``, a GPU's name), batch 1, float32.

    Returns:
        the profile dict with its ``key``, or None when the table is empty and nothing is asked.

    Raises:
        ConfigError: ``want`` matches no key or several.
    """
    table = dict(table or {})
    if want:
        hits = [k for k in table if want in k]
        if len(hits) != 1:
            keys = ", ".join(table) or "none (run `mexify profile BUNDLE` first)"
            raise ConfigError(
                f"{'no' if not hits else len(hits)} latency profiles match {want!r}",
                f"profiles in the bundle: {keys}",
            )
        return {**table[hits[0]], "key": hits[0]}
    if not table:
        return None

    def rank(key: str) -> tuple:
        p = table[key]
        return (p.get("device") != device, int(p.get("batch_size", 1)) != 1, p.get("dtype") != "float32", key)

    key = min(table, key=rank)
    return {**table[key], "key": key}
