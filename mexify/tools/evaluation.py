"""Accuracy against labels: every exit of a multi-exit model, and a policy through the runtime.

:func:`evaluate` runs ``model.forward_all`` in eval mode over a dataset (or a DataLoader)
and returns an :class:`EvalReport` with, per exit, mIoU, per-class IoU, pixel accuracy and
the FLOPs to reach it, plus the per-image mIoU of every exit. :func:`evaluate_policy` runs
the early-exit runtime and returns a :class:`PolicyResult` row for the report.

:func:`budget_verdict` says whether the budget a policy was calibrated for held on a set of
images (a :class:`BudgetObservation`): ``mexify eval`` (:func:`policy_budget_check`) and
``mexify bench`` both judge with it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

from mexify.config import ACCURACY_BUDGETS, BUDGET_KINDS, json_safe, within_budget
from mexify.data import as_loader, check_classes, unpadded
from mexify.errors import DataError
from mexify.graph.modes import training_mode
from mexify.metrics import ConfusionMatrix, per_image_miou
from mexify.nn import device_name, module_device, resolve_device
from mexify.runtime import EarlyExitRuntime, active_exits, masks_of, resize_masks, select_profile

log = logging.getLogger(__name__)

__all__ = ["ExitResult", "PolicyResult", "PredictedLatency", "EvalReport", "evaluate", "evaluate_policy", "BudgetObservation",
           "BudgetVerdict", "budget_verdict", "policy_budget_check"]

Progress = Callable[[str, int, int], None]  # progress(stage, done, total): every library progress callback


@dataclass(frozen=True)
class ExitResult:
    """Accuracy and cost of one exit.

    Attributes:
        index: exit position (0 = shallowest; the final exit is last).
        name: exit name (fx node name, or ``final``).
        miou: mean IoU over classes present in target or prediction, in points (0-100; NaN without a
            labelled pixel; :func:`mexify.metrics.miou_from_counts`).
        pixel_accuracy: labelled pixels predicted right, in points.
        iou: per-class IoU in points (NaN where a class appears in neither).
        flops: FLOPs to reach this exit at the model's profiling input size (1 multiply-add = 1 FLOP),
            including every early head evaluated on the way.
        flops_fraction: ``flops / original_flops``.
    """

    index: int
    name: str
    miou: float
    pixel_accuracy: float
    iou: Tuple[float, ...]
    flops: int
    flops_fraction: float

    def to_dict(self) -> Dict[str, Any]:
        return json_safe(asdict(self))  # NaN (a class absent, no labelled pixel) as None


FLOPS_CONVENTION = "1 multiply-add = 1 FLOP, at the bundle's input size"


@dataclass(frozen=True)
class PredictedLatency:
    """What a bundle's latency profile predicts for a policy's exit mix.

    Attributes:
        profile: the key of the latency profile the prediction comes from.
        mean_ms: predicted milliseconds per image for this exit mix.
        original_ms: the original model's milliseconds per image from the same pieces.
    """

    profile: str
    mean_ms: float
    original_ms: float

    batch_size: int = 1

    @property
    def speedup(self) -> float:
        return self.original_ms / self.mean_ms if self.mean_ms else float("nan")

    @property
    def images_per_s(self) -> float:
        """Images per second at this cost: a throughput, when the profile's batches are full (``batch_size``)."""
        return 1000.0 / self.mean_ms if self.mean_ms else float("nan")

    @property
    def original_images_per_s(self) -> float:
        return 1000.0 / self.original_ms if self.original_ms else float("nan")


