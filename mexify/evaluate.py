"""Evaluate every exit of a multi-exit model on a dataset.

:func:`evaluate` runs ``model.forward_all`` in eval mode over a dataset (or a
DataLoader) and returns an :class:`EvalReport` with, per exit, mIoU, per-class
IoU, pixel accuracy and the FLOPs to reach it, plus the per-image mIoU of every
exit (used later, e.g. for oracle exits). Policy results are attached to the
report as :class:`PolicyResult` rows by the code that evaluates a policy.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from mexify.errors import DataError
from mexify.metrics import ConfusionMatrix, per_image_miou

log = logging.getLogger(__name__)

__all__ = ["ExitResult", "PolicyResult", "EvalReport", "evaluate"]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ExitResult:
    """Accuracy and cost of one exit.

    Attributes:
        index: exit position (0 = shallowest; the final exit is last).
        name: exit name (fx node name, or ``final``).
        miou: mean IoU over classes present in target or prediction.
        pixel_accuracy: fraction of labelled pixels predicted right.
        iou: per-class IoU (NaN where a class appears in neither).
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
        d = asdict(self)
        d["iou"] = [None if math.isnan(v) else v for v in self.iou]
        return d


@dataclass(frozen=True)
class PolicyResult:
    """Accuracy and cost of an early-exit policy (filled in by policy evaluation).

    Attributes:
        name: policy name.
        miou: mIoU of the maps the policy returns.
        pixel_accuracy: pixel accuracy of those maps.
        mean_flops: mean FLOPs per image.
        exit_rates: fraction of images leaving at each exit (len == number of exits).
        extra: anything else the policy reports (thresholds, latency, ...).
    """

    name: str
    miou: float
    pixel_accuracy: float
    mean_flops: float
    exit_rates: Tuple[float, ...]
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


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
        per_image_miou: float tensor ``(num_exits, num_images)``; NaN for images without labels.
        policies: policy rows, appended by policy evaluation (empty here).
        seconds: wall time of the evaluation.
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

    @property
    def final(self) -> ExitResult:
        """The final exit (the original model's output)."""
        return self.exits[-1]

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
        }
        if per_image:
            d["per_image_miou"] = [[None if math.isnan(v) else v for v in row] for row in self.per_image_miou.tolist()]
        return d


def _resolve_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_loader(data: Union[Dataset, DataLoader], batch_size: int, limit: Optional[int], num_workers: Optional[int]) -> DataLoader:
    if isinstance(data, DataLoader):
        if limit is not None:
            log.info("limit=%d with a DataLoader: stopping after the batch that reaches it", limit)
        return data
    from mexify.data import build_loader

    if limit is not None and limit < len(data):
        subset = Subset(data, range(int(limit)))
        for attr in ("num_classes", "class_names"):
            if hasattr(data, attr):
                setattr(subset, attr, getattr(data, attr))
        data = subset
    return build_loader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _dataset_of(data: Union[Dataset, DataLoader]) -> Any:
    return data.dataset if isinstance(data, DataLoader) else data


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
        model: a :class:`~mexify.model.MultiExitModel` (anything with ``forward_all``,
            ``exit_names``, ``num_classes``, ``cost_to_exit`` and ``original_flops``).
        dataset_or_loader: a dataset yielding ``(image, mask)`` or a DataLoader of such batches.
        device: where to run (default: cuda if available). The model is moved back afterwards
            and handed back in the train/eval mode it arrived in.
        progress: called as ``progress(images_done, images_total)`` after every batch.
        batch_size: batch size when a dataset is given.
        limit: evaluate only the first ``limit`` images.
        num_workers: loader workers when a dataset is given (default: one per core).

    Returns:
        An :class:`EvalReport`.

    Raises:
        DataError: the dataset's classes differ from the model's, or the dataset is empty.
    """
    t0 = time.perf_counter()
    dev = _resolve_device(device)
    ds = _dataset_of(dataset_or_loader)
    k = int(model.num_classes)
    ds_classes = getattr(ds, "num_classes", None)
    if ds_classes is not None and int(ds_classes) != k:
        raise DataError(
            f"the dataset has {ds_classes} classes but the model predicts {k}",
            "evaluate on the dataset the model was converted for (e.g. synthetic:scenes?classes=" + str(k) + ")",
        )
    loader = _as_loader(dataset_or_loader, batch_size, limit, num_workers)
    try:
        total = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        total = 0
    if limit is not None:
        total = min(total, int(limit)) if total else int(limit)
    if total == 0:
        raise DataError("the dataset to evaluate on is empty", "check the dataset spec and split")

    was_training = model.training
    params = list(model.parameters())
    home = params[0].device if params else dev
    model.eval()
    model.to(dev)
    names = list(model.exit_names)
    cms = [ConfusionMatrix(k, device=dev) for _ in names]
    per_image: List[List[torch.Tensor]] = [[] for _ in names]
    done = 0
    image_size: Optional[Tuple[int, int]] = None
    try:
        for images, masks in loader:
            if limit is not None and done >= limit:
                break
            if limit is not None and done + images.shape[0] > limit:
                keep = int(limit) - done
                images, masks = images[:keep], masks[:keep]
            images = images.to(dev, non_blocking=True)
            masks = masks.to(dev, non_blocking=True)
            if image_size is None:
                image_size = (int(images.shape[-2]), int(images.shape[-1]))
            outs = model.forward_all(images)
            if len(outs) != len(names):
                raise RuntimeError(f"forward_all returned {len(outs)} outputs for {len(names)} exits")
            for i, logits in enumerate(outs):
                if logits.shape[-2:] != masks.shape[-2:]:
                    logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
                pred = logits.argmax(1)
                cms[i].update(pred, masks)
                per_image[i].append(per_image_miou(pred, masks, k).cpu())
            done += int(images.shape[0])
            if progress is not None:
                progress(done, total)
    finally:
        model.to(home)
        model.train(was_training)

    original = int(model.original_flops)
    exits = []
    for i, name in enumerate(names):
        flops = int(model.cost_to_exit(i))
        exits.append(
            ExitResult(
                index=i,
                name=name,
                miou=cms[i].miou(),
                pixel_accuracy=cms[i].pixel_accuracy(),
                iou=tuple(float(v) for v in cms[i].iou().cpu().tolist()),
                flops=flops,
                flops_fraction=flops / original if original else float("nan"),
            )
        )
    pim = torch.stack([torch.cat(rows) if rows else torch.zeros(0) for rows in per_image]) if names else torch.zeros(0, 0)
    report = EvalReport(
        exits=exits,
        num_images=done,
        num_classes=k,
        class_names=list(getattr(ds, "class_names", [str(c) for c in range(k)])),
        original_flops=original,
        input_size=tuple(int(v) for v in getattr(model, "input_size", (0, 0))),
        image_size=image_size,
        per_image_miou=pim,
        seconds=time.perf_counter() - t0,
    )
    log.info(
        "evaluated %d images in %.1fs: final mIoU %.4f, shallowest exit %.4f",
        done, report.seconds, exits[-1].miou, exits[0].miou,
    )
    return report
