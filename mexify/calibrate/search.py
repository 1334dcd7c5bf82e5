"""Threshold search on an exit cache: per-exit thresholds for a budget, and the curves around them.

Coordinate descent over quantiles of each exit's cached scores, warm-started along a
Lagrangian sweep of mIoU against cost (which also gives the Pareto curve) and polished under
the exact constraint. Pure numpy on the cache: no model runs here.

With a confidence the thresholds are chosen by *learn then test* (Angelopoulos et al., 2021): the
calibration images are split in two fixed random halves; the sweep on the first half draws a path of
configurations, from the safest (every image at the final exit for an accuracy budget, at the first exit
for a cost budget) to the most aggressive; the second half tests them in that order, each certified when
its bound on a new set of images (:class:`~mexify.calibrate.risk.RiskBound`, predictive, for a set as large
as the whole calibration set) is within the budget, and the walk stops at the first that is not (fixed-
sequence testing: no correction for the number of configurations, as none is tested unless every safer
one passed). The half that tests did not choose the path, so the winner's curse of picking the luckiest
estimate does not reach the bound. Without a confidence (``confidence=0``), the point figures on the whole
cache decide, exactly as before confidences existed.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from mexify.calibrate.risk import RiskBound
from mexify.errors import BudgetError, ConfigError
from mexify.metrics import miou_from_counts

# mexify.calibrate.cache.ExitCache, which imports this module: annotations name it, nothing here needs the class
ExitCache = Any

log = logging.getLogger(__name__)

__all__ = ["oracle_at_budget", "SearchResult", "Objective", "search_thresholds", "oracle_at", "halves"]



@dataclasses.dataclass
class SearchResult:
    """Thresholds chosen for a budget and the curves around them."""

    thresholds: List[float]
    assignment: np.ndarray
    cache: "ExitCache"
    constraint: Dict[str, Any]
    pareto: List[Dict[str, Any]]  # non-dominated (mean_cost, speedup, miou, thresholds) in the cache's cost unit
    global_curve: List[Dict[str, Any]]  # one threshold for every exit
    best_global: Optional[Dict[str, Any]]
    evaluations: int
    seconds: float
    #: every image's score at every early exit, what the thresholds were searched on ``(N, E-1)``
    scores: Optional[np.ndarray] = None
    #: the bounds of the chosen configuration on new images (:meth:`Objective.bounds`); empty for a point fit
    certified: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def figures(self) -> Dict[str, Any]:
        f = self.cache.figures(self.assignment, self.thresholds)
        f.update(self.certified)
        f["search_seconds"] = self.seconds
        return f


class _Eval:
    def __init__(self, cache: "ExitCache", scores: np.ndarray):
        self.cache = cache
        self.s = scores
        tp, pc, lc = cache.counts()
        self.tp = tp.astype(np.float64)
        self.pc = pc.astype(np.float64)
        self.lsum = lc.sum(0).astype(np.float64)
        self.idx = np.arange(scores.shape[0])
        self.ones = np.ones((scores.shape[0], 1), dtype=bool)
        self.count = 0
        self.points: List[Tuple[float, float, Tuple[float, ...]]] = []

    def __call__(self, t: np.ndarray) -> Tuple[float, float]:
        self.count += 1
        ok = np.concatenate([self.s >= t[None, :], self.ones], axis=1)
        a = ok.argmax(1)
        miou = miou_from_counts(self.tp[self.idx, a].sum(0), self.pc[self.idx, a].sum(0), self.lsum)
        costs = self.cache.exit_costs(t)  # switched-off exits' heads cost nothing
        cost = float(costs[a].mean())
        self.last = (a, costs)
        self.points.append((cost, miou, tuple(t.tolist())))
        return cost, miou


class Objective:
    """What the search ranks and what it must respect: a budget on a cache, and its bounds on new images.

    :meth:`rank` orders ``(cost, mIoU)`` points (higher is better) and is None for a point over the budget
    on the cache; with ``risk`` (a :class:`~mexify.calibrate.risk.RiskBound` of the same cache),
    :meth:`certified` says whether a configuration's bound on new images is within the budget too, and
    :meth:`bounds` gives the bounds a report shows.
    """

    def __init__(self, cache: "ExitCache", max_cost: Optional[float], max_drop: Optional[float], max_disagree: Optional[float],
                 risk: Optional[RiskBound]):
        self.cache, self.risk = cache, risk
        self.max_cost, self.max_disagree = max_cost, max_disagree
        self.drop = None if max_cost is not None or max_disagree is not None else (1.0 if max_drop is None else float(max_drop))
        self.target = cache.final_miou - self.drop if self.drop is not None else None
        if max_cost is not None:
            self.constraint: Dict[str, Any] = {"max_cost": float(max_cost)}
        elif max_disagree is not None:
            self.constraint = {"max_disagree": float(max_disagree)}
        else:
            self.constraint = {"max_drop": self.drop, "min_miou": self.target}
        if risk is not None:
            self.constraint["confidence"] = risk.confidence
        self.risk_kind = "cost" if max_cost is not None else ("disagreement" if max_disagree is not None else "drop")
        if max_disagree is not None:
            self._agreed = cache.agree_tp.sum(-1, dtype=np.int64)  # (N, E) pixels of the final exit's class
            self._pixels = float(cache.agree_label_count.sum())

    def rank(self, cost: float, miou: float, a: Optional[np.ndarray] = None) -> Optional[tuple]:
        """The point's key, or None when it is over the budget on the cache itself."""
        if self.max_cost is not None:
            return (round(miou, 9), -cost) if cost <= self.max_cost * (1 + 1e-12) else None
        if self.max_disagree is not None:
            return (-round(cost, 6), miou) if self._disagreement(a) <= self.max_disagree + 1e-12 else None
        return (-round(cost, 6), miou) if miou >= self.target - 1e-9 else None

    def _disagreement(self, a: np.ndarray) -> float:
        agreed = self._agreed[np.arange(len(a)), a].sum()
        return 1.0 - float(agreed) / max(self._pixels, 1.0)

    def certified(self, a: np.ndarray, costs: np.ndarray) -> bool:
        """Whether the assignment's bound on new images is within the budget (True without ``risk``)."""
        if self.risk is None:
            return True
        if self.max_cost is not None:
            return self.risk.cost(costs[a])[1] <= self.max_cost * (1 + 1e-12)
        if self.max_disagree is not None:
            return self.risk.disagreement(a)[1] <= self.max_disagree + 1e-12
        return self.risk.drop(a)[1] <= self.drop + 1e-9

    def key(self, ev: "_Eval", t: np.ndarray) -> Optional[tuple]:
        """Evaluate thresholds ``t``: their key when within the budget on the cache, else None."""
        cost, miou = ev(t)
        return self.rank(cost, miou, ev.last[0])

    def bounds(self, a: np.ndarray, costs: np.ndarray) -> Dict[str, Any]:
        """The chosen configuration's figures and their bounds on new images (empty for a point fit)."""
        if self.risk is None:
            return {}
        r = self.risk
        drop, drop_up = r.drop(a)
        dis, dis_up = r.disagreement(a)
        cost, cost_up = r.cost(costs[a])
        orig = float(self.cache.original_cost)
        return {"confidence": r.confidence, "bound_images": r.new_images, "tested_on": r.num_images, "drop_bound": drop_up,
                "disagreement": dis,
                "disagreement_bound": dis_up, "cost_bound": cost_up, "speedup_bound": orig / cost_up if cost_up > 0 else float("nan")}