@dataclass(frozen=True)
class PolicyResult:
    """Accuracy and cost of an early-exit policy (filled in by policy evaluation).

    Attributes:
        name: policy name.
        miou: mIoU of the maps the policy returns, in points (0-100).
        pixel_accuracy: pixel accuracy of those maps, in points.
        mean_flops: mean FLOPs per image (1 multiply-add = 1 FLOP, at the bundle's input size).
        exit_rates: fraction of images leaving at each exit (len == number of exits).
        flops_speedup: the original model's FLOPs over ``mean_flops``.
        cost_fraction: ``mean_flops`` over the original model's FLOPs.
        mean_confidence: the policy's mean confidence at the exit each image took.
        num_images: images evaluated.
        seconds: wall time of the evaluation.
        thresholds: the policy's threshold per early exit by name (None: never leaves there), when it has thresholds.
        latency: the bundle's latency profile's prediction for this exit mix, when the bundle has one.
        throughput: the same from the profile of the largest batch size on this device (when above 1): what the
            stage scheduler (``mexify serve``) spends per image with every stage's batches full, so its
            ``images_per_s`` is the service's predicted capacity beside the original's at that batch size.
        disagreement: share (0-1) of the pixels whose class differs from the final exit's mask on the same
            image, labelled or not (NaN: not counted; ``evaluate_policy(..., against_final=True)`` counts it).
        agreement_miou: mIoU in points of the policy's masks scored against the final exit's masks (100:
            the same masks; NaN: not counted).
    """

    name: str
    miou: float
    pixel_accuracy: float
    mean_flops: float
    exit_rates: Tuple[float, ...]
    flops_speedup: float = float("nan")
    cost_fraction: float = float("nan")
    mean_confidence: float = float("nan")
    num_images: int = 0
    seconds: float = 0.0
    thresholds: Optional[Dict[str, Optional[float]]] = None
    latency: Optional[PredictedLatency] = None
    throughput: Optional[PredictedLatency] = None
    disagreement: float = float("nan")
    agreement_miou: float = float("nan")

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form (``mexify eval --json``): the figures, and the rest under ``extra``."""
        extra: Dict[str, Any] = {"speedup_flops": self.flops_speedup, "cost_fraction": self.cost_fraction,
                                 "mean_confidence": self.mean_confidence, "num_images": self.num_images,
                                 "seconds": self.seconds, "flops_convention": FLOPS_CONVENTION,
                                 "disagreement": self.disagreement, "agreement_miou": self.agreement_miou}
        if self.thresholds is not None:
            extra["thresholds"] = dict(self.thresholds)
        if self.latency is not None:
            extra.update(latency_profile=self.latency.profile, mean_ms_predicted=self.latency.mean_ms,
                         original_ms_predicted=self.latency.original_ms, predicted_speedup=self.latency.speedup)
        if self.throughput is not None:
            extra["throughput_predicted"] = {"profile": self.throughput.profile, "batch_size": self.throughput.batch_size,
                                             "images_per_s": self.throughput.images_per_s,
                                             "original_images_per_s": self.throughput.original_images_per_s}
        return json_safe({"name": self.name, "miou": self.miou, "pixel_accuracy": self.pixel_accuracy,
                          "mean_flops": self.mean_flops, "exit_rates": self.exit_rates, "extra": extra})


@dataclass(frozen=True)
class BudgetObservation:
    """What a set of images showed, for :func:`budget_verdict`: every figure a budget may be about (NaN: not known).

    Attributes:
        images: images the figures are over.
        split: the split they came from (None: not named).
        drop: mIoU points the policy lost against ``reference`` on these images: against the labels when
            ``labelled``, else ``100 -`` the mIoU of the policy's masks scored against the reference's.
        labelled: whether ``drop`` was measured against labels.
        disagreement: share (0-1) of pixels whose class differs from the reference's mask, labelled or not.
        flops_speedup: the original model's FLOPs over the mean FLOPs per image.
        flops_fraction: the mean FLOPs per image over the original model's.
        speedup, cost_fraction: the same two in time (``timing`` says whose).
        ms_per_image: mean milliseconds per image.
        timing: where the time figures come from (``"predicted by the profile cpu|b1"``, ``"measured"``).
        reference: what ``drop`` and ``disagreement`` are against (``"final exit"``, ``"original model"``).
    """

    images: int
    split: Optional[str] = None
    drop: float = float("nan")
    labelled: bool = True
    disagreement: float = float("nan")
    flops_speedup: float = float("nan")
    flops_fraction: float = float("nan")
    speedup: float = float("nan")
    cost_fraction: float = float("nan")
    ms_per_image: float = float("nan")
    timing: str = ""
    reference: str = "final exit"


@dataclass(frozen=True)
class BudgetVerdict:
    """Whether the budget a policy was calibrated for held on a set of images (:func:`budget_verdict`).

    Attributes:
        held: the observed figure is within the budget.
        kind: ``max_drop`` (mIoU points), ``max_disagree`` (share of pixels, 0-1), ``speedup`` (x),
            ``cost_fraction`` (share of the original's cost, 0-1) or ``latency_ms`` (ms per image).
        value: the budget's bound, in the kind's unit.
        observed: the figure on these images, in the same unit.
        split: the split the images came from (None: not named).
        images: how many images.
        text: how the budget reads (``"max-drop 1.0"``, ``"2x"``).
        reading: the observed figure in words (``"drop 0.62 points"``, ``"1.83x measured"``).
        confidence: the probability the budget was calibrated to hold with on a new set of images
            (None: a point fit on the calibration images).
        bound: calibration's bound on the figure at that confidence, in the kind's unit (None: not recorded).
        calibrated: the figure calibration reached on its own images, in the kind's unit (None: not recorded).
    """

    held: bool
    kind: str
    value: float
    observed: float
    split: Optional[str]
    images: int
    text: str
    reading: str
    confidence: Optional[float] = None
    bound: Optional[float] = None
    calibrated: Optional[float] = None

    @property
    def accuracy(self) -> bool:
        """Whether the budget is about the masks (a drop or a disagreement), not about cost."""
        return self.kind in ACCURACY_BUDGETS

    def status(self, reading: bool = True) -> str:
        """``budget max-drop 1.0 held`` (or ``BROKEN``), with the observed figure in brackets when ``reading``."""
        return f"budget {self.text} {'held' if self.held else 'BROKEN'}" + (f" ({self.reading})" if reading else "")

    @property
    def note(self) -> str:
        """What a broken budget means for a budget fitted with (or without) a confidence; empty when it held."""
        if self.held:
            return ""
        if self.confidence:
            pct, every = f"{100 * self.confidence:g}%", max(2, round(1.0 / (1.0 - self.confidence)))
            return (f"(a budget at {pct} confidence is expected to break on about 1 split in {every} like this one; "
                    "more often means the images differ from the calibration images)")
        return "(fitted without a confidence, it holds on the calibration images; new images break it about half the time)"

    def line(self) -> str:
        """The verdict in one line, e.g. ``budget max-drop 1.0 held on val (400 images): drop 0.62 points
        (calibrated bound at 90% confidence: 0.95)``."""
        where = f"on {self.split} ({self.images} images)" if self.split else f"on these {self.images} images"
        extra = ""
        if self.bound is not None and self.confidence:
            extra = f" (calibrated bound at {100 * self.confidence:g}% confidence: {_in_unit(self.kind, self.bound)})"
        elif self.calibrated is not None:
            extra = f" ({_in_unit(self.kind, self.calibrated)} on the calibration images)"
        note = f" {self.note}" if self.note else ""
        return f"budget {self.text} {'held' if self.held else 'BROKEN'} {where}: {self.reading}{extra}{note}"

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form (``budget_check``): the fields and the ``line``."""
        return json_safe({**asdict(self), "line": self.line()})


def _in_unit(kind: str, v: float) -> str:
    """A figure of a budget's kind as it reads: points, a percentage, a speed-up or milliseconds."""
    if kind in ("max_disagree", "cost_fraction"):
        return f"{100 * v:.2f}%"
    if kind == "speedup":
        return f"{v:.2f}x"
    return f"{v:.2f} ms" if kind == "latency_ms" else f"{v:.2f}"


def _finite(v: Any) -> Optional[float]:
    """``v`` as a float when it is a finite number, else None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _observed(kind: str, obs: BudgetObservation, cost: Optional[str]) -> Tuple[Optional[float], str]:
    """The figure a budget of ``kind`` is about and how it reads; the time figures for a cost budget calibrated
    on measured latency (``cost``, from the calibration's figures), else the FLOPs ones."""
    if kind == "max_drop":
        if obs.labelled:
            return _finite(obs.drop), f"drop {obs.drop:.2f} points"
        return _finite(obs.drop), f"agreement-mIoU drop {obs.drop:.2f} points against the {obs.reference} (no labels)"
    if kind == "max_disagree":
        return _finite(obs.disagreement), f"{100 * obs.disagreement:.2f}% of pixels differ from the {obs.reference}"
    if kind == "latency_ms":
        return _finite(obs.ms_per_image), f"{obs.ms_per_image:.2f} ms/image {obs.timing}".rstrip()
    timed = cost != "flops" and _finite(obs.speedup) is not None
    if kind == "speedup":
        v, how = (obs.speedup, obs.timing) if timed else (obs.flops_speedup, "by FLOPs")
        return _finite(v), f"{v:.2f}x {how}".rstrip()
    v, how = (obs.cost_fraction, obs.timing) if timed else (obs.flops_fraction, "by FLOPs")
    return _finite(v), f"cost {100 * v:.1f}% of the original {how}".rstrip()


def _calibrated(kind: str, figures: Mapping[str, Any]) -> Tuple[Optional[float], Optional[float]]:
    """From a fitted policy's ``figures``: its bound on new images (recorded with a confidence) and its figure on
    the calibration images, both in the budget's unit (None where not recorded)."""
    if kind == "max_drop":
        return _finite(figures.get("drop_bound")), _finite(figures.get("drop"))
    if kind == "max_disagree":
        return _finite(figures.get("disagreement_bound")), _finite(figures.get("disagreement"))
    if kind == "speedup":
        return _finite(figures.get("speedup_bound")), _finite(figures.get("speedup"))
    up, mean, share = (_finite(figures.get(k)) for k in ("cost_bound", "mean_cost", "cost_fraction"))
    if kind == "cost_fraction":
        return (up * share / mean if None not in (up, mean, share) and mean else None), share
    timed = figures.get("cost") == "latency"
    return (up if timed else None), _finite(figures.get("mean_ms"))


def budget_verdict(budget: Optional[Mapping[str, Any]], observed: BudgetObservation,
                   figures: Optional[Mapping[str, Any]] = None) -> Optional[BudgetVerdict]:
    """Whether a calibrated budget held on the images of ``observed``: the one rule ``eval`` and ``bench`` judge by.

    ``max_drop``: the observed drop (points) is at most the budget; ``max_disagree``: the share of pixels that
    differ; ``speedup``: the speed-up is at least the budget; ``cost_fraction`` and ``latency_ms``: the cost
    share or the ms per image is at most it. A cost budget is judged in time (``observed.timing``) when the
    calibration costed exits by measured latency (``figures["cost"]``) and the time figures are known, else
    in FLOPs.

    Args:
        budget: a fitted policy's ``budget`` record: ``kind``, ``value``, ``text``, optional ``confidence`` (the
            probability the budget was calibrated to hold with on a new set of images; absent or 0: a point fit).
        observed: the figures on the images judged.
        figures: the fitted policy's ``figures`` (the cost model, the calibration's own figures and, with a
            confidence, its bounds: ``drop_bound``, ``disagreement_bound``, ``speedup_bound``, ``cost_bound``).

    Returns:
        the :class:`BudgetVerdict`; None without a budget, for a kind this version does not know, or when
        the figure the budget is about was not observed.
    """
    if not isinstance(budget, Mapping) or budget.get("kind") not in BUDGET_KINDS:
        return None
    kind, value, figures = str(budget["kind"]), _finite(budget.get("value")), figures or {}
    seen, reading = _observed(kind, observed, figures.get("cost"))
    if value is None or seen is None:
        return None
    held = within_budget(kind, value, seen)
    confidence = _finite(budget.get("confidence")) or None
    bound, calibrated = _calibrated(kind, figures)
    return BudgetVerdict(held=held, kind=kind, value=value, observed=seen, split=observed.split, images=int(observed.images),
                         text=str(budget.get("text") or f"{kind} {value:g}"), reading=reading, confidence=confidence,
                         bound=bound, calibrated=calibrated)


@dataclass
class EvalReport:
    """Result of :func:`evaluate`.

    Attributes:
        exits: one :class:`ExitResult` per exit, final last.
        num_images: images evaluated.
        num_classes: classes of the model and dataset.
        class_names: class names from the dataset.
        original_flops: FLOPs of the unmodified model at ``input_size``.
        input_size: (H, W) at which the FLOPs were profiled.
        image_size: (H, W) of the evaluated images (of the first batch).
        per_image_miou: float tensor ``(num_exits, num_images)`` in points; NaN for images without labels.
        policies: policy rows, appended by policy evaluation (empty here).
        seconds: wall time of the evaluation.
        data: the dataset's spec, when it was given as one.
        notes: what the reader should know (unlabelled images, a policy judged on its calibration images).
        labelled_pixels: labelled pixels counted (0: the images carry no labels, and every mIoU is NaN).
        budget_check: whether the budget the bundle's policy was calibrated for held on these images
            (:func:`policy_budget_check`; None without a calibrated budget).
    """

    exits: List[ExitResult]
    num_images: int
    num_classes: int
    class_names: List[str]
    original_flops: int
    input_size: Tuple[int, int]
    image_size: Optional[Tuple[int, int]]
    per_image_miou: torch.Tensor
    policies: List[PolicyResult] = field(default_factory=list)
    seconds: float = 0.0
    data: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    labelled_pixels: int = 0
    budget_check: Optional[BudgetVerdict] = None

    @property
    def final(self) -> ExitResult:
        """The final exit (the original model's output)."""
        return self.exits[-1]

    def check_budget(self, policy: Optional[Mapping[str, Any]], split: Optional[str] = None) -> Optional[BudgetVerdict]:
        """Judge the budget a fitted policy records (its plain form, ``config.yaml``'s ``policy:``) on these
        images, with the last row of ``policies`` as its run (:func:`policy_budget_check`); the verdict is
        kept in ``budget_check`` and returned (None without a policy row or a budget)."""
        self.budget_check = policy_budget_check(policy, self, self.policies[-1], split) if self.policies else None
        return self.budget_check

    def to_dict(self, per_image: bool = False) -> Dict[str, Any]:
        """A JSON-ready dict (per-image mIoU only when ``per_image``)."""
        d: Dict[str, Any] = {
            "num_images": self.num_images,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "flops_convention": "1 multiply-add = 1 FLOP",
            "flops_input_size": list(self.input_size),
            "image_size": list(self.image_size) if self.image_size else None,
            "original_flops": self.original_flops,
            "exits": [e.to_dict() for e in self.exits],
            "policies": [p.to_dict() for p in self.policies],
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
            "labelled_pixels": self.labelled_pixels,
            "budget_check": self.budget_check.to_dict() if self.budget_check is not None else None,
        }
        if per_image:
            d["per_image_miou"] = [[None if math.isnan(v) else v for v in row] for row in self.per_image_miou.tolist()]
        return d


def _dataset_of(data: Union[Dataset, DataLoader]) -> Any:
    return data.dataset if isinstance(data, DataLoader) else data



def _total(loader: Any, limit: Optional[int]) -> int:
    """Images the loader will give (``limit`` applied); 0 when unknown."""
    try:
        total = len(loader.dataset)  # type: ignore[union-attr]
    except (AttributeError, TypeError):
        total = 0
    if limit is not None:
        total = min(total, int(limit)) if total else int(limit)
    return total


def _limited(loader: Iterable[Any], limit: Optional[int]) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(images, masks)`` batches, cut to the first ``limit`` images."""
    done = 0
    for x, y in unpadded(loader):
        if limit is not None and done >= limit:
            return
        if limit is not None and done + x.shape[0] > limit:
            x, y = x[: limit - done], (y[: limit - done] if y is not None else None)
        if x.shape[0] == 0:
            return
        done += int(x.shape[0])
        yield x, y


@torch.no_grad()
def evaluate(
    model: Any,
    dataset_or_loader: Union[Dataset, DataLoader],
    device: Optional[Union[str, torch.device]] = None,
    progress: Optional[Progress] = None,
    batch_size: int = 8,
    limit: Optional[int] = None,
    num_workers: Optional[int] = None,
) -> EvalReport:
    """Run every exit of ``model`` over a dataset and measure each.

    Args:
        model: a :class:`~mexify.nn.MultiExitModel` (anything with ``forward_all``,
            ``exit_names``, ``num_classes``, ``cost_to_exit`` and ``original_flops``).
        dataset_or_loader: a dataset yielding ``(image, mask)`` or a DataLoader of such batches.
        device: where to run (default: cuda if available). The model is moved back afterwards
            and handed back in the train/eval mode it arrived in.
        progress: called as ``progress("eval", images_done, images_total)`` after every batch.
        batch_size: batch size when a dataset is given.
        limit: evaluate only the first ``limit`` images.
        num_workers: loader workers when a dataset is given (default: one per core).

    Returns:
        An :class:`EvalReport`.

    Raises:
        DataError: the dataset's classes differ from the model's, or the dataset is empty.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    ds = _dataset_of(dataset_or_loader)
    k = int(model.num_classes)
    check_classes(ds, k)
    if isinstance(dataset_or_loader, DataLoader) and limit is not None:
        log.info("limit=%d with a DataLoader: stopping after the batch that reaches it", limit)
    loader = as_loader(dataset_or_loader, batch_size, limit, num_workers)
    total = _total(loader, limit)
    if total == 0:
        raise DataError("the dataset to evaluate on is empty", "check the dataset spec and split")
    with training_mode(model, False), _placed(model, dev):  # handed back in its mode, where it was
        cms, per_image, done, image_size = _run_exits(model, loader, limit, dev, total, progress)
    report = _report(model, ds, cms, per_image, done, image_size, time.perf_counter() - t0)
    if report.labelled_pixels == 0:
        report.notes.append("these images carry no labels: every mIoU and pixel accuracy is undefined (nan); "
                            "the policy's row says how far its masks are from the final exit's")
    log.info("evaluated %d images in %.1fs: final mIoU %.2f, shallowest exit %.2f",
             done, report.seconds, report.exits[-1].miou, report.exits[0].miou)
    return report


def _run_exits(model: Any, loader: Any, limit: Optional[int], dev: torch.device, total: int, progress: Optional[Progress]):
    """Confusion matrices and per-image mIoU of every exit over the loader."""
    names, k = list(model.exit_names), int(model.num_classes)
    cms = [ConfusionMatrix(k, device=dev) for _ in names]
    per_image: List[List[torch.Tensor]] = [[] for _ in names]
    done, image_size = 0, None
    for images, masks in _limited(loader, limit):
        images = images.to(dev, non_blocking=True)
        masks = masks.to(dev, non_blocking=True)
        if image_size is None:
            image_size = (int(images.shape[-2]), int(images.shape[-1]))
        outs = model.forward_all(images)
        if len(outs) != len(names):
            raise RuntimeError(f"forward_all returned {len(outs)} outputs for {len(names)} exits")
        for i, logits in enumerate(outs):
            # the mask the runtime gives (at the input size), then at the labels' size
            pred = resize_masks(masks_of(logits, tuple(images.shape[-2:])), masks.shape[-2:])
            cms[i].update(pred, masks)
            per_image[i].append(per_image_miou(pred, masks, k).cpu())
        done += int(images.shape[0])
        if progress is not None:
            progress("eval", done, total)
    return cms, per_image, done, image_size


def _report(model: Any, ds: Any, cms: List[ConfusionMatrix], per_image: List[List[torch.Tensor]], done: int,
            image_size: Optional[Tuple[int, int]], seconds: float) -> EvalReport:
    names, k = list(model.exit_names), int(model.num_classes)
    original = int(model.original_flops)
    exits = []
    for i, name in enumerate(names):
        flops = int(model.cost_to_exit(i))
        exits.append(ExitResult(
            index=i, name=name, miou=cms[i].miou(), pixel_accuracy=cms[i].pixel_accuracy(),
            iou=tuple(float(v) for v in cms[i].iou().cpu().tolist()), flops=flops,
            flops_fraction=flops / original if original else float("nan"),
        ))
    pim = torch.stack([torch.cat(rows) if rows else torch.zeros(0) for rows in per_image]) if names else torch.zeros(0, 0)
    return EvalReport(
        exits=exits,
        num_images=done,
        num_classes=k,
        class_names=list(getattr(ds, "class_names", [str(c) for c in range(k)])),
        original_flops=original,
        input_size=tuple(int(v) for v in getattr(model, "input_size", (0, 0))),
        image_size=image_size,
        per_image_miou=pim,
        seconds=seconds,
        labelled_pixels=cms[-1].total if cms else 0,
    )


@torch.no_grad()
def evaluate_policy(
    model: Any,
    policy: Any,
    data: Any,
    batch_size: int = 8,
    limit: Optional[int] = None,
    device: Any = None,
    progress: Optional[Progress] = None,
    against_final: bool = False,
) -> PolicyResult:
    """mIoU, mean FLOPs and exit rates of a policy on a dataset, through the runtime.

    Args:
        model: a :class:`~mexify.nn.MultiExitModel`.
        policy: as for :func:`~mexify.runtime.resolve_policy` (None: the bundle's policy).
        data: a Dataset or DataLoader of ``(image, mask)`` batches.
        batch_size, limit: batching of a Dataset; only the first ``limit`` images.
        device: where to run (default: where the model is); the model is moved back afterwards.
        progress: ``progress("policy", images_done, images_total_or_0)``.
        against_final: also compare the policy's masks with the final exit's on the same images
            (``disagreement``, ``agreement_miou``): the final exit runs again for the images that left early.

    Returns:
        a :class:`PolicyResult` (``miou`` and ``pixel_accuracy`` in points like the exit rows;
        ``extra`` holds the FLOPs speed-up, mean confidence, thresholds and time).

    Raises:
        DataError: no image.
    """
    loader = as_loader(data, batch_size, limit)
    total = _total(loader, limit)
    counts = torch.zeros(model.num_exits, dtype=torch.long)
    flops, conf_sum, done = 0, 0.0, 0
    t0 = time.perf_counter()
    with _placed(model, device):  # handed back where it was
        rt = EarlyExitRuntime(model, policy)
        dev = module_device(model)
        cm = ConfusionMatrix(int(model.num_classes), device=dev)
        final = _FinalAgreement(model, dev) if against_final else None
        for x, y in _limited(loader, limit):
            out = rt.predict_batch(x)
            if final is not None:
                final.add(x, out)
            if y is not None:
                cm.update(resize_masks(out.masks, y.shape[-2:]), y.to(dev))
            counts += torch.bincount(out.exit_index, minlength=model.num_exits)
            flops += int(out.flops.sum())
            conf_sum += float(torch.nan_to_num(out.confidence).sum())
            done += int(x.shape[0])
            if progress is not None:
                progress("policy", done, total)
        if done == 0:
            raise DataError("no image to evaluate the policy on", "check the dataset spec, split and --limit")
        row = _policy_row(model, rt.policy, cm, counts, flops / done, conf_sum / done, done, time.perf_counter() - t0)
        return final.result(row) if final is not None else row


class _FinalAgreement:
    """A policy's masks against the final exit's on the same images: the pixels that differ and the agreement mIoU.

    Where the runtime took the final exit its mask is the final exit's; the images that left early run the
    model to its final exit (eval mode, no grad) and their masks are made as the runtime makes them.
    """

    def __init__(self, model: Any, device: torch.device):
        self.model = model
        self.cm = ConfusionMatrix(int(model.num_classes), device=device)
        self.differ, self.pixels = 0, 0

    def add(self, x: torch.Tensor, out: Any) -> None:
        """One batch: its images and the runtime's :class:`~mexify.runtime.BatchPrediction` for them."""
        final = out.masks.clone()
        early = torch.nonzero(out.exit_index != self.model.num_exits - 1).flatten().to(final.device)
        if early.numel():
            with training_mode(self.model, False):
                logits = self.model(x.to(final.device)[early])
            final[early] = masks_of(logits, tuple(x.shape[-2:])).to(final.dtype)
        self.differ += int((out.masks != final).sum())
        self.pixels += int(final.numel())
        self.cm.update(out.masks, final)

    def result(self, row: PolicyResult) -> PolicyResult:
        """``row`` with ``disagreement`` and ``agreement_miou`` filled in."""
        share = self.differ / self.pixels if self.pixels else float("nan")
        return replace(row, disagreement=share, agreement_miou=self.cm.miou())


@contextlib.contextmanager
def _placed(model: Any, device: Any) -> Iterator[None]:
    """``model`` on ``device`` (None: where it is) for the block, then back where it was."""
    home = module_device(model)
    if device is not None:
        model.to(device)
    try:
        yield
    finally:
        if device is not None:
            model.to(home)


def _predicted_latency(model: Any, policy: Any, counts: torch.Tensor, done: int,
                       full_batches: bool = False) -> Optional[PredictedLatency]:
    """Mean ms per image the bundle's latency profile predicts for this exit mix (the profile the
    policy was calibrated on, else the one for this device); None without a profile. ``full_batches``:
    from the device's largest-batch profile instead (None unless its batch is above 1)."""
    cfg = getattr(model, "config", None)
    table = getattr(cfg, "latency", None)
    if not table:
        return None
    want = (getattr(policy, "figures", None) or {}).get("latency_profile")
    if full_batches:
        prof = select_profile(table, None, device_name(module_device(model)), largest_batch=True)
        if prof.batch_size <= 1:
            return None
    else:
        prof = select_profile(table, want if want in table else None, device_name(module_device(model)))
    ms = prof.exit_ms(active_exits(policy, model.num_exits))
    mean = sum(c * m for c, m in zip(counts.tolist(), ms)) / max(done, 1)
    return PredictedLatency(prof.key, mean, prof.original_ms_per_image(), int(prof.batch_size))


def _policy_row(model: Any, policy: Any, cm: ConfusionMatrix, counts: torch.Tensor, mean_flops: float,
                mean_conf: float, done: int, seconds: float) -> PolicyResult:
    original = float(model.original_flops)
    th = getattr(policy, "thresholds", None)
    return PolicyResult(
        name=str(getattr(policy, "name", type(policy).__name__)),
        miou=cm.miou(),
        pixel_accuracy=cm.pixel_accuracy(),
        mean_flops=mean_flops,
        exit_rates=tuple(float(c) / done for c in counts.tolist()),
        flops_speedup=original / mean_flops if mean_flops else float("nan"),
        cost_fraction=mean_flops / original if original else float("nan"),
        mean_confidence=mean_conf,
        num_images=done,
        seconds=seconds,
        thresholds={n: (None if math.isinf(t) else float(t)) for n, t in zip(model.exit_names, th)}
        if isinstance(th, (list, tuple)) else None,
        latency=_predicted_latency(model, policy, counts, done),
        throughput=_predicted_latency(model, policy, counts, done, full_batches=True),
    )


def policy_budget_check(policy: Optional[Mapping[str, Any]], report: EvalReport, row: PolicyResult,
                        split: Optional[str] = None) -> Optional[BudgetVerdict]:
    """Whether the budget a fitted policy records held on the images of an evaluation (:func:`budget_verdict`).

    The drop is the final exit's mIoU (``report``) minus the policy's (``row``), both on these images; without
    labels, ``100 -`` the policy's agreement mIoU with the final exit (``row`` counted with ``against_final``).
    A cost budget is judged on what the evaluation reports: the exit mix's cost predicted by the bundle's
    latency profile (``row.latency``) when the policy was calibrated on it, else its FLOPs.

    Args:
        policy: the fitted policy's plain form (``config.yaml``'s ``policy:``: ``budget``, ``figures``).
        report: the evaluation of every exit on the images.
        row: the policy's row on the same images.
        split: the split's name, for the verdict's line.

    Returns:
        the verdict; None without a budget record (or with one this version cannot judge).
    """
    if not isinstance(policy, Mapping):
        return None
    labelled = report.labelled_pixels > 0
    lat = row.latency
    observed = BudgetObservation(
        images=row.num_images,
        split=split,
        drop=report.final.miou - row.miou if labelled else 100.0 - row.agreement_miou,
        labelled=labelled,
        disagreement=row.disagreement,
        flops_speedup=row.flops_speedup,
        flops_fraction=row.cost_fraction,
        speedup=lat.speedup if lat is not None else float("nan"),
        cost_fraction=lat.mean_ms / lat.original_ms if lat is not None and lat.original_ms else float("nan"),
        ms_per_image=lat.mean_ms if lat is not None else float("nan"),
        timing=f"predicted by the profile {lat.profile}" if lat is not None else "",
    )
    figures = policy.get("figures")
    return budget_verdict(policy.get("budget"), observed, figures if isinstance(figures, Mapping) else None)
