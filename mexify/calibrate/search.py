"""Threshold search on an exit cache: per-exit thresholds for a budget, and the curves around them.

Coordinate descent over quantiles of each exit's cached scores, warm-started along a
Lagrangian sweep of mIoU against cost (which also gives the Pareto curve) and polished under
the exact constraint. Pure numpy on the cache: no model runs here.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from mexify.errors import BudgetError, ConfigError
from mexify.metrics import miou_from_counts

# mexify.calibrate.cache.ExitCache, which imports this module: annotations name it, nothing here needs the class
ExitCache = Any

log = logging.getLogger(__name__)

__all__ = ["SearchResult", "search_thresholds", "oracle_at"]

Key = Callable[[float, float], Optional[tuple]]


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

    def figures(self) -> Dict[str, Any]:
        f = self.cache.figures(self.assignment, self.thresholds)
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
        cost = float(self.cache.exit_costs(t)[a].mean())  # switched-off exits' heads cost nothing
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


def search_thresholds(
    cache: "ExitCache", scores: np.ndarray, max_cost: Optional[float], max_drop: Optional[float], q: int = 48, n_lambda: int = 24
) -> SearchResult:
    """Per-exit thresholds for a budget, searched jointly on the cache (see :meth:`ExitCache.search`)."""
    t0 = time.perf_counter()
    e1 = cache.num_exits - 1
    if scores.shape != (cache.num_images, e1):
        raise ConfigError(f"scores have shape {scores.shape}, expected {(cache.num_images, e1)}", "one column per early exit")
    if max_cost is not None and max_drop is not None:
        raise ConfigError("give either a budget or a max drop, not both", "e.g. --budget 2x or --max-drop 1.0")
    _check_reachable(cache, max_cost)
    key, constraint = _objective(cache, max_cost, max_drop)
    if e1 == 0:
        a = np.zeros(cache.num_images, dtype=np.int64)
        return SearchResult([], a, cache, constraint, [], [], None, 0, time.perf_counter() - t0)

    ev = _Eval(cache, scores)
    cands = [_candidates(scores[:, i], q) for i in range(e1)]
    global_curve, best_g = _global_baseline(ev, scores, key, q)
    _lagrangian_sweep(ev, cands, e1, float(cache.original_cost), n_lambda)
    best_t = _polish(ev, cands, key, best_g, e1, max_cost is not None)
    return _result(cache, scores, ev, best_t, best_g, global_curve, constraint, t0)


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


def _objective(cache: "ExitCache", max_cost: Optional[float], max_drop: Optional[float]) -> Tuple[Key, Dict[str, Any]]:
    """The ranking key of a (cost, mIoU) point under the constraint (None: infeasible), and the constraint."""
    if max_cost is not None:
        def key(cost: float, miou: float) -> Optional[tuple]:
            return (round(miou, 9), -cost) if cost <= max_cost * (1 + 1e-12) else None

        return key, {"max_cost": float(max_cost)}
    drop = 1.0 if max_drop is None else float(max_drop)
    target = cache.final_miou - drop

    def key(cost: float, miou: float) -> Optional[tuple]:  # noqa: F811 - one of two objectives
        return (-round(cost, 6), miou) if miou >= target - 1e-9 else None

    return key, {"max_drop": drop, "min_miou": target}


def _global_baseline(ev: "_Eval", scores: np.ndarray, key: Key, q: int) -> Tuple[List[Dict[str, Any]], Optional[np.ndarray]]:
    """One threshold for every exit: the curve, and the best feasible point (the baseline to match)."""
    e1 = scores.shape[1]
    curve, best, best_k = [], None, None
    for g in _candidates(scores.ravel(), max(4 * q, 64)):
        t = np.full(e1, g)
        cost, miou = ev(t)
        curve.append({"threshold": float(g), "mean_cost": cost, "miou": miou})
        k = key(cost, miou)
        if k is not None and (best_k is None or k > best_k):
            best, best_k = t.copy(), k
    return curve, best


def _lagrangian_sweep(ev: "_Eval", cands: List[np.ndarray], e1: int, orig: float, n_lambda: int) -> None:
    """Maximise mIoU - lam * 100 * cost / original along lam, warm-started; fills ``ev.points``."""
    t = np.full(e1, np.inf)
    for lam in np.concatenate([[0.0], np.logspace(-3, 1.5, max(n_lambda - 1, 1))]):
        t = _descend(ev, cands, t, lambda c, m, lam=lam: (m - lam * 100.0 * c / orig,), sweeps=3)


def _polish(ev: "_Eval", cands: List[np.ndarray], key: Key, best_g: Optional[np.ndarray], e1: int, cost_bound: bool) -> np.ndarray:
    """Coordinate descent under the exact constraint from the best feasible starts."""
    front = _front(ev.points)
    ranked = sorted(front, key=lambda p: key(p[0], p[1]) or (-np.inf,), reverse=True)
    starts = [np.array(p[2]) for p in ranked[:2] if key(p[0], p[1]) is not None]
    if best_g is not None:
        starts.append(best_g.copy())
    if not starts:
        starts.append(np.concatenate([[-np.inf], np.full(e1 - 1, np.inf)]) if cost_bound else np.full(e1, np.inf))
    best_t, best_k = None, None
    for s in starts:
        s = _descend(ev, cands, s.copy(), key)
        k = key(*ev(s))
        if k is not None and (best_k is None or k > best_k):
            best_t, best_k = s.copy(), k
    if best_t is None:  # only possible with a max_cost exactly at the cheapest point and ties
        best_t = np.concatenate([[-np.inf], np.full(e1 - 1, np.inf)])
    return best_t


def _result(cache, scores, ev, best_t, best_g, global_curve, constraint, t0) -> SearchResult:
    orig = float(cache.original_cost)
    front = _front(ev.points)
    best_global = None
    if best_g is not None:
        figures = cache.figures(cache.assign(scores, best_g), best_g)
        best_global = {"threshold": float(best_g[0]), **{k: v for k, v in figures.items() if k in ("miou", "mean_cost", "mean_flops", "speedup")}}
    secs = time.perf_counter() - t0
    log.info("threshold search: %d evaluations in %.2f s", ev.count, secs)
    return SearchResult(
        thresholds=[float(x) for x in best_t],
        assignment=cache.assign(scores, best_t),
        cache=cache,
        constraint=constraint,
        pareto=[{"mean_cost": c, "speedup": orig / c, "miou": m, "thresholds": list(th)} for c, m, th in front],
        global_curve=global_curve,
        best_global=best_global,
        evaluations=ev.count,
        seconds=secs,
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