def _candidates(col: np.ndarray, q: int) -> np.ndarray:
    c = np.unique(np.quantile(col, np.linspace(0.0, 1.0, q), method="lower")) if len(col) else np.zeros(0)
    return np.concatenate([c, [np.inf]])


Score = Callable[[np.ndarray], Optional[tuple]]


def _descend(cands: List[np.ndarray], t: np.ndarray, score: Score, sweeps: int = 6) -> np.ndarray:
    """Coordinate descent: each exit's threshold in turn, keeping the best key (``score(t)``; None = infeasible)."""
    best_key = score(t)
    for _ in range(sweeps):
        improved = False
        for i, cand in enumerate(cands):
            cur = t[i]
            for c in cand:
                if c == cur:
                    continue
                t[i] = c
                k = score(t)
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


def search_thresholds(
    cache: "ExitCache", scores: np.ndarray, max_cost: Optional[float], max_drop: Optional[float], q: int = 48, n_lambda: int = 24,
    max_disagree: Optional[float] = None, confidence: float = 0.0,
) -> SearchResult:
    """Per-exit thresholds for a budget, searched jointly on the cache (see :meth:`ExitCache.search`)."""
    t0 = time.perf_counter()
    e1 = cache.num_exits - 1
    if scores.shape != (cache.num_images, e1):
        raise ConfigError(f"scores have shape {scores.shape}, expected {(cache.num_images, e1)}", "one column per early exit")
    if sum(v is not None for v in (max_cost, max_drop, max_disagree)) > 1:
        raise ConfigError("give one budget: a cost, a max drop or a max disagreement", "e.g. --budget 2x, --max-drop 1.0 or --max-disagree 2%")
    _check_reachable(cache, max_cost)
    obj = Objective(cache, max_cost, max_drop, max_disagree, None)
    if confidence:
        obj.constraint["confidence"] = float(confidence)
    if e1 == 0:
        a = np.zeros(cache.num_images, dtype=np.int64)
        risk = RiskBound(cache, confidence) if confidence else None
        bounds = Objective(cache, max_cost, max_drop, max_disagree, risk).bounds(a, cache.exit_costs())
        return SearchResult([], a, cache, obj.constraint, [], [], None, 0, time.perf_counter() - t0, bounds, scores)

    ev = _Eval(cache, scores)
    cands = [_candidates(scores[:, i], q) for i in range(e1)]
    global_curve, best_g = _global_baseline(ev, scores, obj, q)
    _lagrangian_sweep(ev, cands, e1, float(cache.original_cost), n_lambda)
    if confidence:
        best_t, bounds = _learn_then_test(cache, scores, (max_cost, max_drop, max_disagree), confidence, q, n_lambda)
    else:
        best_t, bounds = _polish(ev, cands, obj, best_g, e1, max_cost is not None), {}
    return _result(cache, scores, ev, obj, best_t, best_g, global_curve, t0, bounds)


