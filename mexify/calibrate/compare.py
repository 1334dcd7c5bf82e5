"""Every policy fitted for one budget on one split and judged on another (``mexify compare``).

Every row carries the figure on the fitting split beside the one on the evaluation split, and whether
the budget held there (``held``); with a confidence, the bound the fit certified and what the point fit
would have reached. The exit caches are collected once per split (softmax policies share them; class-means, whose
probabilities come from the features, gets its own), every policy is fitted on the fitting split's
cache exactly as ``mexify calibrate`` fits it, and its thresholds are applied to the evaluation
split's cache: mIoU, drop against the final exit, predicted cost (measured latency profile or FLOPs)
and FLOPs, and the share of the oracle's saving on the same split at the same budget (the per-image
oracle reads the evaluation labels and sends each image to the earliest exit within a tolerance of its
own final-exit mIoU; dataset mIoU is not a mean of per-image mIoUs, so a policy can beat it, and a
share above 100% says so). Measured speed-ups are :mod:`mexify.api`'s business (it runs the runtime).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from mexify.calibrate.budget import Budget
from mexify.calibrate.cache import ExitCache, collect_cache
from mexify.calibrate.fit import _checked, _cost_model, _fit_on_cache
from mexify.calibrate.search import oracle_at_budget
from mexify.data import unpadded
from mexify.errors import ConfigError
from mexify.nn import module_device
from mexify.policies import Policy, available_policies, build_policy
from mexify.runtime import LatencyProfile

__all__ = ["PolicyComparison", "compare_policies", "comparable_policies"]

Batches = Callable[[], Iterable[Any]]
_KEEP = ("miou", "final_miou", "drop", "mean_cost", "cost_fraction", "speedup", "mean_flops", "flops_speedup", "mean_ms",
         "predicted_speedup", "exit_rates", "disagreement", "agree_drop", "confidence", "drop_bound", "disagreement_bound",
         "speedup_bound", "num_images")


def comparable_policies() -> List[str]:
    """Every registered policy that can be deployed (all but the oracle)."""
    return [p for p in available_policies() if p != "oracle"]


@dataclasses.dataclass
class PolicyComparison:
    """One row per policy (fitted on ``fit_split``, judged on ``eval_split``) and the oracle's row."""

    budget: Budget
    cost: str
    rows: List[Dict[str, Any]]
    oracle: Optional[Dict[str, Any]]
    policies: Dict[str, Policy] = dataclasses.field(repr=False, default_factory=dict)
    curves: Dict[str, List[Dict[str, Any]]] = dataclasses.field(repr=False, default_factory=dict)
    oracle_curve: List[Dict[str, Any]] = dataclasses.field(repr=False, default_factory=list)
    files: Dict[str, str] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    #: the measured speed-ups' baseline, filled when measured: ``original_ms`` (the original model run the
    #: same way), ``exits_off_ms`` (the runtime with every exit off) and ``exits_off_overhead`` (their ratio - 1)
    measured: Dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"budget": self.budget.record(), "cost": self.cost, "rows": self.rows + ([self.oracle] if self.oracle else []),
                "measured": self.measured, "notes": self.notes, "files": self.files, "seconds": self.seconds}


def _figures(f: Dict[str, Any]) -> Dict[str, Any]:
    return {k: f[k] for k in _KEEP if k in f}


def _saving_share(fig: Dict[str, Any], oracle: Optional[Dict[str, Any]], original: float) -> Optional[float]:
    """The policy's saving (1 - cost / original) as a share of the oracle's."""
    if oracle is None:
        return None
    saved = 1.0 - oracle["mean_cost"] / original
    return (1.0 - fig["mean_cost"] / original) / saved if saved > 1e-9 else None


def compare_policies(
    model: Any,
    fit_batches: Batches,
    eval_batches: Batches,
    *,
    budget: Budget = Budget(),
    latency: Optional[LatencyProfile] = None,
    policies: Optional[Sequence[str]] = None,
    device: Any = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> PolicyComparison:
    """Fit ``policies`` (default: every deployable one) on ``fit_batches`` for the budget, judge them on ``eval_batches``.

    Exits are costed as :func:`~mexify.calibrate.fit_policy` costs them (``budget.cost``, ``latency``).

    Raises:
        ConfigError: an unknown policy or a bad budget. BudgetError: a budget no policy can reach.
    """
    t0 = time.perf_counter()
    names = list(policies or comparable_policies())
    if "oracle" in names:
        raise ConfigError("the oracle is always compared (it reads labels); leave it out of --policies")
    pols = [build_policy(n) for n in names]
    budget = _checked(budget)
    dev = device if device is not None else module_device(model)
    notes: List[str] = []

    def caches(source: Optional[Policy]) -> List[ExitCache]:
        return [_cost_model(collect_cache(model, b(), source=source, device=dev), latency, budget.cost, notes)
                for b in (fit_batches, eval_batches)]

    shared = caches(None)
    rows, fitted, curves = [], {}, {}
    for k, pol in enumerate(pols):
        if progress is not None:
            progress("compare", k, len(pols))
        fit_cache, eval_cache = shared
        if pol.needs_features:
            pol = pol.collect_means(model, unpadded(fit_batches()), model.num_classes, device=dev)
            fit_cache, eval_cache = caches(pol)
        report = _fit_on_cache(pol, fit_cache, budget, None, {}, [], None)
        p = report.policy
        assignment = eval_cache.assign(p.cache_scores(eval_cache), p.thresholds)
        judged = _figures(eval_cache.figures(assignment, p.thresholds))
        rows.append({"policy": p.name, "fit": _figures(report.figures), "eval": judged, "held": budget.held(judged),
                     "point_fit": _figures(report.point) if report.point else None})
        fitted[p.name], curves[p.name] = p, report.pareto
    if progress is not None:
        progress("compare", len(pols), len(pols))
    oracle, oracle_curve = _oracle(shared[1], budget)
    for row in rows:
        row["oracle_share"] = _saving_share(row["eval"], oracle["eval"] if oracle else None, shared[1].original_cost)
    notes = list(dict.fromkeys(notes))
    return PolicyComparison(budget, shared[0].cost, rows, oracle, fitted, curves, oracle_curve, {}, notes, time.perf_counter() - t0)


def _oracle(cache: ExitCache, budget: Budget) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]]]:
    """The oracle on the evaluation split at the same budget, and its curve (None, [] without labels)."""
    fig, curve = oracle_at_budget(cache, budget)
    if fig is None:
        return None, curve
    return {"policy": "oracle", "fit": None, "eval": _figures(fig), "oracle_share": 1.0, "tolerance": fig["tolerance"]}, curve
