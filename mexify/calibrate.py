"""Calibration: collect an exit cache once, then fit a policy's thresholds for a budget.

The cache holds, per image and exit, what every policy's score and the mIoU of any
exit assignment need, compactly:

* ``class_hist`` ``(N, E, K, B)`` int32: pixels by predicted class and top-1 probability
  bin (``mexify.policies.PROB_EDGES``); ``edge_hist`` ``(N, E, B)``: the same for pixels
  on a predicted class boundary (mess).
* ``mean_maxprob``, ``mean_entropy`` ``(N, E)`` float64 (maxprob, entropy, class-means).
* ``tp``, ``pred_count`` ``(N, E, K)`` and ``label_count`` ``(N, K)`` int64: per-image
  true positives, predictions on labelled pixels and labels per class. Summing them over
  any exit assignment gives the dataset confusion-matrix diagonal, column and row sums,
  hence its mIoU exactly (no second pass). ``agree_*``: the same against the final
  exit's predictions (used when there are no labels).
* ``class_prob_sum`` ``(E, K, K)``: summed probability vectors per labelled class (cbt).
* ``thumb_bins``, ``thumb_pred`` ``(N, E, h, w)`` uint8/int16 downsampled maps (cbt's
  theoretical pixel-level FLOPs).

For 1,000 images, 7 exits and 19 classes that is about 50 MB whatever the resolution.
Threshold search is coordinate descent over quantiles of each exit's cached scores,
warm-started along a Lagrangian sweep of mIoU against cost (which also gives the
Pareto curve) and polished under the exact constraint.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from mexify.errors import BudgetError, ConfigError, DataError
from mexify.policies import Policy, boundary_mask, build_policy, prob_bins
from mexify.policies.base import NUM_BINS
from mexify.policies.entropy import mean_entropy

log = logging.getLogger(__name__)

__all__ = [
    "ExitCache",
    "SearchResult",
    "CalibrationReport",
    "collect_cache",
    "fit_temperatures",
    "parse_budget",
    "calibrate",
    "IGNORE_INDEX",
]

IGNORE_INDEX = 255
Progress = Optional[Callable[[str, int, int], None]]


# =============================================================================== cache
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
    edge_radius: int = 2
    temperatures: Optional[List[float]] = None
    source: str = "softmax"
    stage_flops: Optional[List[float]] = None
    head_flops: Optional[List[float]] = None

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

    def hist(self) -> np.ndarray:
        """Pixels per probability bin, all classes, ``(N, E, B)`` float64."""
        return self.class_hist.sum(2, dtype=np.int64).astype(np.float64)

    def nbytes(self) -> int:
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))

    # --------------------------------------------------------------- arithmetic
    def _counts(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.labelled:
            return self.tp, self.pred_count, self.label_count
        return self.agree_tp, self.agree_pred_count, self.agree_label_count

    def assign(self, scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
        """Exit index per image: the first early exit with ``score >= threshold``, else the final."""
        ok = scores >= np.asarray(thresholds, dtype=np.float64)[None, :]
        ok = np.concatenate([ok, np.ones((ok.shape[0], 1), dtype=bool)], axis=1)
        return ok.argmax(1)

    def miou(self, assignment: np.ndarray) -> float:
        """Dataset mIoU (0-100) of the images' chosen exits, from the per-image counts (exact)."""
        tp, pc, lc = self._counts()
        idx = np.arange(len(assignment))
        t = tp[idx, assignment].sum(0, dtype=np.int64)
        p = pc[idx, assignment].sum(0, dtype=np.int64)
        u = p + lc.sum(0, dtype=np.int64) - t
        present = u > 0
        return float((t[present] / u[present]).mean() * 100.0) if present.any() else 0.0

    def exit_miou(self, exit_index: int) -> float:
        return self.miou(np.full(self.num_images, exit_index, dtype=np.int64))

    @property
    def final_miou(self) -> float:
        return self.exit_miou(self.num_exits - 1)

    def per_image_miou(self) -> np.ndarray:
        """mIoU (0-100) of every image at every exit, ``(N, E)``, over classes in its labels or prediction."""
        tp, pc, lc = self._counts()
        u = pc + lc[:, None, :] - tp
        present = u > 0
        iou = np.where(present, tp / np.maximum(u, 1), 0.0)
        n = present.sum(-1)
        return np.where(n > 0, iou.sum(-1) / np.maximum(n, 1), 1.0) * 100.0

    def oracle_assignment(self, tolerance: float) -> np.ndarray:
        """Earliest exit whose per-image mIoU is within ``tolerance`` points of the final exit's."""
        pim = self.per_image_miou()
        ok = pim >= pim[:, -1:] - float(tolerance) - 1e-9
        return ok.argmax(1)

    def figures(self, assignment: np.ndarray) -> Dict[str, Any]:
        """mIoU, drop, mean FLOPs, speed-up and exit rates of an assignment."""
        cost = float(self.costs[assignment].mean())
        final = self.final_miou
        miou = self.miou(assignment)
        rates = np.bincount(assignment, minlength=self.num_exits) / max(len(assignment), 1)
        return {
            "miou": miou,
            "final_miou": final,
            "drop": final - miou,
            "mean_flops": cost,
            "original_flops": float(self.original_flops),
            "cost_fraction": cost / float(self.original_flops),
            "speedup": float(self.original_flops) / cost if cost > 0 else float("nan"),
            "exit_rates": {n: float(r) for n, r in zip(self.exit_names, rates)},
            "labelled": self.labelled,
            "num_images": self.num_images,
        }

    # --------------------------------------------------------------- search
    def search(
        self,
        scores: np.ndarray,
        max_cost: Optional[float] = None,
        max_drop: Optional[float] = None,
        candidates: int = 48,
        lambdas: int = 24,
    ) -> "SearchResult":
        """Per-exit thresholds for a budget, searched jointly on the cache.

        Args:
            scores: ``(N, E-1)`` image confidences at the early exits.
            max_cost: maximise mIoU with mean FLOPs ``<= max_cost``.
            max_drop: minimise mean FLOPs with mIoU ``>= final - max_drop`` (points).
            candidates: quantiles of each exit's scores tried as thresholds.
            lambdas: points of the Lagrangian sweep (also the Pareto curve's resolution).

        Returns:
            a :class:`SearchResult` (thresholds, assignment, Pareto and global-threshold curves).

        Raises:
            BudgetError: ``max_cost`` below the cheapest reachable mean cost.
        """
        return _search(self, np.asarray(scores, dtype=np.float64), max_cost, max_drop, candidates, lambdas)

    # --------------------------------------------------------------- persistence
    def save(self, path: Union[str, Path]) -> None:
        """Write the cache as one ``.npz`` (arrays) with its metadata."""
        arrays = {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        meta = {k: v for k, v in vars(self).items() if not isinstance(v, np.ndarray)}
        import json

        np.savez_compressed(path, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ExitCache":
        import json

        with np.load(path) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
        return cls(**meta, **arrays)


# =============================================================================== collection
def _model_costs(model: Any) -> Tuple[np.ndarray, float, Optional[List[float]], Optional[List[float]]]:
    e = len(model.exit_names)
    costs = np.array([float(model.cost_to_exit(i)) for i in range(e)], dtype=np.float64)
    stage = getattr(model, "stage_flops", None)
    head = getattr(model, "head_flops", None)
    return costs, float(model.original_flops), (list(map(float, stage)) if stage is not None else None), (
        list(map(float, head)) if head is not None else None
    )


def _exit_outputs(model: Any, x: torch.Tensor, need_features: bool) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
    if not need_features:
        logits = list(model.forward_all(x))
        return logits, [None] * len(logits)
    if hasattr(model, "iter_exits"):
        logits, feats = [], []
        for out in model.iter_exits(x):
            logits.append(out.logits)
            feats.append(out.features)
        return logits, feats
    logits = list(model.forward_all(x))
    feats = list(model.forward_features(x)) + [None]
    return logits, feats


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
    def add(self, probs: List[torch.Tensor], labels: Optional[torch.Tensor]) -> None:
        k, b = self.k, NUM_BINS
        final_pred = probs[-1].argmax(1)
        n = final_pred.shape[0]
        if labels is None:
            labels = torch.full_like(final_pred, IGNORE_INDEX)
        labels = labels.long()
        has_labels = bool(((labels >= 0) & (labels < k)).any())
        per: Dict[str, List[torch.Tensor]] = {}
        for i, p in enumerate(probs):
            top1, pred = p.max(1)
            bins = prob_bins(top1)
            edge = boundary_mask(pred, self.r)
            off = (torch.arange(n, device=p.device) * (k * b))[:, None]
            ch = torch.bincount((off + pred.flatten(1) * b + bins.flatten(1)).flatten(), minlength=n * k * b)
            per.setdefault("class_hist", []).append(ch.view(n, k, b).int())
            eoff = (torch.arange(n, device=p.device) * b)[:, None]
            eh = torch.bincount((eoff + bins.flatten(1))[edge.flatten(1)], minlength=n * b)
            per.setdefault("edge_hist", []).append(eh.view(n, b).int())
            per.setdefault("mean_maxprob", []).append(top1.flatten(1).double().mean(1))
            per.setdefault("mean_entropy", []).append(mean_entropy(p))
            tp, pc, lc = self._counts(pred, labels)
            per.setdefault("tp", []).append(tp)
            per.setdefault("pred_count", []).append(pc)
            atp, apc, alc = self._counts(pred, final_pred)
            per.setdefault("agree_tp", []).append(atp)
            per.setdefault("agree_pred_count", []).append(apc)
            if has_labels:
                self.label_prob_sum[i] += self._prob_sum(p, labels)
            else:  # only used when the whole split is unlabelled
                self.agree_prob_sum[i] += self._prob_sum(p, final_pred)
            if self.thumb > 0:
                s = max(1, math.ceil(max(top1.shape[-2:]) / self.thumb))
                per.setdefault("thumb_bins", []).append(bins[:, ::s, ::s].to(torch.uint8))
                per.setdefault("thumb_pred", []).append(pred[:, ::s, ::s].to(torch.int16))
        for name, lst in per.items():
            self._push(name, torch.stack(lst, 1))
        self._push("label_count", lc)
        self._push("agree_label_count", alc)
        self._push("num_pixels", torch.full((n,), final_pred[0].numel(), dtype=torch.int64))

    def arrays(self) -> Dict[str, np.ndarray]:
        out = {name: np.concatenate(v, 0) for name, v in self.parts.items()}
        for name in ("tp", "pred_count", "label_count", "agree_tp", "agree_pred_count", "agree_label_count"):
            out[name] = out[name].astype(np.int64)
        out["label_prob_sum"] = self.label_prob_sum.numpy()
        out["agree_prob_sum"] = self.agree_prob_sum.numpy()
        return out


def _split_batch(batch: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, (list, tuple)):
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        return x, y
    if isinstance(batch, dict):
        return batch["image"], batch.get("mask")
    return batch, None


@torch.no_grad()
def collect_cache(
    model: Any,
    batches: Iterable[Any],
    source: Optional[Policy] = None,
    temperatures: Optional[Sequence[float]] = None,
    edge_radius: int = 2,
    thumb: int = 64,
    device: Any = None,
    total: Optional[int] = None,
    progress: Progress = None,
) -> ExitCache:
    """Run every exit once over ``batches`` (eval mode, no grad) and keep per-image statistics.

    Args:
        model: a ``MultiExitModel`` (``forward_all``, ``cost_to_exit``, ``exit_names``, ...).
        batches: iterable of ``(images, masks)``; masks may be None or all 255 (unlabelled).
        source: policy whose ``probabilities`` define the exit outputs (default: softmax of
            the logits, with ``temperatures``); class-means passes itself.
        temperatures: per-exit temperatures for the default source.
        edge_radius: boundary half-width for mess (px at input resolution).
        thumb: long side of the downsampled maps kept for cbt's pixel-level figure (0: none).
        total: number of batches, for progress.
        progress: ``callback(stage, done, total)``.

    Returns:
        the :class:`ExitCache`.

    Raises:
        DataError: no batch.
    """
    if source is None:
        from mexify.policies.maxprob import MaxProbPolicy

        source = MaxProbPolicy(temperatures=temperatures)
    elif temperatures is not None:
        source.temperatures = list(temperatures)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    names = list(model.exit_names)
    k = int(model.num_classes)
    acc = _Accumulator(len(names), k, edge_radius, thumb)
    t0 = time.perf_counter()
    done = 0
    try:
        for batch in batches:
            x, y = _split_batch(batch)
            if device is not None:
                x = x.to(device)
                y = y.to(device) if y is not None else None
            logits, feats = _exit_outputs(model, x, source.needs_features)
            probs = []
            for i, (z, f) in enumerate(zip(logits, feats)):
                p = source.probabilities(i, z, f)
                if y is not None and p.shape[-2:] != y.shape[-2:]:
                    p = F.interpolate(p, size=y.shape[-2:], mode="bilinear", align_corners=False)
                probs.append(p)
            acc.add(probs, y)
            done += 1
            if progress is not None:
                progress("collect", done, total or done)
    finally:
        model.train(was_training)
    if done == 0:
        raise DataError("the calibration split yielded no batch", "check --split and --limit")
    costs, orig, stage, head = _model_costs(model)
    arrays = acc.arrays()
    cache = ExitCache(
        exit_names=names,
        num_classes=k,
        costs=costs,
        original_flops=orig,
        edge_radius=int(edge_radius),
        temperatures=None if source.temperatures is None else list(source.temperatures),
        source="class-means" if source.needs_features else "softmax",
        stage_flops=stage,
        head_flops=head,
        **arrays,
    )
    log.info(
        "exit cache: %d images x %d exits in %.1f s, %.1f MB%s",
        cache.num_images,
        cache.num_exits,
        time.perf_counter() - t0,
        cache.nbytes() / 2**20,
        "" if cache.labelled else " (no labels: figures are agreement with the final exit)",
    )
    return cache


@torch.no_grad()
def fit_temperatures(
    model: Any,
    batches: Iterable[Any],
    pixels_per_image: int = 4096,
    grid: Optional[Sequence[float]] = None,
    device: Any = None,
    total: Optional[int] = None,
    progress: Progress = None,
) -> Optional[List[float]]:
    """Per-exit temperature minimising pixel NLL on labelled pixels (one pass).

    A random subset of labelled pixels per image is scored on a log-spaced grid of
    temperatures, refined by a parabola through the best grid point and its neighbours.

    Returns:
        one temperature per exit (final included), or None when no pixel is labelled.
    """
    grid_t = torch.tensor(grid if grid is not None else np.logspace(-1.0, 1.0, 41), dtype=torch.float64)
    nll: Optional[torch.Tensor] = None
    gen = torch.Generator().manual_seed(0)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    done = 0
    try:
        for batch in batches:
            x, y = _split_batch(batch)
            if y is None:
                continue
            if device is not None:
                x, y = x.to(device), y.to(device)
            logits = list(model.forward_all(x))
            k = logits[0].shape[1]
            valid = ((y >= 0) & (y < k)).flatten(1)
            picks = []
            for n in range(y.shape[0]):
                idx = valid[n].nonzero().flatten()
                if idx.numel() > pixels_per_image:
                    idx = idx[torch.randperm(idx.numel(), generator=gen)[:pixels_per_image].to(idx.device)]
                picks.append((n, idx))
            if nll is None:
                nll = torch.zeros(len(logits), len(grid_t), dtype=torch.float64)
            tgt = torch.cat([y[n].flatten()[idx] for n, idx in picks])
            if tgt.numel() == 0:
                continue
            for i, z in enumerate(logits):
                if z.shape[-2:] != y.shape[-2:]:
                    z = F.interpolate(z.float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
                zz = torch.cat([z[n].flatten(1)[:, idx].t() for n, idx in picks]).double()  # (P, K)
                # all temperatures at once: sum_p logsumexp(z_p / T) - z_p,y / T
                zt = zz[None] / grid_t.to(zz.device)[:, None, None]  # (G, P, K)
                picked = zt.gather(2, tgt.view(1, -1, 1).expand(len(grid_t), -1, 1)).squeeze(2)
                nll[i] += (torch.logsumexp(zt, dim=2) - picked).sum(1).cpu()
            done += 1
            if progress is not None:
                progress("temperature", done, total or done)
    finally:
        model.train(was_training)
    if nll is None or not bool((nll > 0).any()):
        log.warning("temperature scaling skipped: no labelled pixel")
        return None
    temps = []
    lg = torch.log(grid_t)
    for row in nll:
        j = int(row.argmin())
        t = float(lg[j])
        if 0 < j < len(row) - 1:
            y0, y1, y2 = float(row[j - 1]), float(row[j]), float(row[j + 1])
            den = y0 - 2 * y1 + y2
            if den > 0:
                h = float(lg[j + 1] - lg[j])
                t = t + 0.5 * h * (y0 - y2) / den
        temps.append(float(math.exp(t)))
    log.info("temperatures: %s", ", ".join(f"{t:.3f}" for t in temps))
    return temps


# =============================================================================== search
@dataclasses.dataclass
class SearchResult:
    """Thresholds chosen for a budget and the curves around them."""

    thresholds: List[float]
    assignment: np.ndarray
    cache: ExitCache
    constraint: Dict[str, Any]
    pareto: List[Dict[str, Any]]  # non-dominated (mean_flops, miou, thresholds)
    global_curve: List[Dict[str, Any]]  # one threshold for every exit
    best_global: Optional[Dict[str, Any]]
    evaluations: int
    seconds: float

    def figures(self) -> Dict[str, Any]:
        f = self.cache.figures(self.assignment)
        f["search_seconds"] = self.seconds
        return f


class _Eval:
    def __init__(self, cache: ExitCache, scores: np.ndarray):
        self.cache = cache
        self.s = scores
        tp, pc, lc = cache._counts()
        self.tp = tp.astype(np.float64)
        self.pc = pc.astype(np.float64)
        self.lsum = lc.sum(0).astype(np.float64)
        self.costs = cache.costs.astype(np.float64)
        self.idx = np.arange(scores.shape[0])
        self.ones = np.ones((scores.shape[0], 1), dtype=bool)
        self.count = 0
        self.points: List[Tuple[float, float, Tuple[float, ...]]] = []

    def __call__(self, t: np.ndarray) -> Tuple[float, float]:
        self.count += 1
        ok = np.concatenate([self.s >= t[None, :], self.ones], axis=1)
        a = ok.argmax(1)
        tt = self.tp[self.idx, a].sum(0)
        u = self.pc[self.idx, a].sum(0) + self.lsum - tt
        present = u > 0
        miou = float((tt[present] / u[present]).mean() * 100.0) if present.any() else 0.0
        cost = float(self.costs[a].mean())
        self.points.append((cost, miou, tuple(t.tolist())))
        return cost, miou


def _candidates(col: np.ndarray, q: int) -> np.ndarray:
    c = np.unique(np.quantile(col, np.linspace(0.0, 1.0, q), method="lower")) if len(col) else np.zeros(0)
    return np.concatenate([c, [np.inf]])


def _descend(ev: _Eval, cands: List[np.ndarray], t: np.ndarray, key: Callable[[float, float], Optional[tuple]], sweeps: int = 6) -> np.ndarray:
    """Coordinate descent: each exit's threshold in turn, keeping the best key (None = infeasible)."""
    best_key = key(*ev(t))
    for _ in range(sweeps):
        improved = False
        for i, cand in enumerate(cands):
            cur = t[i]
            for c in cand:
                if c == cur:
                    continue
                t[i] = c
                k = key(*ev(t))
                if k is not None and (best_key is None or k > best_key):
                    best_key, cur, improved = k, c, True
            t[i] = cur
        if not improved:
            break
    return t


def _front(points: List[Tuple[float, float, Tuple[float, ...]]]) -> List[Tuple[float, float, Tuple[float, ...]]]:
    pts = sorted(points, key=lambda p: (p[0], -p[1]))
    out, best = [], -np.inf
    for p in pts:
        if p[1] > best + 1e-12:
            out.append(p)
            best = p[1]
    return out


def _search(cache: ExitCache, scores: np.ndarray, max_cost: Optional[float], max_drop: Optional[float], q: int, n_lambda: int) -> SearchResult:
    t0 = time.perf_counter()
    e1 = cache.num_exits - 1
    if scores.shape != (cache.num_images, e1):
        raise ConfigError(f"scores have shape {scores.shape}, expected {(cache.num_images, e1)}", "one column per early exit")
    if max_cost is not None and max_drop is not None:
        raise ConfigError("give either a budget or a max drop, not both", "e.g. --budget 2x or --max-drop 1.0")
    orig = float(cache.original_flops)
    cheapest = float(cache.costs.min()) if e1 == 0 else float(cache.costs[0])
    if max_cost is not None and max_cost < cheapest * (1 - 1e-9):
        raise BudgetError(
            f"budget not reachable: mean cost {max_cost:.4g} FLOPs ({orig / max_cost:.2f}x) is below the cheapest "
            f"configuration, every image at the first exit: {cheapest:.4g} FLOPs ({orig / cheapest:.2f}x, "
            f"{100 * cheapest / orig:.1f}% of the original)",
            f"the best reachable budget is {orig / cheapest:.2f}x ({100 * cheapest / orig:.1f}%)",
        )
    ev = _Eval(cache, scores)
    final = cache.final_miou
    if max_cost is not None:
        constraint = {"max_cost": float(max_cost)}

        def key(cost: float, miou: float) -> Optional[tuple]:
            return (round(miou, 9), -cost) if cost <= max_cost * (1 + 1e-12) else None

    else:
        drop = 1.0 if max_drop is None else float(max_drop)
        target = final - drop
        constraint = {"max_drop": drop, "min_miou": target}

        def key(cost: float, miou: float) -> Optional[tuple]:
            return (-round(cost, 6), miou) if miou >= target - 1e-9 else None

    if e1 == 0:
        a = np.zeros(cache.num_images, dtype=np.int64)
        return SearchResult([], a, cache, constraint, [], [], None, 0, time.perf_counter() - t0)

    cands = [_candidates(scores[:, i], q) for i in range(e1)]
    # one global threshold for every exit: the baseline the joint search must match
    gcands = _candidates(scores.ravel(), max(4 * q, 64))
    global_curve, best_g, best_gk = [], None, None
    for g in gcands:
        t = np.full(e1, g)
        cost, miou = ev(t)
        global_curve.append({"threshold": float(g), "mean_flops": cost, "miou": miou})
        k = key(cost, miou)
        if k is not None and (best_gk is None or k > best_gk):
            best_g, best_gk = t.copy(), k
    # Lagrangian sweep: maximise mIoU - lam * 100 * cost / original, warm-started
    t = np.full(e1, np.inf)
    for lam in np.concatenate([[0.0], np.logspace(-3, 1.5, max(n_lambda - 1, 1))]):
        t = _descend(ev, cands, t, lambda c, m, lam=lam: (m - lam * 100.0 * c / orig,), sweeps=3)
    front = _front(ev.points)
    # polish under the exact constraint from the best feasible starts
    starts = [np.array(p[2]) for p in sorted(front, key=lambda p: key(p[0], p[1]) or (-np.inf,), reverse=True)[:2]
              if key(p[0], p[1]) is not None]
    if best_g is not None:
        starts.append(best_g.copy())
    if not starts:
        starts.append(np.full(e1, np.inf) if max_cost is None else np.concatenate([[-np.inf], np.full(e1 - 1, np.inf)]))
    best_t, best_k = None, None
    for s in starts:
        s = _descend(ev, cands, s.copy(), key)
        k = key(*ev(s))
        if k is not None and (best_k is None or k > best_k):
            best_t, best_k = s.copy(), k
    if best_t is None:  # only possible with a max_cost exactly at the cheapest point and ties
        best_t = np.concatenate([[-np.inf], np.full(e1 - 1, np.inf)])
    front = _front(ev.points)
    a = cache.assign(scores, best_t)
    best_global = None
    if best_g is not None:
        ag = cache.assign(scores, best_g)
        best_global = {"threshold": float(best_g[0]), **{k_: v for k_, v in cache.figures(ag).items() if k_ in ("miou", "mean_flops", "speedup")}}
    secs = time.perf_counter() - t0
    log.info("threshold search: %d evaluations in %.2f s", ev.count, secs)
    return SearchResult(
        thresholds=[float(x) for x in best_t],
        assignment=a,
        cache=cache,
        constraint=constraint,
        pareto=[{"mean_flops": c, "speedup": orig / c, "miou": m, "thresholds": list(th)} for c, m, th in front],
        global_curve=global_curve,
        best_global=best_global,
        evaluations=ev.count,
        seconds=secs,
    )


def oracle_at(cache: ExitCache, max_cost: Optional[float] = None, min_miou: Optional[float] = None) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]]]:
    """The oracle's figures at a budget, and its curve over tolerances.

    With ``max_cost``: the most accurate tolerance whose mean cost fits; with
    ``min_miou``: the cheapest tolerance that keeps the mIoU. Returns (figures or None, curve).
    """
    curve = []
    best, best_k = None, None
    for tol in np.concatenate([np.linspace(0, 5, 21), np.linspace(6, 100, 48)]):
        a = cache.oracle_assignment(float(tol))
        f = cache.figures(a)
        f["tolerance"] = float(tol)
        curve.append(f)
        if max_cost is not None:
            k = (f["miou"], -f["mean_flops"]) if f["mean_flops"] <= max_cost * (1 + 1e-12) else None
        else:
            k = (-f["mean_flops"], f["miou"]) if min_miou is None or f["miou"] >= min_miou - 1e-9 else None
        if k is not None and (best_k is None or k > best_k):
            best, best_k = f, k
    return best, curve