def _check_reachable(cache: "ExitCache", max_cost: Optional[float]) -> None:
    """Refuse a cost budget below every image at the first exit."""
    orig = float(cache.original_cost)
    costs = cache.exit_costs()
    cheapest = float(costs.min()) if cache.num_exits == 1 else float(costs[0])
    unit = cache.cost_unit
    if max_cost is not None and max_cost < cheapest * (1 - 1e-9):
        hint = f"the best reachable budget is {orig / cheapest:.2f}x ({100 * cheapest / orig:.1f}%)"
        if unit == "ms":
            hint += f" or {cheapest:.4g}ms"
        raise BudgetError(
            f"budget not reachable: mean cost {max_cost:.4g} {unit} ({orig / max_cost:.2f}x) is below the cheapest "
            f"configuration, every image at the first exit: {cheapest:.4g} {unit} ({orig / cheapest:.2f}x, "
            f"{100 * cheapest / orig:.1f}% of the original)",
            hint,
        )


def _global_baseline(ev: "_Eval", scores: np.ndarray, obj: Objective, q: int) -> Tuple[List[Dict[str, Any]], Optional[np.ndarray]]:
    """One threshold for every exit: the curve, and the best feasible point (the baseline to match)."""
    e1 = scores.shape[1]
    curve, best, best_k = [], None, None
    for g in _candidates(scores.ravel(), max(4 * q, 64)):
        t = np.full(e1, g)
        k = obj.key(ev, t)
        cost, miou, _ = ev.points[-1]
        curve.append({"threshold": float(g), "mean_cost": cost, "miou": miou})
        if k is not None and (best_k is None or k > best_k):
            best, best_k = t.copy(), k
    return curve, best


def _lagrangian_sweep(ev: "_Eval", cands: List[np.ndarray], e1: int, orig: float, n_lambda: int) -> None:
    """Maximise mIoU - lam * 100 * cost / original along lam, warm-started; fills ``ev.points``."""
    t = np.full(e1, np.inf)
    for lam in np.concatenate([[0.0], np.logspace(-3, 1.5, max(n_lambda - 1, 1))]):
        def score(th: np.ndarray, lam: float = lam) -> tuple:
            cost, miou = ev(th)
            return (miou - lam * 100.0 * cost / orig,)

        t = _descend(cands, t, score, sweeps=3)


