"""The exit cache: what one pass over a calibration split keeps, per image and exit.

The cache holds, per image and exit, what every policy's score and the mIoU of any
exit assignment need, compactly:

Scores are taken where the runtime takes them, on each exit's own output map (feature
resolution for the early heads), so the first group below is counted there; masks are compared
with the labels at the labels' resolution, after the same resize the runtime applies.

* ``class_hist`` ``(N, E, K, B)`` int32: pixels by predicted class and top-1 probability
  bin (``mexify.policies.PROB_EDGES``); ``edge_hist`` ``(N, E, B)``: the same for pixels
  on a predicted class boundary (mess); ``num_pixels`` ``(N, E)``: pixels of each map.
* ``mean_maxprob``, ``mean_entropy`` ``(N, E)`` float64 (maxprob, entropy, class-means);
  ``fft_energy`` ``(N, E, len(fft.BANDS))`` float64: mean FFT magnitude of the top-1 map per band (fft).
* ``tp``, ``pred_count`` ``(N, E, K)`` and ``label_count`` ``(N, K)`` int64: per-image
  true positives, predictions on labelled pixels and labels per class. Summing them over
  any exit assignment gives the dataset confusion-matrix diagonal, column and row sums,
  hence its mIoU exactly (no second pass). ``agree_*``: the same against the final
  exit's predictions (used when there are no labels).
* ``class_prob_sum`` ``(E, K, K)``: summed probability vectors per labelled class (cbt), labels
  resized to each map by nearest neighbour.
* ``thumb_bins``, ``thumb_pred`` ``(N, E, h, w)`` uint8/int16 downsampled maps (cbt's
  theoretical pixel-level FLOPs).

For 1,000 images, 7 exits and 19 classes that is about 140 MB whatever the resolution (measured
in ``tests/test_calibrate.py``), 60 MB of it without the thumbnails (``thumb=0``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from mexify.calibrate.search import SearchResult, halves, search_thresholds
from mexify.config import IGNORE_INDEX
from mexify.data import unpadded
from mexify.errors import DataError
from mexify.files import atomic_file
from mexify.graph.modes import training_mode
from mexify.metrics import miou_from_counts
from mexify.nn import exit_flops
from mexify.runtime import LatencyProfile, masks_of, resize_masks
from mexify.policies import Policy, boundary_mask, prob_bins
from mexify.policies.base import NUM_BINS
from mexify.policies.entropy import mean_entropy
from mexify.policies.fft import band_energy
from mexify.policies.maxprob import MaxProbPolicy

log = logging.getLogger(__name__)

__all__ = ["ExitCache", "ExitSource", "collect_cache"]

Progress = Optional[Callable[[str, int, int], None]]


@dataclasses.dataclass
class ExitCache:
    """Per-image, per-exit statistics of one calibration pass (see the module docstring)."""

    exit_names: List[str]
    num_classes: int
    costs: np.ndarray  # (E,) FLOPs to exit at each exit
    original_flops: float
    class_hist: np.ndarray
    edge_hist: np.ndarray
    num_pixels: np.ndarray
    mean_maxprob: np.ndarray
    mean_entropy: np.ndarray
    tp: np.ndarray
    pred_count: np.ndarray
    label_count: np.ndarray
    agree_tp: np.ndarray
    agree_pred_count: np.ndarray
    agree_label_count: np.ndarray
    label_prob_sum: np.ndarray  # (E, K, K) by true label
    agree_prob_sum: np.ndarray  # (E, K, K) by the final exit's prediction
    thumb_bins: Optional[np.ndarray] = None
    thumb_pred: Optional[np.ndarray] = None
    edge_radius: int = 1
    temperatures: Optional[List[float]] = None
    source: str = "softmax"
    stage_flops: Optional[List[float]] = None
    head_flops: Optional[List[float]] = None
    #: the measured latency profile the costs come from, when there is one; see :meth:`with_latency`
    latency: Optional[LatencyProfile] = None
    #: what the search minimises: ``"flops"`` or ``"latency"``
    cost: str = "flops"
    fft_energy: Optional[np.ndarray] = None  # (N, E, bands); None in caches made before the fft policy

    # --------------------------------------------------------------- basics
    @property
    def num_images(self) -> int:
        return int(self.num_pixels.shape[0])

    @property
    def num_exits(self) -> int:
        return len(self.exit_names)

    @property
    def labelled(self) -> bool:
        """True when the split had labelled pixels; otherwise mIoU means agreement with the final exit."""
        return bool(self.label_count.sum() > 0)

    @property
    def class_pixels(self) -> np.ndarray:
        return (self.label_count if self.labelled else self.agree_label_count).sum(0)

    @property
    def class_prob_sum(self) -> np.ndarray:
        return self.label_prob_sum if self.labelled else self.agree_prob_sum

    def exit_pixels(self) -> np.ndarray:
        """Pixels each exit's scores were taken over, ``(N, E)`` float64 (each exit's own resolution)."""
        px = self.num_pixels.astype(np.float64)
        return px if px.ndim == 2 else np.repeat(px[:, None], self.num_exits, 1)

    def hist(self) -> np.ndarray:
        """Pixels per probability bin, all classes, ``(N, E, B)`` float64."""
        return self.class_hist.sum(2, dtype=np.int64).astype(np.float64)

    def nbytes(self) -> int:
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))

    # --------------------------------------------------------------- arithmetic
    def counts(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-image true positives ``(N, E, K)``, predictions ``(N, E, K)`` and labels ``(N, K)`` per class, what
        mIoU is computed from: against the labels, or against the final exit's predictions when there are none."""
        if self.labelled:
            return self.tp, self.pred_count, self.label_count
        return self.agree_tp, self.agree_pred_count, self.agree_label_count

    def assign(self, scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
        """Exit index per image: the first early exit with ``score >= threshold``, else the final."""
        ok = scores >= np.asarray(thresholds, dtype=np.float64)[None, :]
        ok = np.concatenate([ok, np.ones((ok.shape[0], 1), dtype=bool)], axis=1)
        return ok.argmax(1)

    def miou(self, assignment: np.ndarray) -> float:
        """Dataset mIoU in points (0-100) of the images' chosen exits, from the per-image counts (exact;
        :func:`mexify.metrics.miou_from_counts`)."""
        tp, pc, lc = self.counts()
        idx = np.arange(len(assignment))
        return miou_from_counts(tp[idx, assignment].sum(0, dtype=np.int64), pc[idx, assignment].sum(0, dtype=np.int64),
                                lc.sum(0, dtype=np.int64))

    def exit_miou(self, exit_index: int) -> float:
        return self.miou(np.full(self.num_images, exit_index, dtype=np.int64))

    @property
    def final_miou(self) -> float:
        return self.exit_miou(self.num_exits - 1)

    def per_image_miou(self) -> np.ndarray:
        """mIoU in points (0-100) of every image at every exit, ``(N, E)``, over classes in its labels or
        prediction; NaN for an image without a labelled pixel (:func:`mexify.metrics.miou_from_counts`)."""
        tp, pc, lc = self.counts()
        return miou_from_counts(tp, pc, np.broadcast_to(lc[:, None, :], tp.shape))

    def oracle_assignment(self, tolerance: float) -> np.ndarray:
        """Earliest exit whose per-image mIoU is within ``tolerance`` points of the final exit's; an image
        without a labelled pixel (NaN) weighs on no exit's mIoU, so it takes the first."""
        pim = self.per_image_miou()
        ok = (pim >= pim[:, -1:] - float(tolerance) - 1e-9) | np.isnan(pim[:, -1:])
        return ok.argmax(1)

    # --------------------------------------------------------------- cost model
    def with_latency(self, profile: LatencyProfile) -> "ExitCache":
        """A copy that costs exits by a measured latency profile (``mexify profile``) and searches on it.

        ``profile`` holds milliseconds per batch of ``batch_size``; costs become milliseconds per image
        counted as the runtime spends them (:meth:`~mexify.runtime.LatencyProfile.exit_ms`: stages, active
        heads and decisions, masks), and the original model costs the same pieces with every exit off
        (:meth:`~mexify.runtime.LatencyProfile.original_ms_per_image`).
        """
        if profile.num_exits != self.num_exits:
            raise DataError(
                f"the latency profile {profile.key!r} has {profile.num_exits} stages for {self.num_exits} exits",
                "profile the bundle again: `mexify profile BUNDLE`",
            )
        return dataclasses.replace(self, latency=profile, cost="latency")

    @property
    def cost_unit(self) -> str:
        return "ms" if self.cost == "latency" else "flops"

    @property
    def original_cost(self) -> float:
        """The original model's cost per image in the search's unit."""
        return self.latency.original_ms_per_image() if self.cost == "latency" else float(self.original_flops)

    def exit_costs(self, thresholds: Optional[Sequence[float]] = None, kind: Optional[str] = None) -> np.ndarray:
        """Cost to leave at each exit, ``(E,)``, in FLOPs or ms per image (``kind``, default the
        search's), when only the heads the thresholds can use run.

        A threshold of ``+inf`` switches its exit off: the runtime never evaluates that head, so
        it costs nothing on the way to later exits. Without thresholds, every head counts.
        """
        kind = kind or self.cost
        e1 = self.num_exits - 1
        on = np.ones(e1, dtype=bool) if thresholds is None else np.array([not (math.isinf(t) and t > 0) for t in thresholds], dtype=bool)
        if kind == "latency":
            return np.asarray(self.latency.exit_ms(np.flatnonzero(on).tolist()), dtype=np.float64)
        if self.stage_flops is None or self.head_flops is None:
            return self.costs
        return np.asarray(exit_flops(self.stage_flops, self.head_flops, np.flatnonzero(on).tolist()), dtype=np.float64)

    def figures(self, assignment: np.ndarray, thresholds: Optional[Sequence[float]] = None) -> Dict[str, Any]:
        """mIoU, drop, mean cost, speed-up and exit rates of an assignment (costed as :meth:`exit_costs`).

        ``mean_cost``/``speedup``/``cost_fraction`` are in the search's cost model (``cost``);
        FLOPs figures are always there, measured-latency ones (``mean_ms``, ``predicted_speedup``)
        when the cache has a latency profile.
        """
        flops = float(self.exit_costs(thresholds, "flops")[assignment].mean())
        cost = float(self.exit_costs(thresholds)[assignment].mean())
        final = self.final_miou
        miou = self.miou(assignment)
        rates = np.bincount(assignment, minlength=self.num_exits) / max(len(assignment), 1)
        out = {
            "miou": miou,
            "final_miou": final,
            "drop": final - miou,
            "cost": self.cost,
            "mean_cost": cost,
            "cost_fraction": cost / self.original_cost,
            "speedup": self.original_cost / cost if cost > 0 else float("nan"),
            "mean_flops": flops,
            "original_flops": float(self.original_flops),
            "flops_speedup": float(self.original_flops) / flops if flops > 0 else float("nan"),
        }
        if self.latency is not None:
            ms = float(self.exit_costs(thresholds, "latency")[assignment].mean())
            orig = self.latency.original_ms_per_image()
            out.update(mean_ms=ms, original_ms=orig, predicted_speedup=orig / ms if ms > 0 else float("nan"),
                       latency_profile=self.latency.key)
        out.update(self.agreement(assignment))
        out.update(exit_rates={n: float(r) for n, r in zip(self.exit_names, rates)}, labelled=self.labelled,
                   num_images=self.num_images)
        return out

    def agreement(self, assignment: np.ndarray) -> Dict[str, float]:
        """How an assignment's masks compare with the final exit's, which needs no labels: ``disagreement``, the
        share (0-1) of pixels whose class differs, and ``agree_drop``, 100 minus their mIoU against the final
        exit's masks (the drop a label-free calibration measures)."""
        idx = np.arange(len(assignment))
        tp = self.agree_tp[idx, assignment].sum(0, dtype=np.int64)
        lc = self.agree_label_count.sum(0, dtype=np.int64)
        pixels = float(lc.sum())
        return {"disagreement": 1.0 - float(tp.sum()) / pixels if pixels else float("nan"),
                "agree_drop": 100.0 - miou_from_counts(tp, self.agree_pred_count[idx, assignment].sum(0, dtype=np.int64), lc)}

    # --------------------------------------------------------------- search
    def search(
        self,
        scores: np.ndarray,
        max_cost: Optional[float] = None,
        max_drop: Optional[float] = None,
        candidates: int = 48,
        lambdas: int = 24,
        max_disagree: Optional[float] = None,
        confidence: float = 0.0,
    ) -> "SearchResult":
        """Per-exit thresholds for a budget, searched jointly on the cache.

        Args:
            scores: ``(N, E-1)`` image confidences at the early exits.
            max_cost: maximise mIoU with mean FLOPs ``<= max_cost``.
            max_drop: minimise mean FLOPs with mIoU ``>= final - max_drop`` (points).
            max_disagree: minimise mean FLOPs with at most this share of pixels differing from the final exit's.
            confidence: with a value in (0, 1), the budget must hold, with that probability, on a new set of
                images as large as this one (:class:`~mexify.calibrate.risk.RiskBound`); 0: on this cache.
            candidates: quantiles of each exit's scores tried as thresholds.
            lambdas: points of the Lagrangian sweep (also the Pareto curve's resolution).

        Returns:
            a :class:`SearchResult` (thresholds, assignment, Pareto and global-threshold curves).

        Raises:
            BudgetError: ``max_cost`` below the cheapest reachable mean cost.
        """
        return search_thresholds(self, np.asarray(scores, dtype=np.float64), max_cost, max_drop, candidates, lambdas, max_disagree, confidence)

    def proposal_half(self) -> "ExitCache":
        """The half of the images a certified search proposes configurations on (the other half certifies them):
        where a policy may choose anything else (a band, a parameter) without weakening the certificate."""
        return self.subset(halves(self.num_images)[0])

    def subset(self, index: Any) -> "ExitCache":
        """The cache of some of its images (``index``: positions or a boolean mask). The class probability sums
        (cbt's class means) are kept for the whole cache: they are pooled over images, not kept per image."""
        index = np.asarray(index)
        fields = {name: value[index] for name, value in vars(self).items()
                  if isinstance(value, np.ndarray) and name not in ("costs", "label_prob_sum", "agree_prob_sum")}
        return dataclasses.replace(self, **fields)

    @classmethod
    def merge(cls, caches: Sequence["ExitCache"]) -> "ExitCache":
        """One cache of the images of several (collected on the same model, e.g. on chunks of a split or on
        several days of camera frames): per-image statistics side by side, class probability sums added.

        Raises:
            DataError: no cache, or caches of different exits or classes.
        """
        if not caches:
            raise DataError("no exit cache to merge", "collect at least one")
        first = caches[0]
        for c in caches[1:]:
            if c.exit_names != first.exit_names or c.num_classes != first.num_classes:
                raise DataError("exit caches of different exits or classes cannot be merged", "collect them on the same bundle")
        fields: Dict[str, Any] = {}
        for name, value in vars(first).items():
            if name in ("label_prob_sum", "agree_prob_sum"):
                fields[name] = sum(getattr(c, name) for c in caches)
            elif name != "costs" and isinstance(value, np.ndarray):
                fields[name] = np.concatenate([getattr(c, name) for c in caches], 0)
        return dataclasses.replace(first, **fields)

    # --------------------------------------------------------------- persistence
    def save(self, path: Union[str, Path]) -> None:
        """Write the cache as one ``.npz`` (arrays) with its metadata, atomically (``.npz`` appended if missing)."""
        arrays = {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        meta = {k: v for k, v in vars(self).items() if not isinstance(v, np.ndarray)}
        if self.latency is not None:
            meta["latency"] = {**self.latency.to_dict(), "key": self.latency.key}
        path = Path(path) if str(path).endswith(".npz") else Path(f"{path}.npz")
        with atomic_file(path, "wb") as fh:
            np.savez_compressed(fh, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ExitCache":
        with np.load(path) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
        if meta.get("latency") is not None:
            meta["latency"] = LatencyProfile.from_dict(meta["latency"])
        return cls(**meta, **arrays)


class ExitSource(Protocol):
    """What :func:`collect_cache` needs of a model: a :class:`~mexify.nn.MultiExitModel`, or
    :class:`~mexify.calibrate.configure.CandidateView` (every head candidate an exit of its own).

    An ``nn.Module`` (the cache runs it in eval mode and hands it back in its mode) with its exits' names,
    its classes, FLOPs (1 multiply-add = 1 FLOP) and each exit's output on a batch.
    """

    exit_names: Sequence[str]
    num_classes: int
    original_flops: float
    stage_flops: Sequence[float]
    head_flops: Sequence[float]
    training: bool

    def cost_to_exit(self, i: int) -> float: ...

    def iter_exits(self, x: torch.Tensor) -> Iterator[Any]:
        """Each exit's output in turn: ``.logits`` at the exit's own resolution, ``.features`` at its exit point."""
        ...

    def train(self, mode: bool = True) -> Any: ...

    def modules(self) -> Iterator[Any]: ...


def _model_costs(model: ExitSource) -> Tuple[np.ndarray, float, List[float], List[float]]:
    e = len(model.exit_names)
    costs = np.array([float(model.cost_to_exit(i)) for i in range(e)], dtype=np.float64)
    return costs, float(model.original_flops), [float(v) for v in model.stage_flops], [float(v) for v in model.head_flops]


def _exit_outputs(model: ExitSource, x: torch.Tensor, need_features: bool) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
    """Each exit's logits at its own resolution (and the exit-point features when asked)."""
    outs = list(model.iter_exits(x))
    return [o.logits for o in outs], [o.features if need_features else None for o in outs]


def _nearest(labels: torch.Tensor, size: Any) -> torch.Tensor:
    """Integer maps ``(N, H, W)`` resized to ``size`` by nearest neighbour (unchanged when already there)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(labels.dtype)


class _Accumulator:
    """Streams per-image statistics into lists of numpy arrays."""

    def __init__(self, num_exits: int, k: int, edge_radius: int, thumb: int):
        self.e, self.k, self.r, self.thumb = num_exits, k, edge_radius, thumb
        self.parts: Dict[str, List[np.ndarray]] = {}
        self.label_prob_sum = torch.zeros(num_exits, k, k, dtype=torch.float64)
        self.agree_prob_sum = torch.zeros(num_exits, k, k, dtype=torch.float64)

    def _push(self, name: str, arr: torch.Tensor) -> None:
        self.parts.setdefault(name, []).append(arr.cpu().numpy())

    def _counts(self, pred: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, k = pred.shape[0], self.k
        valid = (target >= 0) & (target < k)
        off = (torch.arange(n, device=pred.device) * k)[:, None]
        pv = pred.flatten(1)
        tv = target.flatten(1)
        vv = valid.flatten(1)
        size = n * k
        tp = torch.bincount((off + pv)[vv & (pv == tv)], minlength=size).view(n, k)
        pc = torch.bincount((off + pv)[vv], minlength=size).view(n, k)
        lc = torch.bincount((off + tv.clamp(0, k - 1))[vv], minlength=size).view(n, k)
        return tp, pc, lc

    def _prob_sum(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sum of probability vectors per target class, ``(K_target, K)`` (a batched matmul with one-hots)."""
        k = self.k
        valid = (target >= 0) & (target < k)
        onehot = F.one_hot(target.clamp(0, k - 1).flatten(1), k).to(probs.dtype) * valid.flatten(1)[..., None]
        out = torch.bmm(probs.flatten(2), onehot).sum(0)  # (K, K_target)
        return out.t().double().cpu()

    @torch.no_grad()
    def add(self, probs: List[torch.Tensor], preds: List[torch.Tensor], labels: Optional[torch.Tensor]) -> None:
        """One batch: ``probs[i]`` at exit ``i``'s own resolution (what policies score), ``preds[i]``
        its masks as the runtime makes them, at the labels' resolution (what mIoU counts)."""
        final_pred = preds[-1]
        if labels is None:
            labels = torch.full_like(final_pred, IGNORE_INDEX)
        labels = labels.long()
        has_labels = bool(((labels >= 0) & (labels < self.k)).any())
        per: Dict[str, List[torch.Tensor]] = {}
        for i, (p, pred) in enumerate(zip(probs, preds)):
            for name, value in self._score_stats(p).items():
                per.setdefault(name, []).append(value)
            tp, pc, lc = self._counts(pred, labels)
            per.setdefault("tp", []).append(tp)
            per.setdefault("pred_count", []).append(pc)
            atp, apc, alc = self._counts(pred, final_pred)
            per.setdefault("agree_tp", []).append(atp)
            per.setdefault("agree_pred_count", []).append(apc)
            # class probability sums at the exit's resolution, against labels resized there (nearest)
            if has_labels:
                self.label_prob_sum[i] += self._prob_sum(p, _nearest(labels, p.shape[-2:]))
            else:  # only used when the whole split is unlabelled
                self.agree_prob_sum[i] += self._prob_sum(p, _nearest(final_pred, p.shape[-2:]))
            if self.thumb > 0:
                s = max(1, math.ceil(max(final_pred.shape[-2:]) / self.thumb))
                size = (math.ceil(final_pred.shape[-2] / s), math.ceil(final_pred.shape[-1] / s))
                top1, native = p.max(1)
                per.setdefault("thumb_bins", []).append(_nearest(prob_bins(top1), size).to(torch.uint8))
                per.setdefault("thumb_pred", []).append(_nearest(native, size).to(torch.int16))
        for name, lst in per.items():
            self._push(name, torch.stack(lst, 1))
        self._push("label_count", lc)
        self._push("agree_label_count", alc)

    def _score_stats(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        """What policies' scores are computed from, at the map's own resolution."""
        k, b = self.k, NUM_BINS
        n = p.shape[0]
        top1, pred = p.max(1)
        bins = prob_bins(top1)
        edge = boundary_mask(pred, self.r)
        off = (torch.arange(n, device=p.device) * (k * b))[:, None]
        ch = torch.bincount((off + pred.flatten(1) * b + bins.flatten(1)).flatten(), minlength=n * k * b)
        eoff = (torch.arange(n, device=p.device) * b)[:, None]
        eh = torch.bincount((eoff + bins.flatten(1))[edge.flatten(1)], minlength=n * b)
        return {
            "class_hist": ch.view(n, k, b).int(),
            "edge_hist": eh.view(n, b).int(),
            "num_pixels": torch.full((n,), top1[0].numel(), dtype=torch.int64, device=p.device),
            "mean_maxprob": top1.flatten(1).double().mean(1),
            "mean_entropy": mean_entropy(p),
            "fft_energy": band_energy(top1),
        }

    def arrays(self) -> Dict[str, np.ndarray]:
        out = {name: np.concatenate(v, 0) for name, v in self.parts.items()}
        for name in ("tp", "pred_count", "label_count", "agree_tp", "agree_pred_count", "agree_label_count"):
            out[name] = out[name].astype(np.int64)
        out["label_prob_sum"] = self.label_prob_sum.numpy()
        out["agree_prob_sum"] = self.agree_prob_sum.numpy()
        return out


@torch.no_grad()
def collect_cache(
    model: ExitSource,
    batches: Iterable[Any],
    source: Optional[Policy] = None,
    temperatures: Optional[Sequence[float]] = None,
    edge_radius: int = 1,
    thumb: int = 64,
    device: Any = None,
    total: Optional[int] = None,
    progress: Progress = None,
) -> ExitCache:
    """Run every exit once over ``batches`` (eval mode, no grad) and keep per-image statistics.

    Args:
        model: a ``MultiExitModel``, or anything else :class:`ExitSource` describes; handed back in its mode.
        batches: iterable of ``(images, masks)``; masks may be None or all 255 (unlabelled).
        source: policy whose ``probabilities`` define the exit outputs (default: softmax of
            the logits, with ``temperatures``); class-means passes itself.
        temperatures: per-exit temperatures for the default source.
        edge_radius: boundary half-width for mess (pixels of each exit's own map).
        thumb: long side of the downsampled maps kept for cbt's pixel-level figure (0: none).
        total: number of batches, for progress.
        progress: ``callback(stage, done, total)``.

    Returns:
        the :class:`ExitCache`.

    Raises:
        DataError: no batch.
    """
    if source is None:
        source = MaxProbPolicy(temperatures=temperatures)
    elif temperatures is not None:  # a copy: the caller's policy keeps its own temperatures
        source = copy.copy(source)
        source.temperatures = list(temperatures)
    names = list(model.exit_names)
    k = int(model.num_classes)
    acc = _Accumulator(len(names), k, edge_radius, thumb)
    t0 = time.perf_counter()
    done = 0
    with training_mode(model, False):
        for x, y in unpadded(batches):
            if device is not None:
                x = x.to(device)
                y = y.to(device) if y is not None else None
            acc.add(*_exit_maps(model, source, x, y), y)
            done += 1
            if progress is not None:
                progress("collect", done, total or done)
    if done == 0:
        raise DataError("the calibration split yielded no batch", "check --split and --limit")
    cache = _assemble(model, acc, source, edge_radius)
    log.info(
        "exit cache: %d images x %d exits in %.1f s, %.1f MB%s",
        cache.num_images,
        cache.num_exits,
        time.perf_counter() - t0,
        cache.nbytes() / 2**20,
        "" if cache.labelled else " (no labels: figures are agreement with the final exit)",
    )
    return cache


def _exit_maps(model: Any, source: Policy, x: torch.Tensor, y: Optional[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Every exit's probabilities at its own resolution and its mask at the labels' (as the runtime makes it)."""
    logits, feats = _exit_outputs(model, x, source.needs_features)
    image = tuple(x.shape[-2:])
    target = tuple(y.shape[-2:]) if y is not None else image
    probs, preds = [], []
    for i, (z, f) in enumerate(zip(logits, feats)):
        probs.append(source.probabilities(i, z, f))
        preds.append(resize_masks(masks_of(source.mask_scores(i, z, f), image), target))  # as the runtime, then evaluation
    return probs, preds


def _assemble(model: Any, acc: "_Accumulator", source: Policy, edge_radius: int) -> ExitCache:
    costs, orig, stage, head = _model_costs(model)
    return ExitCache(
        exit_names=list(model.exit_names),
        num_classes=int(model.num_classes),
        costs=costs,
        original_flops=orig,
        edge_radius=int(edge_radius),
        temperatures=None if source.temperatures is None else list(source.temperatures),
        source="class-means" if source.needs_features else "softmax",
        stage_flops=stage,
        head_flops=head,
        **acc.arrays(),
    )