# =============================================================================== budgets
def parse_budget(text: Union[str, float, None]) -> Optional[Dict[str, Any]]:
    """``"2x"`` -> mean speed-up >= 2; ``"40%"`` -> mean cost <= 40% of the original.

    Returns:
        ``{"kind": "speedup" | "cost_fraction", "value": float, "text": str}`` or None.

    Raises:
        ConfigError: anything else.
    """
    if text is None:
        return None
    s = str(text).strip().lower().replace(" ", "")
    try:
        if s.endswith("x"):
            v = float(s[:-1])
            if v <= 0:
                raise ValueError
            return {"kind": "speedup", "value": v, "text": s}
        if s.endswith("%"):
            v = float(s[:-1])
            if not 0 < v <= 100:
                raise ValueError
            return {"kind": "cost_fraction", "value": v / 100.0, "text": s}
    except ValueError:
        pass
    raise ConfigError(f"cannot read budget {text!r}", "write a speed-up like 2x or a cost share like 40%")


def budget_max_cost(budget: Dict[str, Any], original_flops: float) -> float:
    if budget["kind"] == "speedup":
        return float(original_flops) / budget["value"]
    return float(original_flops) * budget["value"]


# =============================================================================== API
@dataclasses.dataclass
class CalibrationReport:
    """What ``calibrate`` fitted and reached; ``to_dict`` is the ``--json`` output."""

    policy: Policy
    figures: Dict[str, Any]
    budget: Dict[str, Any]
    oracle: Optional[Dict[str, Any]]
    best_global: Optional[Dict[str, Any]]
    pareto: List[Dict[str, Any]]
    theoretical: Optional[Dict[str, Any]] = None
    temperatures: Optional[List[float]] = None
    labelled: bool = True
    files: Dict[str, str] = dataclasses.field(default_factory=dict)
    timings: Dict[str, float] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)
    cache: Optional[ExitCache] = dataclasses.field(default=None, repr=False)

    @property
    def thresholds(self) -> Dict[str, Optional[float]]:
        names = self.policy.exit_names or []
        return {n: (t if math.isfinite(t) else None) for n, t in zip(names[:-1], self.policy.thresholds or [])}

    def to_dict(self) -> Dict[str, Any]:
        pol = self.policy.to_dict()
        pol.pop("means", None)
        pol.pop("scales", None)
        return {
            "policy": pol,
            "thresholds": self.thresholds,
            "figures": self.figures,
            "budget": self.budget,
            "oracle": self.oracle,
            "best_global_threshold": self.best_global,
            "theoretical_pixel_level": self.theoretical,
            "temperatures": self.temperatures,
            "labelled": self.labelled,
            "files": self.files,
            "timings": self.timings,
            "notes": self.notes,
        }


