"""Early-exit inference: run stage by stage, stop as soon as the policy says so.

:class:`EarlyExitRuntime` runs a :class:`~mexify.model.MultiExitModel` one stage at a
time. After each stage whose exit the policy may take, it evaluates that exit's head
on the samples still in the batch and asks ``policy.decide``; samples that exit leave
the batch (``StageState.select``) and the rest go on, so later stages really run on
fewer samples, and not at all once every sample has exited. Results are scattered
back in input order.

Costs are counted in FLOPs at the bundle's profiling input size (1 multiply-add = 1
FLOP): the stages run plus the heads evaluated on the way. Heads of exits the policy
can never take (a threshold of ``inf``) are not evaluated and not counted, so the
figure can be below ``model.cost_to_exit``.

Also here: :func:`evaluate_policy` (accuracy, FLOPs and exit rates of a policy on a
dataset) and :func:`bench` (per-exit latency and the measured speed-up of a policy
against the original model).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from mexify.config import json_safe
from mexify.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "Prediction",
    "BatchPrediction",
    "FixedExit",
    "EarlyExitRuntime",
    "resolve_policy",
    "predict",
    "evaluate_policy",
    "original_model",
    "time_call",
    "BenchReport",
    "bench",
]

Progress = Optional[Callable[[int, int], None]]


# =============================================================================== results
@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image's result.

    Attributes:
        mask: predicted labels ``(H, W)`` int64 at the input's resolution.
        exit_index: exit taken (0 = shallowest; ``num_exits - 1`` is the final exit).
        exit_name: that exit's name (fx node name, or ``final``).
        confidence: the policy's image confidence at the exit taken.
        flops: FLOPs spent on the image at the bundle's input size (stages run plus heads evaluated).
    """

    mask: torch.Tensor
    exit_index: int
    exit_name: str
    confidence: float
    flops: int

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready fields (without the mask)."""
        return {
            "exit": self.exit_index,
            "exit_name": self.exit_name,
            "confidence": None if not math.isfinite(self.confidence) else float(self.confidence),
            "flops": int(self.flops),
        }


@dataclasses.dataclass
class BatchPrediction:
    """A batch's results as tensors, in input order.

    Attributes:
        masks: ``(N, H, W)`` int64 on the device the model ran on.
        exit_index: ``(N,)`` int64 (CPU).
        confidence: ``(N,)`` float32 (CPU).
        flops: ``(N,)`` int64 (CPU).
        exit_names: names of all exits of the model.
    """

    masks: torch.Tensor
    exit_index: torch.Tensor
    confidence: torch.Tensor
    flops: torch.Tensor
    exit_names: List[str]

    def __len__(self) -> int:
        return int(self.exit_index.numel())

    def __getitem__(self, i: int) -> Prediction:
        e = int(self.exit_index[i])
        return Prediction(self.masks[i], e, self.exit_names[e], float(self.confidence[i]), int(self.flops[i]))

    def to_list(self) -> List[Prediction]:
        return [self[i] for i in range(len(self))]


# =============================================================================== policies
class FixedExit:
    """A policy-like object that sends every image to one exit (``mexify predict --exit N``).

    Its confidence is the mean top-1 softmax probability at that exit.
    """

    name = "fixed-exit"
    needs_features = False

    def __init__(self, exit_index: int, num_exits: int):
        if exit_index < 0:
            exit_index += num_exits
        if not 0 <= exit_index < num_exits:
            raise ConfigError(
                f"exit {exit_index} does not exist: the model has exits 0..{num_exits - 1}",
                "pass an index in range (negative counts from the final exit) or an exit name",
            )
        self.exit_index = int(exit_index)
        self.num_exits = int(num_exits)

    @torch.no_grad()
    def decide(self, exit_index: int, logits: torch.Tensor, features: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        conf = torch.softmax(logits.float(), dim=1).amax(1).flatten(1).mean(1)
        go = exit_index >= self.exit_index or exit_index == self.num_exits - 1
        return torch.full_like(conf, go, dtype=torch.bool), conf

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "exit": self.exit_index}

    def __repr__(self) -> str:
        return f"FixedExit({self.exit_index})"


def _exit_index(model: Any, exit: Union[int, str]) -> int:
    names = list(model.exit_names)
    if isinstance(exit, str) and not exit.lstrip("-").isdigit():
        if exit not in names:
            from mexify.errors import nearest

            near = nearest(exit, names)
            raise ConfigError(
                f"the model has no exit named {exit!r}",
                f"exits: {', '.join(names)}" + (f"; did you mean {near[0]!r}?" if near else ""),
            )
        return names.index(exit)
    return int(exit)


def resolve_policy(model: Any, policy: Any = None, exit: Union[int, str, None] = None) -> Any:
    """The policy object the runtime uses.

    Args:
        model: the multi-exit model.
        policy: a policy object (anything with ``decide``), a policy dict (a bundle's
            ``policy:`` entry), or None for the bundle's own policy (``model.config.policy``).
        exit: force every image to this exit (index, negative from the end, or name);
            overrides ``policy``.

    Raises:
        ConfigError: no policy anywhere, an unknown exit, or a policy fitted for other exits.
    """
    e = model.num_exits
    if exit is not None:
        return FixedExit(_exit_index(model, exit), e)
    if policy is None:
        cfg = getattr(model, "config", None)
        policy = getattr(cfg, "policy", None) if cfg is not None else None
        if policy is None:
            raise ConfigError(
                "the bundle has no exit policy",
                "run `mexify calibrate BUNDLE --data SPEC` first, or force an exit (exit=N / --exit N)",
            )
    if isinstance(policy, dict):
        from mexify.policies import policy_from_dict

        policy = policy_from_dict(policy)
    if not callable(getattr(policy, "decide", None)):
        raise ConfigError(f"{policy!r} is not an exit policy (it has no decide method)", "pass a Policy, a policy dict or exit=N")
    if getattr(policy, "needs_labels", False):
        raise ConfigError("the oracle reads labels and cannot run at inference time", "calibrate a deployable policy, e.g. mess")
    names = getattr(policy, "exit_names", None)
    if names is not None and list(names) != list(model.exit_names):
        raise ConfigError(
            f"the policy was fitted for exits {list(names)} but the model has {list(model.exit_names)}",
            "calibrate the policy on this bundle again",
        )
    th = getattr(policy, "thresholds", None)
    if isinstance(th, (list, tuple)) and len(th) != e - 1:
        raise ConfigError(f"the policy has {len(th)} thresholds for {e - 1} early exits", "calibrate the policy on this bundle again")
    return policy


def _active_exits(policy: Any, num_exits: int) -> List[int]:
    """Exits whose head must be evaluated: those the policy can take (the final one always)."""
    if isinstance(policy, FixedExit):
        return [policy.exit_index] if policy.exit_index < num_exits - 1 else [num_exits - 1]
    th = getattr(policy, "thresholds", None)
    if isinstance(th, (list, tuple)) and len(th) == num_exits - 1:
        # decide() tests confidence >= threshold; nothing passes +inf, so that head is never needed
        return [i for i, t in enumerate(th) if not (math.isinf(t) and t > 0)] + [num_exits - 1]
    return list(range(num_exits))


# =============================================================================== runtime
def _labels(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(1)``: ``max(1).indices`` gives the same (first) index, but argmax over the
    channel dim of an NCHW tensor takes a slow strided path on CPU (about 15x at 8x128x128)."""
    return scores.max(1).indices


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