def halves(n: int) -> Tuple[np.ndarray, np.ndarray]:
    """The fixed random split of ``n`` calibration images into the half that proposes configurations and
    the half that certifies them (sorted positions)."""
    order = np.random.default_rng(0).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def _learn_then_test(cache: "ExitCache", scores: np.ndarray, limits: Tuple[Optional[float], ...], confidence: float, q: int,
                     n_lambda: int) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Thresholds certified at ``confidence`` (see the module docstring): a path from one half of the images,
    tested in order on the other; returns the last certified thresholds and their bounds."""
    n, e1 = cache.num_images, cache.num_exits - 1
    learn, test = halves(n)
    part = cache.subset(learn)
    ev = _Eval(part, scores[learn])
    _lagrangian_sweep(ev, [_candidates(scores[learn, i], q) for i in range(e1)], e1, float(part.original_cost), n_lambda)
    held = cache.subset(test)
    judge = Objective(held, *limits, RiskBound(held, confidence, new_images=n))
    whole = Objective(cache, *limits, None)  # and within the budget on every calibration image
    cost_budget = limits[0] is not None
    safest = np.concatenate([[-np.inf], np.full(e1 - 1, np.inf)]) if cost_budget else np.full(e1, np.inf)
    path = [np.array(t) for _, _, t in _front(ev.points)]  # cheapest first
    chosen = safest
    for t in (path if cost_budget else path[::-1]):
        a = cache.assign(scores, t)
        costs = cache.exit_costs(t)
        if whole.rank(float(costs[a].mean()), cache.miou(a), a) is None or not judge.certified(a[test], costs):
            break
        chosen = t
    return chosen, judge.bounds(held.assign(scores[test], chosen), held.exit_costs(chosen))


def _polish(ev: "_Eval", cands: List[np.ndarray], obj: Objective, best_g: Optional[np.ndarray], e1: int, cost_bound: bool) -> np.ndarray:
    """Coordinate descent under the exact constraint from the best feasible starts: the two best points of the
    sweep's front within the budget and the best global threshold."""
    front = _front(ev.points)
    keyed = [(obj.key(ev, np.array(t)), t) for _, _, t in front]
    ranked = sorted(keyed, key=lambda kt: kt[0] or (-np.inf,), reverse=True)
    starts = [np.array(t) for k, t in ranked[:2] if k is not None]
    if best_g is not None:
        starts.append(best_g.copy())
    if not starts:
        starts.append(np.concatenate([[-np.inf], np.full(e1 - 1, np.inf)]) if cost_bound else np.full(e1, np.inf))
    best_t, best_k = None, None
    for s in starts:
        s = _descend(cands, s.copy(), lambda t: obj.key(ev, t))
        k = obj.key(ev, s)
        if k is not None and (best_k is None or k > best_k):
            best_t, best_k = s.copy(), k
    if best_t is None:  # only possible with a max_cost exactly at the cheapest point and ties
        best_t = np.concatenate([[-np.inf], np.full(e1 - 1, np.inf)])
    return best_t


def _result(cache, scores, ev, obj: Objective, best_t, best_g, global_curve, t0, bounds: Dict[str, Any]) -> SearchResult:
    orig = float(cache.original_cost)
    front = _front(ev.points)
    best_global = None
    if best_g is not None:
        figures = cache.figures(cache.assign(scores, best_g), best_g)
        best_global = {"threshold": float(best_g[0]), **{k: v for k, v in figures.items() if k in ("miou", "mean_cost", "mean_flops", "speedup")}}
    secs = time.perf_counter() - t0
    log.info("threshold search: %d evaluations in %.2f s", ev.count, secs)
    assignment = cache.assign(scores, best_t)
    return SearchResult(
        thresholds=[float(x) for x in best_t],
        assignment=assignment,
        cache=cache,
        constraint=obj.constraint,
        pareto=[{"mean_cost": c, "speedup": orig / c, "miou": m, "thresholds": list(th)} for c, m, th in front],
        global_curve=global_curve,
        best_global=best_global,
        evaluations=ev.count,
        seconds=secs,
        certified=bounds,
        scores=scores,
    )


def oracle_at(cache: "ExitCache", max_cost: Optional[float] = None, min_miou: Optional[float] = None) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]]]:
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
            k = (f["miou"], -f["mean_cost"]) if f["mean_cost"] <= max_cost * (1 + 1e-12) else None
        else:
            k = (-f["mean_cost"], f["miou"]) if min_miou is None or f["miou"] >= min_miou - 1e-9 else None
        if k is not None and (best_k is None or k > best_k):
            best, best_k = f, k
    return best, curve


def oracle_at_budget(cache: "ExitCache", budget: Any) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]]]:
    """The oracle at a :class:`~mexify.calibrate.Budget`: the most accurate within a cost budget, the cheapest within
    a drop; (None, []) without labels or for a label-free budget (the oracle reads labels)."""
    if not cache.labelled:
        return None, []
    if budget.drop is not None:
        return oracle_at(cache, min_miou=cache.final_miou - budget.drop)
    max_cost = budget.max_cost(cache.original_cost, cache.cost_unit)
    return oracle_at(cache, max_cost=max_cost) if max_cost is not None else (None, [])