def _resolve_model(bundle: Any, device: Any) -> Tuple[Any, Optional[Path]]:
    if isinstance(bundle, (str, Path)):
        import mexify

        return mexify.load(bundle, device=device), Path(bundle)
    return bundle, None


def _resolve_data(data: Any, split: str, limit: Optional[int]) -> Any:
    if isinstance(data, str):
        from mexify.data import build_dataset

        ds = build_dataset(data, split=split, train=False)
    else:
        ds = data
    if limit is not None and hasattr(ds, "__len__") and limit < len(ds):
        ds = torch.utils.data.Subset(ds, list(range(int(limit))))
    return ds


def _loader(ds: Any, batch_size: int) -> Any:
    if isinstance(ds, torch.utils.data.DataLoader):
        return ds
    try:
        from mexify.data import build_loader

        return build_loader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    except ImportError:  # pragma: no cover - data package missing
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


def save_pareto(result: SearchResult, oracle_curve: List[Dict[str, Any]], chosen: Dict[str, Any], out: Path, title: str = "") -> Dict[str, str]:
    """Write ``pareto.csv`` and ``pareto.png`` (mIoU against mean FLOPs speed-up)."""
    out.mkdir(parents=True, exist_ok=True)
    orig = float(result.cache.original_flops)
    csv_path, png_path = out / "pareto.csv", out / "pareto.png"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["curve", "mean_flops", "speedup", "miou", "parameter"])
        for p in result.pareto:
            w.writerow(["policy", f"{p['mean_flops']:.6g}", f"{p['speedup']:.4f}", f"{p['miou']:.4f}",
                        ";".join("inf" if not math.isfinite(t) else f"{t:.6g}" for t in p["thresholds"])])
        for p in result.global_curve:
            w.writerow(["global", f"{p['mean_flops']:.6g}", f"{orig / p['mean_flops']:.4f}", f"{p['miou']:.4f}", f"{p['threshold']:.6g}"])
        for p in oracle_curve:
            w.writerow(["oracle", f"{p['mean_flops']:.6g}", f"{p['speedup']:.4f}", f"{p['miou']:.4f}", f"{p['tolerance']:.4g}"])
        w.writerow(["chosen", f"{chosen['mean_flops']:.6g}", f"{chosen['speedup']:.4f}", f"{chosen['miou']:.4f}", ""])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        g = sorted(result.global_curve, key=lambda p: p["mean_flops"])
        ax.plot([orig / p["mean_flops"] for p in g], [p["miou"] for p in g], ".", ms=3, color="0.6", label="one global threshold")
        ax.plot([p["speedup"] for p in result.pareto], [p["miou"] for p in result.pareto], "-", color="C0", label="per-exit thresholds (Pareto)")
        if oracle_curve:
            oc = sorted(oracle_curve, key=lambda p: p["speedup"])
            ax.plot([p["speedup"] for p in oc], [p["miou"] for p in oc], "--", color="C2", label="oracle")
        ax.plot([chosen["speedup"]], [chosen["miou"]], "*", ms=12, color="C3", label="chosen")
        ax.set_xlabel("mean speed-up over the original (FLOPs, 1 multiply-add = 1 FLOP)")
        ax.set_ylabel("mIoU (%)" if result.cache.labelled else "agreement mIoU with final exit (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(png_path)
        plt.close(fig)
    except Exception as e:  # plotting must never fail a calibration
        log.warning("could not draw %s: %s", png_path, e)
        return {"pareto_csv": str(csv_path)}
    return {"pareto_csv": str(csv_path), "pareto_png": str(png_path)}


def calibrate(
    bundle: Any,
    data: Any,
    policy: Union[str, Policy] = "mess",
    budget: Union[str, None] = None,
    max_drop: Optional[float] = None,
    split: str = "calib",
    temperature: bool = False,
    out: Union[str, Path, None] = None,
    limit: Optional[int] = None,
    batch_size: int = 4,
    device: Any = None,
    policy_options: Optional[Dict[str, Any]] = None,
    means_split: str = "train",
    means_limit: Optional[int] = 200,
    edge_radius: Optional[int] = None,
    write: bool = True,
    progress: Progress = None,
) -> CalibrationReport:
    """Fit an exit policy on a calibration split for a budget and write it into the bundle.

    Args:
        bundle: bundle directory (loaded with ``mexify.load`` and updated in place) or a
            ``MultiExitModel`` (nothing is written to disk but ``out``).
        data: dataset spec (``synthetic:scenes``, ``voc:PATH``, ...) or a Dataset of ``(image, mask)``.
        policy: registry name or a :class:`Policy` instance.
        budget: ``"2x"`` (mean speed-up >= 2) or ``"40%"`` (mean cost <= 40% of the original):
            maximise mIoU within it.
        max_drop: the fastest thresholds within this many mIoU points of the final exit
            (the default, 1.0, when no budget is given).
        split: dataset split to calibrate on.
        temperature: fit one temperature per exit first (one more pass; needs labels).
        out: directory for ``pareto.csv``/``pareto.png`` (default ``BUNDLE/calibration``).
        limit: use the first ``limit`` images only.
        policy_options: keyword options of the policy (e.g. ``{"pixel_threshold": 0.95}``).
        means_split, means_limit: labelled data for class-means' class means.
        write: write the fitted policy into the bundle's ``config.yaml``.
        progress: ``callback(stage, done, total)``.

    Returns:
        a :class:`CalibrationReport`.

    Raises:
        BudgetError: the budget is below the cheapest reachable cost (nothing is written).
        ConfigError: bad policy, budget or options.
    """
    timings: Dict[str, float] = {}
    notes: List[str] = []
    bud = parse_budget(budget)
    if bud is not None and max_drop is not None:
        raise ConfigError("give either --budget or --max-drop, not both", "e.g. --budget 2x or --max-drop 1.0")
    if bud is None and max_drop is None:
        max_drop = 1.0
    pol = policy if isinstance(policy, Policy) else build_policy(policy, **(policy_options or {}))
    if pol.name == "oracle":
        raise ConfigError("the oracle reads labels and cannot be deployed", "calibrate a policy such as mess; its report includes the oracle")
    radius = int(edge_radius if edge_radius is not None else getattr(pol, "edge_radius", 2))

    model, bundle_path = _resolve_model(bundle, device)
    dev = device
    if dev is None:
        try:
            dev = next(model.parameters()).device
        except (StopIteration, AttributeError):
            dev = None
    ds = _resolve_data(data, split, limit)
    n_batches = math.ceil(len(ds) / batch_size) if hasattr(ds, "__len__") else None

    temps = None
    if temperature:
        t0 = time.perf_counter()
        temps = fit_temperatures(model, _loader(ds, batch_size), device=dev, total=n_batches, progress=progress)
        timings["temperature_s"] = time.perf_counter() - t0
        if temps is None:
            notes.append("temperature scaling skipped: the calibration split has no labels")
        pol.temperatures = temps

    if pol.needs_features:
        t0 = time.perf_counter()
        mds = _resolve_data(data if isinstance(data, str) else ds, means_split if isinstance(data, str) else split, means_limit)
        pol = pol.collect_means(model, ((x, y) for x, y in (_split_batch(b) for b in _loader(mds, batch_size))), model.num_classes, device=dev)
        pol.temperatures = temps
        timings["class_means_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cache = collect_cache(model, _loader(ds, batch_size), source=pol, edge_radius=radius, device=dev, total=n_batches, progress=progress)
    timings["collect_s"] = time.perf_counter() - t0
    if not cache.labelled:
        notes.append(
            "no labels in the calibration split: only label-free parts were fitted; mIoU figures are agreement "
            "with the final exit's predictions, cbt ranks classes by the final exit's predictions, "
            "temperatures and the oracle are skipped"
        )

    max_cost = budget_max_cost(bud, cache.original_flops) if bud is not None else None
    t0 = time.perf_counter()
    if progress is not None:
        progress("search", 0, 1)
    fitted = pol.fit(cache, max_cost=max_cost, max_drop=None if bud is not None else max_drop)
    timings["search_s"] = time.perf_counter() - t0
    if progress is not None:
        progress("search", 1, 1)
    result: SearchResult = fitted._search_result
    figures = result.figures()
    budget_rec = dict(bud) if bud is not None else {"kind": "max_drop", "value": float(max_drop), "text": f"max-drop {max_drop}"}
    fitted.budget = budget_rec
    fitted.figures = {k: v for k, v in figures.items() if k != "search_seconds"}

    oracle, oracle_curve = None, []
    if cache.labelled:
        oracle, oracle_curve = oracle_at(cache, max_cost=max_cost, min_miou=result.constraint.get("min_miou"))
    theoretical = None
    if fitted.name == "cbt":
        from mexify.policies.cbt import pixel_level_flops

        theoretical = pixel_level_flops(fitted, cache)
        if theoretical is not None:
            theoretical["note"] = "theoretical: settled pixels masked in later stages (ADP-C style); dense hardware does not get this"

    files: Dict[str, str] = {}
    out_dir = Path(out) if out is not None else (bundle_path / "calibration" if bundle_path is not None else None)
    if out_dir is not None:
        files = save_pareto(result, oracle_curve, figures, out_dir, title=f"{fitted.name} on {split}")
    if write and bundle_path is not None:
        from mexify.bundle import update_bundle

        update_bundle(bundle_path, policy=fitted.to_dict())
        files["config"] = str(bundle_path / "config.yaml")
    return CalibrationReport(
        policy=fitted,
        figures=figures,
        budget=budget_rec,
        oracle=oracle,
        best_global=result.best_global,
        pareto=result.pareto,
        theoretical=theoretical,
        temperatures=temps,
        labelled=cache.labelled,
        files=files,
        timings=timings,
        notes=notes,
        cache=cache,
    )