class EarlyExitRuntime:
    """Early-exit inference with batch shrinking.

    Args:
        model: a :class:`~mexify.model.MultiExitModel`.
        policy: see :func:`resolve_policy` (default: the bundle's policy).
        exit: force every image to one exit instead (index or name).

    Example::

        rt = EarlyExitRuntime(mexify.load("model.mex"))
        for p in rt.predict(images):      # images (N, 3, H, W), normalised
            print(p.exit_name, p.confidence, p.mask.shape)
    """

    def __init__(self, model: Any, policy: Any = None, exit: Union[int, str, None] = None):
        self.model = model
        self.policy = resolve_policy(model, policy, exit)
        e = model.num_exits
        self.active = _active_exits(self.policy, e)
        self.needs_features = bool(getattr(self.policy, "needs_features", False))
        # FLOPs to leave at exit i: stages 0..i plus the heads evaluated on the way
        heads = [model.head_flops[j] if j in self.active else 0 for j in range(e - 1)] + [0]
        self.exit_flops = [int(sum(model.stage_flops[: i + 1]) + sum(heads[: i + 1])) for i in range(e)]

    @property
    def exit_names(self) -> List[str]:
        return list(self.model.exit_names)

    def _masks(self, i: int, logits: torch.Tensor, feats: Optional[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        last = i == self.model.num_exits - 1
        if self.needs_features and not last and hasattr(self.policy, "probabilities"):
            # class-means predicts from its own class scores, not from the head
            scores = self.policy.probabilities(i, logits, feats)
        else:
            scores = logits
        if tuple(scores.shape[-2:]) != tuple(size):
            scores = F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)
        return _labels(scores)

    @torch.no_grad()
    def predict_batch(self, x: torch.Tensor) -> BatchPrediction:
        """Run a batch ``(N, 3, H, W)`` with early exits; results in input order.

        Raises:
            DataError: ``x`` is not a 4-D batch.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"predict expects images (N, 3, H, W), got {shape}", "add a batch dimension with x.unsqueeze(0)")
        model = self.model
        if not model.training:  # toggling every submodule's mode costs more than a small stage
            return self._run(x.to(self._device(), non_blocking=True))
        model.eval()
        try:
            return self._run(x.to(self._device(), non_blocking=True))
        finally:
            model.train(True)

    def _device(self) -> torch.device:
        return _model_device(self.model)

    def _run(self, x: torch.Tensor) -> BatchPrediction:
        model, policy = self.model, self.policy
        n, e = int(x.shape[0]), model.num_exits
        size = (int(x.shape[-2]), int(x.shape[-1]))
        dev = x.device
        masks = torch.zeros((n, *size), dtype=torch.long, device=dev)
        exit_index = torch.full((n,), e - 1, dtype=torch.long, device=dev)
        confidence = torch.full((n,), float("nan"), dtype=torch.float32, device=dev)
        alive = torch.arange(n, device=dev)  # input rows still in the batch
        active = set(self.active)
        state = model.start(x)
        for i in range(e):
            if alive.numel() == 0:
                break
            state = model.run_stage(i, state)
            if i not in active:
                continue
            last = i == e - 1
            feats = model.exit_features(i, state) if self.needs_features and not last else None
            logits = model.exit_logits(i, state)
            go, conf = policy.decide(i, logits, feats)
            go = go.to(device=dev, dtype=torch.bool).reshape(-1)
            if last:
                go = torch.ones_like(go)
            leave = go.nonzero().squeeze(1)
            n_leave = int(leave.numel())  # one device sync per exit
            if n_leave:
                rows = alive.index_select(0, leave)
                sub_feats = feats.index_select(0, leave) if feats is not None else None
                masks.index_copy_(0, rows, self._masks(i, logits.index_select(0, leave), sub_feats, size))
                exit_index.index_fill_(0, rows, i)
                confidence.index_copy_(0, rows, conf.reshape(-1).to(dev, torch.float32).index_select(0, leave))
            if n_leave == alive.numel():
                break
            if n_leave:
                stay = (~go).nonzero().squeeze(1)
                state = state.select(stay)
                alive = alive.index_select(0, stay)
        idx = exit_index.cpu()
        flops = torch.tensor(self.exit_flops, dtype=torch.long)[idx]
        return BatchPrediction(masks, idx, confidence.cpu(), flops, self.exit_names)

    def predict(self, x: torch.Tensor) -> List[Prediction]:
        """Run a batch ``(N, 3, H, W)``; one :class:`Prediction` per image, in input order."""
        return self.predict_batch(x).to_list()

    __call__ = predict


def predict(model: Any, x: torch.Tensor, policy: Any = None, exit: Union[int, str, None] = None) -> List[Prediction]:
    """Early-exit predictions for a batch ``(N, 3, H, W)`` (see :class:`EarlyExitRuntime`).

    Args:
        model: a :class:`~mexify.model.MultiExitModel`.
        x: normalised images.
        policy: a policy object or dict; default the bundle's policy.
        exit: force every image to one exit (index or name) instead.

    Raises:
        ConfigError: no policy (and no ``exit``), or a policy fitted for other exits.
    """
    return EarlyExitRuntime(model, policy, exit).predict(x)


# =============================================================================== evaluation
def _split_batch(batch: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _loader_of(data: Any, split: str, batch_size: int, limit: Optional[int]) -> Any:
    """A DataLoader from a spec, a dataset or a loader (iterables of batches pass through)."""
    from torch.utils.data import DataLoader, Dataset, Subset

    from mexify.data import build_dataset, build_loader

    if isinstance(data, str):
        data = build_dataset(data, split=split, train=False)
    if isinstance(data, Dataset):
        if limit is not None and limit < len(data):
            data = Subset(data, range(int(limit)))
        return build_loader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    if isinstance(data, DataLoader) or isinstance(data, Iterable):
        return data
    raise DataError(f"cannot read batches from {type(data).__name__}", "pass a dataset spec, a Dataset or a DataLoader")


@torch.no_grad()
def evaluate_policy(
    model: Any,
    policy: Any,
    data: Any,
    split: str = "val",
    batch_size: int = 8,
    limit: Optional[int] = None,
    device: Any = None,
    progress: Progress = None,
) -> Any:
    """mIoU, mean FLOPs and exit rates of a policy on a dataset, through the runtime.

    Args:
        model: a :class:`~mexify.model.MultiExitModel`.
        policy: as for :func:`resolve_policy` (None: the bundle's policy).
        data: dataset spec, Dataset or DataLoader of ``(image, mask)`` batches.
        split: split of a spec.
        batch_size, limit: batching of a spec or Dataset; only the first ``limit`` images.
        device: where to run (default: where the model is).
        progress: ``progress(images_done, images_total_or_0)``.

    Returns:
        a :class:`mexify.evaluate.PolicyResult` (``miou`` and ``pixel_accuracy`` as
        fractions like the exit rows; ``extra`` holds the FLOPs speed-up, mean confidence,
        thresholds and time).

    Raises:
        DataError: no image, or classes that differ from the model's.
    """
    from mexify.evaluate import PolicyResult
    from mexify.metrics import ConfusionMatrix

    if device is not None:
        model.to(device)
    rt = EarlyExitRuntime(model, policy)
    loader = _loader_of(data, split, batch_size, limit)
    try:
        total = min(len(loader.dataset), limit) if limit is not None else len(loader.dataset)  # type: ignore[union-attr]
    except (AttributeError, TypeError):
        total = 0
    k = int(model.num_classes)
    dev = _model_device(model)
    cm = ConfusionMatrix(k, device=dev)
    counts = torch.zeros(model.num_exits, dtype=torch.long)
    flops, conf_sum, done = 0, 0.0, 0
    t0 = time.perf_counter()
    for batch in loader:
        x, y = _split_batch(batch)
        if limit is not None and done + x.shape[0] > limit:
            x = x[: limit - done]
            y = y[: limit - done] if y is not None else None
        if x.shape[0] == 0:
            break
        out = rt.predict_batch(x)
        if y is not None:
            y = y.to(dev)
            pred = out.masks
            if pred.shape[-2:] != y.shape[-2:]:
                pred = F.interpolate(pred[:, None].float(), size=y.shape[-2:], mode="nearest-exact")[:, 0].long()
            cm.update(pred, y)
        counts += torch.bincount(out.exit_index, minlength=model.num_exits)
        flops += int(out.flops.sum())
        conf_sum += float(torch.nan_to_num(out.confidence).sum())
        done += int(x.shape[0])
        if progress is not None:
            progress(done, total)
        if limit is not None and done >= limit:
            break
    if done == 0:
        raise DataError("no image to evaluate the policy on", "check the dataset spec, split and --limit")
    mean_flops = flops / done
    original = float(model.original_flops)
    th = getattr(rt.policy, "thresholds", None)
    extra: Dict[str, Any] = {
        "speedup_flops": original / mean_flops if mean_flops else float("nan"),
        "cost_fraction": mean_flops / original if original else float("nan"),
        "mean_confidence": conf_sum / done,
        "num_images": done,
        "seconds": time.perf_counter() - t0,
        "flops_convention": "1 multiply-add = 1 FLOP, at the bundle's input size",
    }
    if isinstance(th, (list, tuple)):
        extra["thresholds"] = {n: (None if math.isinf(t) else float(t)) for n, t in zip(model.exit_names, th)}
    return PolicyResult(
        name=str(getattr(rt.policy, "name", type(rt.policy).__name__)),
        miou=cm.miou(),
        pixel_accuracy=cm.pixel_accuracy(),
        mean_flops=mean_flops,
        exit_rates=tuple(float(c) / done for c in counts.tolist()),
        extra=extra,
    )


# =============================================================================== timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: Union[str, torch.device] = "cpu", warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls: CUDA events on a GPU, perf_counter on CPU."""
    device = torch.device(device)
    for _ in range(max(0, warmup)):
        fn()
    times = []
    if device.type == "cuda":
        _sync(device)
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


def original_model(model: Any) -> Tuple[nn.Module, str]:
    """The unmodified model the bundle was converted from, with the bundle's backbone weights.

    Rebuilt from the bundle's spec; stage parameters are named ``stages.<i>.<original name>``,
    so they load back by name. Falls back to the converted model's plain forward (which
    runs the same graph) when the spec cannot be rebuilt.

    Returns:
        (module in eval mode on the model's device, a note saying which one it is).
    """
    from mexify.errors import MexifyError

    cfg = getattr(model, "config", None)
    dev = _model_device(model)
    if cfg is None:
        return model, "converted model, all exits skipped (no bundle config to rebuild the original from)"
    try:
        import dataclasses as dc

        from mexify.spec import ModelSpec, build_model

        spec = ModelSpec.from_dict(cfg.spec)
        if spec.kind == "module":
            return model, "converted model, all exits skipped (converted from an in-memory module)"
        orig = build_model(dc.replace(spec, weights=None))
    except (MexifyError, ImportError, RuntimeError, ValueError, TypeError) as e:
        log.warning("cannot rebuild the original model (%s); timing the converted model's plain forward", e)
        return model, "converted model, all exits skipped (the original could not be rebuilt)"
    state = {}
    for key, value in model.stages.state_dict().items():
        state[key.split(".", 1)[1]] = value
    missing, unexpected = orig.load_state_dict(state, strict=False)
    if unexpected:
        log.info("original model: %d bundle tensors had no counterpart (e.g. %s)", len(unexpected), unexpected[0])
    if missing:
        log.info("original model: %d tensors kept their initial values (e.g. %s); latency is unaffected", len(missing), missing[0])
    for m in orig.modules():  # torch.export modules refuse .eval(); set the flag directly
        m.training = False
    return orig.to(dev), "original model rebuilt from the bundle's spec"


def _logits_of(out: Any) -> torch.Tensor:
    from mexify.spec import adapt_output

    return adapt_output(out)


@dataclasses.dataclass
class BenchReport:
    """What :func:`bench` measured. Latencies in milliseconds per batch of ``batch_size``.

    Attributes:
        exits: one row per exit: name, FLOPs to reach it (heads on the way included) and
            its share of the original, stage and head latency, latency to reach it and its
            share of the original model's latency.
        original: latency and FLOPs of the original model (``note`` says what was timed).
        policy: the policy's figures on the dataset (None without a policy): measured and
            FLOPs-predicted mean speed-up, exit rates, mIoU beside the final exit's.
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

    def to_dict(self) -> Dict[str, Any]:
        return json_safe(dataclasses.asdict(self))




@torch.no_grad()
def bench(
    model: Any,
    data: Any,
    policy: Any = None,
    split: str = "val",
    limit: Optional[int] = 32,
    batch_size: int = 1,
    warmup: int = 2,
    repeats: int = 5,
    device: Any = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> BenchReport:
    """Per-exit latency and the policy's measured speed-up against the original model.

    Per-exit latency: each stage and head timed on the first batch (median of ``repeats``
    after ``warmup``; CUDA events on a GPU, ``perf_counter`` on CPU). Policy: the runtime
    and the original model (plus argmax) each run over the same ``limit`` images, ``repeats``
    passes interleaved, median pass time; speed-up = original time / runtime time, beside
    the FLOPs-predicted one (original FLOPs / mean FLOPs per image).

    Args:
        model: a :class:`~mexify.model.MultiExitModel` (a bundle's, for the original model).
        data: dataset spec, Dataset or DataLoader of ``(image, mask)``.
        policy: as for :func:`resolve_policy`; None uses the bundle's policy and, without
            one, measures the exits only.
        split, limit, batch_size: images used.
        warmup, repeats: timing protocol.
        device: where to run (default: cuda if available).
        progress: ``progress(stage, done, total)``.

    Raises:
        DataError: no image. ConfigError: a policy fitted for another model.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.eval().to(dev)
    notes: List[str] = []
    rt = None
    try:
        rt = EarlyExitRuntime(model, policy)
    except ConfigError as e:
        if policy is not None:
            raise
        notes.append(f"{e.message}: exits measured, no policy speed-up")
    loader = _loader_of(data, split, batch_size, limit)
    batches: List[Tuple[torch.Tensor, Optional[torch.Tensor]]] = []
    n_img = 0
    for b in loader:
        x, y = _split_batch(b)
        if limit is not None and n_img + x.shape[0] > limit:
            x, y = x[: limit - n_img], (y[: limit - n_img] if y is not None else None)
        if x.shape[0] == 0:
            break
        batches.append((x.to(dev), y))
        n_img += int(x.shape[0])
        if limit is not None and n_img >= limit:
            break
    if not batches:
        raise DataError("no image to benchmark on", "check the dataset spec, split and --limit")
    orig, orig_note = original_model(model)
    notes.append(f"original: {orig_note}")
    x0 = batches[0][0]
    e = model.num_exits

    # ---- per-exit latency on the first batch
    states = [model.start(x0)]
    for i in range(e):
        states.append(model.run_stage(i, states[-1]))
    stage_s, head_s = [], []
    for i in range(e):
        stage_s.append(time_call(lambda i=i: model.run_stage(i, states[i]), dev, warmup, repeats))
        if i < e - 1:
            head_s.append(time_call(lambda i=i: model.exit_logits(i, states[i + 1]), dev, warmup, repeats))
        if progress is not None:
            progress("exits", i + 1, e)
    orig_s = time_call(lambda: orig(x0), dev, warmup, repeats)
    original = {
        "latency_ms": 1000 * orig_s,
        "flops": int(model.original_flops),
        "note": orig_note,
    }
    rows = []
    for i, name in enumerate(model.exit_names):
        to_exit = sum(stage_s[: i + 1]) + sum(head_s[: min(i + 1, e - 1)])
        flops = int(model.cost_to_exit(i))
        rows.append(
            {
                "index": i,
                "name": name,
                "flops": flops,
                "flops_fraction": flops / model.original_flops if model.original_flops else float("nan"),
                "stage_ms": 1000 * stage_s[i],
                "head_ms": 1000 * head_s[i] if i < e - 1 else 0.0,
                "latency_ms": 1000 * to_exit,
                "latency_fraction": to_exit / orig_s if orig_s else float("nan"),
            }
        )

    # ---- the policy over the dataset, against the original model
    pol = None
    if rt is not None:
        def run_policy() -> List[BatchPrediction]:
            outs = [rt.predict_batch(x) for x, _ in batches]
            _sync(dev)
            return outs

        def run_original() -> List[torch.Tensor]:
            outs = [_labels(_logits_of(orig(x))) for x, _ in batches]
            _sync(dev)
            return outs

        outs, finals = run_policy(), run_original()  # warm-up; these results are scored below
        tp, to = [], []
        for r in range(max(1, repeats)):
            for fn, acc in ((run_policy, tp), (run_original, to)):
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
            if progress is not None:
                progress("policy", r + 1, max(1, repeats))
        t_pol, t_orig = statistics.median(tp), statistics.median(to)
        idx = torch.cat([o.exit_index for o in outs])
        mean_flops = float(torch.cat([o.flops for o in outs]).double().mean())
        pol = {
            "name": str(getattr(rt.policy, "name", type(rt.policy).__name__)),
            "images": n_img,
            "ms_per_image": 1000 * t_pol / n_img,
            "original_ms_per_image": 1000 * t_orig / n_img,
            "measured_speedup": t_orig / t_pol if t_pol else float("nan"),
            "mean_flops": mean_flops,
            "flops_speedup": model.original_flops / mean_flops if mean_flops else float("nan"),
            "exit_rates": {n: float(c) / n_img for n, c in zip(model.exit_names, torch.bincount(idx, minlength=e).tolist())},
        }
        if all(y is not None for _, y in batches):
            from mexify.metrics import ConfusionMatrix

            cm_p, cm_f = ConfusionMatrix(model.num_classes), ConfusionMatrix(model.num_classes)
            for (_, y), o, f in zip(batches, outs, finals):
                cm_p.update(o.masks.cpu(), y)
                cm_f.update(f.cpu(), y)
            pol["miou"] = 100 * cm_p.miou()
            pol["final_miou"] = 100 * cm_f.miou()
            pol["drop"] = pol["final_miou"] - pol["miou"]
        for row in rows:
            row["exit_rate"] = pol["exit_rates"][row["name"]]
    if all(y is not None for _, y in batches):
        # each exit's own accuracy on the same images, so the table reads as one
        from mexify.metrics import ConfusionMatrix

        cms = [ConfusionMatrix(model.num_classes) for _ in range(e)]
        for x, y in batches:
            for cm, logits in zip(cms, model.forward_all(x)):
                cm.update(_labels(logits).cpu(), y)
        for row, cm in zip(rows, cms):
            row["miou"] = 100 * cm.miou()
    return BenchReport(
        device=str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        batch_size=int(x0.shape[0]),
        image_size=(int(x0.shape[-2]), int(x0.shape[-1])),
        input_size=tuple(int(v) for v in model.input_size),
        warmup=int(warmup),
        repeats=int(repeats),
        exits=rows,
        original=original,
        policy=pol,
        notes=notes,
    )
