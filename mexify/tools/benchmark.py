"""``mexify bench``: per-exit latency and the policy's measured speed-up against the original model.

Like with like: the original model runs the way the runtime does (eager against eager, CUDA
graphs against CUDA graphs, the same autocast dtype and memory format); it is the baseline of every
measured speed-up in mexify (:func:`original_runner`: ``bench``, ``compare``, the engine
comparison). Per-exit latency: each stage, head and decision timed on the first batch. Policy: the
runtime, the original model (plus its masks) and the runtime with every exit off each run over the
same images, in rounds, each batch waited for before the next starts (latency, as a camera loop
sees it: the runtime must wait anyway, to know which images leave). All timing is
:func:`mexify.tools.timing.time_calls` (``warmup`` untimed runs, median of ``repeats``):

* ``measured_speedup`` = original time / runtime time;
* ``exits_off_overhead`` = runtime with every exit off / original time - 1: what running the model
  as stages costs before any exit is taken (shown apart, never the baseline);
* ``predicted_speedup`` = the timed cost of the all-exits-off path (every stage, the final masks)
  over the mean over images of the timed cost of the exit each image took (stages, active heads
  and decisions on the way, masks): what the cost model predicts for the exit mix observed;
* ``flops_speedup`` = original FLOPs / mean FLOPs per image.

Accuracy on the same images, counted after the timing from the masks the last timed pass kept (nothing is
added to the timed calls): ``disagreement``, the share of pixels where the runtime's mask differs from the
original model's, and ``agreement_miou``; with labels, both models' mIoU and the ``drop``. The policy's
calibrated budget is judged on them (:func:`~mexify.tools.evaluation.budget_verdict`: ``budget_check``).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from mexify.config import json_safe
from mexify.data import as_loader, unpadded
from mexify.errors import ConfigError, DataError, MexifyError
from mexify.graph.adapt import adapt_output
from mexify.metrics import ConfusionMatrix
from mexify.nn import device_name, module_device, resolve_device
from mexify.runtime import BatchPrediction, EarlyExitRuntime, GraphedCall, exit_ms_per_image, masks_of, original_ms_per_image, resize_masks
from mexify.spec import ModelSpec, build_model
from mexify.tools.evaluation import BudgetObservation, BudgetVerdict, budget_verdict
from mexify.tools.latency import time_stages
from mexify.tools.timing import time_call, time_calls, timed_pass

log = logging.getLogger(__name__)

__all__ = ["BenchReport", "bench", "original_model", "original_runner"]

Batch = Tuple[torch.Tensor, Optional[torch.Tensor]]


@dataclasses.dataclass
class BenchReport:
    """What :func:`bench` measured. Latencies in milliseconds per batch of ``batch_size``.

    Attributes:
        exits: one row per exit: name, FLOPs to reach it (heads on the way included) and
            its share of the original, stage and head latency, latency to reach it and its
            share of the original model's latency.
        original: latency and FLOPs of the original model (``note`` says what was timed).
        policy: the policy's figures on the dataset (None without a policy): measured and
            FLOPs-predicted mean speed-up, exit rates, the share of pixels whose class differs from the
            original model's (``disagreement``, 0-1) and the ``agreement_miou``; with labels, mIoU beside the
            original's (``final_miou``) and the ``drop`` in points.
        budget_check: whether the budget the policy was calibrated for held on these images (None without
            a budget record): drop or disagreement against the original model; speed-up, cost share or ms
            per image measured (or by FLOPs, for a policy calibrated on FLOPs).
    """

    device: str
    batch_size: int
    image_size: Tuple[int, int]
    input_size: Tuple[int, int]
    warmup: int
    repeats: int
    exits: List[Dict[str, Any]]
    original: Dict[str, Any]
    policy: Optional[Dict[str, Any]]
    notes: List[str]
    flops_convention: str = "1 multiply-add = 1 FLOP, at the bundle's input size"
    mode: str = "eager"
    dtype: str = "float32"
    channels_last: bool = False
    budget_check: Optional[BudgetVerdict] = None

    def to_dict(self) -> Dict[str, Any]:
        out = json_safe(dataclasses.asdict(self))
        out["budget_check"] = self.budget_check.to_dict() if self.budget_check is not None else None
        return out


def original_model(model: Any) -> Tuple[nn.Module, str]:
    """The unmodified model the bundle was converted from, with the bundle's backbone weights.

    Rebuilt from the bundle's spec; stage parameters are named ``stages.<i>.<original name>``,
    so they load back by name. Falls back to the converted model's plain forward (which
    runs the same graph) when the spec cannot be rebuilt.

    Returns:
        (module in eval mode on the model's device, a note saying which one it is).
    """
    cfg = getattr(model, "config", None)
    dev = module_device(model)
    if cfg is None:
        return model, "converted model, all exits skipped (no bundle config to rebuild the original from)"
    if cfg.export is not None:
        return model, "exported programs, all exits skipped (an export does not rebuild the original model)"
    try:
        spec = ModelSpec.from_dict(cfg.spec)
        if spec.kind == "module":
            return model, "converted model, all exits skipped (converted from an in-memory module)"
        orig = build_model(dataclasses.replace(spec, weights=None))
    except (MexifyError, ImportError, RuntimeError, ValueError, TypeError) as e:
        log.warning("cannot rebuild the original model (%s); timing the converted model's plain forward", e)
        return model, "converted model, all exits skipped (the original could not be rebuilt)"
    state = {key.split(".", 1)[1]: value for key, value in model.stages.state_dict().items()}
    missing, unexpected = orig.load_state_dict(state, strict=False)
    if unexpected:
        log.info("original model: %d bundle tensors had no counterpart (e.g. %s)", len(unexpected), unexpected[0])
    if missing:
        log.info("original model: %d tensors kept their initial values (e.g. %s); latency is unaffected", len(missing), missing[0])
    for m in orig.modules():  # torch.export modules refuse .eval(); set the flag directly
        m.training = False
    return orig.to(dev), "original model rebuilt from the bundle's spec"


@torch.no_grad()
def bench(
    model: Any,
    data: Any,
    policy: Any = None,
    limit: Optional[int] = 32,
    batch_size: int = 1,
    warmup: int = 2,
    repeats: int = 5,
    device: Any = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
    cuda_graphs: Optional[bool] = None,
    dtype: Optional[str] = None,
    channels_last: Optional[bool] = None,
) -> BenchReport:
    """Per-exit latency and the policy's measured speed-up against the original model (see the module doc).

    Args:
        model: a :class:`~mexify.nn.MultiExitModel` (a bundle's, for the original model).
        data: a Dataset or DataLoader of ``(image, mask)``.
        policy: as for :func:`~mexify.runtime.resolve_policy`; None uses the bundle's policy
            and, without one, measures the exits only.
        limit, batch_size: images used.
        warmup, repeats: timing protocol.
        device: where to run (default: cuda if available).
        progress: ``progress(stage, done, total)``.
        cuda_graphs, dtype, channels_last: how the runtime runs (see
            :class:`~mexify.runtime.EarlyExitRuntime`); the original model runs the same way.

    Raises:
        DataError: no image. ConfigError: a policy fitted for another model.
    """
    dev = resolve_device(device)
    model.eval().to(dev)
    notes: List[str] = []
    options = {"cuda_graphs": cuda_graphs, "dtype": dtype, "channels_last": channels_last}
    try:
        rt = EarlyExitRuntime(model, policy, **options)
    except ConfigError as e:
        if policy is not None or "policy" not in e.message:
            raise
        notes.append(f"{e.message}: exits measured, no policy speed-up")
        rt = EarlyExitRuntime(model, exit=-1, **options)  # how the exits run, for the timings
        rt.policy_missing = True
    batches = [(x.contiguous(memory_format=rt.memory_format), y) for x, y in _batches(data, batch_size, limit, dev)]
    run_orig, orig_note = original_runner(model, rt)
    notes.append(f"original: {orig_note}; run as the runtime runs ({'CUDA graphs' if rt.cuda_graphs else 'eager'}, {rt.dtype})")
    x0 = batches[0][0]
    orig_s = time_call(lambda: run_orig(x0), dev, warmup, repeats)
    rows, exit_s, base_s = _exit_rows(model, rt, x0, orig_s, dev, warmup, repeats, progress)
    pol, check = None, None
    if not getattr(rt, "policy_missing", False):
        pol = _policy_figures(model, rt, run_orig, batches, dev, warmup, repeats, progress)
        pol["predicted_speedup"] = _predicted_speedup(exit_s, base_s, pol)
        for row in rows:
            row["exit_rate"] = pol["exit_rates"][row["name"]]
        check = _budget_check(rt.policy, pol, model.original_flops)
    if _labelled(batches, model.num_classes):
        _exit_accuracy(model, batches, rows)
    return BenchReport(
        device=device_name(dev),
        batch_size=int(x0.shape[0]),
        image_size=(int(x0.shape[-2]), int(x0.shape[-1])),
        input_size=tuple(int(v) for v in model.input_size),
        warmup=int(warmup),
        repeats=int(repeats),
        exits=rows,
        original={"latency_ms": 1000 * orig_s, "flops": int(model.original_flops), "note": orig_note},
        policy=pol,
        notes=notes,
        mode="graphs" if rt.cuda_graphs else "eager",
        dtype=rt.dtype,
        channels_last=rt.channels_last,
        budget_check=check,
    )


def original_runner(model: Any, rt: Any) -> Tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The baseline of every measured speed-up: the original model (:func:`original_model`) making its
    masks, run the way ``rt`` (an :class:`~mexify.runtime.EarlyExitRuntime`) runs. Returns (masks
    function, a note saying which model it is)."""
    orig, note = original_model(model)
    run = _original_runner(orig, rt)

    def without_grad(x: torch.Tensor) -> torch.Tensor:  # as the runtime runs: no autograd graph recorded
        with torch.no_grad():
            return run(x)
    return without_grad, note


def _original_runner(orig: nn.Module, rt: EarlyExitRuntime) -> Callable[[torch.Tensor], torch.Tensor]:
    """The original model's masks, run as the runtime runs (graphs, autocast, memory format)."""
    if rt.channels_last:
        orig.to(memory_format=torch.channels_last)

    def masks(x: torch.Tensor) -> torch.Tensor:
        return masks_of(adapt_output(orig(x)), (int(x.shape[-2]), int(x.shape[-1])))

    if rt.cuda_graphs:
        return GraphedCall(masks, rt.autocast)

    def eager(x: torch.Tensor) -> torch.Tensor:
        with rt.autocast():
            return masks(x)
    return eager


def _predicted_speedup(exit_s: List[float], base_s: float, pol: Dict[str, Any]) -> float:
    """The all-exits-off path's timed cost over the timed cost of the exit mix observed (both from the same pieces)."""
    mean = sum(rate * exit_s[i] for i, rate in enumerate(pol["exit_rates"].values()))
    return base_s / mean if mean > 0 else float("nan")


def _batches(data: Any, batch_size: int, limit: Optional[int], dev: torch.device) -> List[Batch]:
    """The first ``limit`` images, on the device (inputs) and the CPU (labels)."""
    out: List[Batch] = []
    n = 0
    for x, y in unpadded(as_loader(data, batch_size, limit)):
        if limit is not None and n + x.shape[0] > limit:
            x, y = x[: limit - n], (y[: limit - n] if y is not None else None)
        if x.shape[0] == 0:
            break
        out.append((x.to(dev), y))
        n += int(x.shape[0])
        if limit is not None and n >= limit:
            break
    if not out:
        raise DataError("no image to benchmark on", "check the dataset spec, split and --limit")
    return out


def _exit_rows(model: Any, rt: EarlyExitRuntime, x0: torch.Tensor, orig_s: float, dev: torch.device, warmup: int,
               repeats: int, progress: Optional[Callable[[str, int, int], None]]) -> Tuple[List[Dict[str, Any]], List[float], float]:
    """Each stage, head and decision timed on one batch, run as the runtime runs; a row per exit
    with the time to reach it (every head on the way), and the time to leave at each exit when only
    the runtime's active heads run."""
    e = model.num_exits
    t = time_stages(model, x0, dev, warmup, repeats, progress, rt.policy, rt.cuda_graphs, rt.autocast)
    stage_s, head_s, policy_s, mask_s = t["stage"], t["head"], t["policy"], t["mask"]
    timed = {"batch_size": 1, "stage_ms": stage_s, "head_ms": head_s, "policy_ms": policy_s, "mask_ms": mask_s,
             "mode": "graphs" if rt.cuda_graphs else "eager"}
    exit_s = exit_ms_per_image(timed, rt.active)  # seconds per batch here (batch_size 1 above)
    base_s = original_ms_per_image(timed)
    rows = []
    for i, name in enumerate(model.exit_names):
        to_exit = sum(stage_s[: i + 1]) + sum(head_s[: min(i + 1, e - 1)])
        flops = int(model.cost_to_exit(i))
        rows.append({
            "index": i,
            "name": name,
            "flops": flops,
            "flops_fraction": flops / model.original_flops if model.original_flops else float("nan"),
            "stage_ms": 1000 * stage_s[i],
            "head_ms": 1000 * head_s[i] if i < e - 1 else 0.0,
            "latency_ms": 1000 * to_exit,
            "latency_fraction": to_exit / orig_s if orig_s else float("nan"),
            "policy_ms": 1000 * policy_s[i] if i < e - 1 else 0.0,
            "mask_ms": 1000 * mask_s[i],
        })
    return rows, exit_s, base_s


def _policy_figures(model: Any, rt: EarlyExitRuntime, run_orig: Callable[[torch.Tensor], torch.Tensor], batches: List[Batch], dev: torch.device,
                    warmup: int, repeats: int, progress: Optional[Callable[[str, int, int], None]]) -> Dict[str, Any]:
    """The runtime, the original model and the runtime with every exit off over the same images, timed
    in rounds: measured speed-up against the original, the exits-off overhead, FLOPs speed-up."""
    off = EarlyExitRuntime(model, exit=-1, cuda_graphs=rt.cuda_graphs, dtype=rt.dtype, channels_last=rt.channels_last)
    outs: List[BatchPrediction] = []
    finals: List[torch.Tensor] = []
    calls = {"policy": timed_pass(rt.predict_batch, batches, dev, outs),
             "original": timed_pass(lambda x: run_orig(x).clone(), batches, dev, finals),  # a graph's output is overwritten by its next replay
             "exits_off": timed_pass(off.predict_batch, batches, dev)}
    # at least one untimed pass first; timed_pass keeps each call's last outputs, scored below after the timing
    s = time_calls(calls, dev, max(1, warmup), repeats, (lambda d, t: progress("policy", d, t)) if progress is not None else None)
    n_img = sum(int(x.shape[0]) for x, _ in batches)
    idx = torch.cat([o.exit_index for o in outs])
    mean_flops = float(torch.cat([o.flops for o in outs]).double().mean())
    counts = torch.bincount(idx, minlength=model.num_exits).tolist()
    pol = {
        "name": str(getattr(rt.policy, "name", type(rt.policy).__name__)),
        "images": n_img,
        "ms_per_image": 1000 * s["policy"] / n_img,
        "original_ms_per_image": 1000 * s["original"] / n_img,
        "measured_speedup": s["original"] / s["policy"] if s["policy"] else float("nan"),
        "exits_off_ms_per_image": 1000 * s["exits_off"] / n_img,
        "exits_off_overhead": s["exits_off"] / s["original"] - 1.0 if s["original"] else float("nan"),
        "mean_flops": mean_flops,
        "flops_speedup": model.original_flops / mean_flops if mean_flops else float("nan"),
        "exit_rates": {n: float(c) / n_img for n, c in zip(model.exit_names, counts)},
    }
    # counted here, outside the timed region, from the outputs of the last pass that timed_pass kept
    pol.update(_against_original(model, batches, outs, finals))
    return pol


def _against_original(model: Any, batches: List[Batch], outs: List[BatchPrediction], finals: List[torch.Tensor]) -> Dict[str, Any]:
    """The runtime's masks against the original model's on the same images: the share of pixels whose class
    differs (labelled or not) and the agreement mIoU; with labels, both models' mIoU and the drop (points)."""
    k = model.num_classes
    agree, cm_p, cm_f = ConfusionMatrix(k), ConfusionMatrix(k), ConfusionMatrix(k)
    differ, pixels = 0, 0
    for (_, y), o, f in zip(batches, outs, finals):
        differ += int((o.masks != f).sum())
        pixels += int(f.numel())
        agree.update(o.masks.cpu(), f.cpu())
        if y is not None:
            cm_p.update(resize_masks(o.masks, y.shape[-2:]).cpu(), y)
            cm_f.update(resize_masks(f, y.shape[-2:]).cpu(), y)
    out: Dict[str, Any] = {"disagreement": differ / pixels if pixels else float("nan"), "agreement_miou": agree.miou()}
    if cm_f.total:  # labelled pixels: the drop against the labels
        out.update(miou=cm_p.miou(), final_miou=cm_f.miou())
        out["drop"] = out["final_miou"] - out["miou"]
    return out


def _budget_check(policy: Any, pol: Dict[str, Any], original_flops: float) -> Optional[BudgetVerdict]:
    """The policy's calibrated budget (its ``budget`` record) judged on the benchmarked images: accuracy against the
    original model, cost as measured here (:func:`~mexify.tools.evaluation.budget_verdict`)."""
    labelled = "drop" in pol
    observed = BudgetObservation(
        images=pol["images"],
        drop=pol["drop"] if labelled else 100.0 - pol["agreement_miou"],
        labelled=labelled,
        disagreement=pol["disagreement"],
        flops_speedup=pol["flops_speedup"],
        flops_fraction=pol["mean_flops"] / original_flops if original_flops else float("nan"),
        speedup=pol["measured_speedup"],
        cost_fraction=pol["ms_per_image"] / pol["original_ms_per_image"] if pol["original_ms_per_image"] else float("nan"),
        ms_per_image=pol["ms_per_image"],
        timing="measured",
        reference="original model",
    )
    figures = getattr(policy, "figures", None)
    return budget_verdict(getattr(policy, "budget", None), observed, figures if isinstance(figures, dict) else None)


def _labelled(batches: List[Batch], num_classes: int) -> bool:
    """Whether every batch has labels and some pixel is labelled (each exit's mIoU is then defined)."""
    return all(y is not None for _, y in batches) and any(bool(((y >= 0) & (y < num_classes)).any()) for _, y in batches)


def _exit_accuracy(model: Any, batches: List[Batch], rows: List[Dict[str, Any]]) -> None:
    """Each exit's own mIoU on the same images, so the table reads as one."""
    cms = [ConfusionMatrix(model.num_classes) for _ in range(model.num_exits)]
    for x, y in batches:
        for cm, logits in zip(cms, model.forward_all(x)):
            cm.update(resize_masks(masks_of(logits, tuple(x.shape[-2:])), y.shape[-2:]).cpu(), y)
    for row, cm in zip(rows, cms):
        row["miou"] = cm.miou()
