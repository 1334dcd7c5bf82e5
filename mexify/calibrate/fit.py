"""Fitting a policy: ``(model, batches) -> fitted Policy`` with its figures, for a budget.

Like ``torch.ao``'s calibrate step, objects in and objects out: the bundle, the dataset spec
and the files (Pareto plot, ``config.yaml``) are :mod:`mexify.api`'s business.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from mexify.calibrate.budget import Budget, parse_cost
from mexify.calibrate.cache import ExitCache, collect_cache
from mexify.calibrate.risk import RiskBound, images_to_certify
from mexify.calibrate.search import SearchResult, halves, oracle_at
from mexify.calibrate.temperature import fit_temperatures
from mexify.data import unpadded
from mexify.errors import ConfigError
from mexify.nn import module_device
from mexify.policies import Policy, build_policy, pixel_level_flops
from mexify.runtime import LatencyProfile, expected_stream
from mexify.policies import policy_options as policy_options_of

__all__ = ["CalibrationReport", "fit_policy"]

Progress = Optional[Callable[[str, int, int], None]]
Batches = Callable[[], Iterable[Any]]


@dataclasses.dataclass
class CalibrationReport:
    """What :func:`fit_policy` fitted and reached; ``to_dict`` is the ``--json`` output."""

    policy: Policy
    figures: Dict[str, Any]
    budget: Budget
    oracle: Optional[Dict[str, Any]]
    best_global: Optional[Dict[str, Any]]
    pareto: List[Dict[str, Any]]
    theoretical: Optional[Dict[str, Any]] = None
    temperatures: Optional[List[float]] = None
    labelled: bool = True
    files: Dict[str, str] = dataclasses.field(default_factory=dict)
    timings: Dict[str, float] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)
    #: with a confidence: what the point fit (``confidence=0``) reaches on the same cache, for comparison
    point: Optional[Dict[str, Any]] = None
    cache: Optional[ExitCache] = dataclasses.field(default=None, repr=False)
    search: Optional[SearchResult] = dataclasses.field(default=None, repr=False)
    oracle_curve: List[Dict[str, Any]] = dataclasses.field(default_factory=list, repr=False)

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
            "budget": self.budget.record(),
            "oracle": self.oracle,
            "best_global_threshold": self.best_global,
            "theoretical_pixel_level": self.theoretical,
            "temperatures": self.temperatures,
            "labelled": self.labelled,
            "point_fit": self.point,
            "files": self.files,
            "timings": self.timings,
            "notes": self.notes,
        }


def fit_policy(
    model: Any,
    batches: Batches,
    *,
    policy: Union[str, Policy] = "mess",
    budget: Budget = Budget(),
    latency: Optional[LatencyProfile] = None,
    temperature: bool = False,
    means_batches: Optional[Batches] = None,
    policy_options: Optional[Dict[str, Any]] = None,
    edge_radius: Optional[int] = None,
    device: Any = None,
    total: Optional[int] = None,
    progress: Progress = None,
) -> CalibrationReport:
    """Fit an exit policy on calibration batches for a budget.

    Args:
        model: a :class:`~mexify.nn.MultiExitModel`.
        batches: a callable giving a fresh iterable of ``(images, masks)`` batches (called once
            per pass: temperatures, then the exit cache).
        policy: registry name or a :class:`Policy` instance.
        budget: what to fit for and how exits are costed (:class:`~mexify.calibrate.Budget`; default
            the fastest thresholds within 1.0 mIoU point of the final exit, costed by ``latency`` when
            given, else by FLOPs).
        latency: a measured latency profile (:class:`~mexify.runtime.LatencyProfile`, e.g. from
            :func:`~mexify.runtime.select_profile` on the bundle's ``latency:`` table): what
            ``budget.cost`` ``"latency"`` (the default when given) costs exits by.
        temperature: fit one temperature per exit first (needs labels).
        means_batches: labelled batches for class-means' class means (default: ``batches``).
        policy_options: keyword options of the policy (e.g. ``{"pixel_threshold": 0.95}``).
        edge_radius: boundary half-width of the cache (default: the policy's).
        device: where to run (default: where the model is).
        total: number of batches per pass, for progress.
        progress: ``callback(stage, done, total)``.

    Returns:
        a :class:`CalibrationReport` (``files`` empty: nothing is written).

    Raises:
        BudgetError: the budget is below the cheapest reachable cost.
        ConfigError: bad policy, budget or options.
    """
    timings: Dict[str, float] = {}
    notes: List[str] = []
    budget = _checked(budget)
    if budget.kind == "latency_ms" and (latency is None or budget.cost == "flops"):
        budget.max_cost(0.0, "flops")  # raises: a budget in ms needs measured latencies
    pol = policy if isinstance(policy, Policy) else build_policy(policy, **policy_options_of(policy, policy_options))
    if pol.name == "oracle":
        raise ConfigError("the oracle reads labels and cannot be deployed", "calibrate a policy such as mess; its report includes the oracle")
    radius = int(edge_radius if edge_radius is not None else getattr(pol, "edge_radius", 1))
    dev = device if device is not None else module_device(model)

    temps = _temperatures(model, pol, batches, temperature, dev, total, progress, timings, notes)
    if pol.needs_features:
        t0 = time.perf_counter()
        pairs = unpadded((means_batches or batches)())
        pol = pol.collect_means(model, pairs, model.num_classes, device=dev)
        pol.temperatures = temps
        timings["class_means_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cache = collect_cache(model, batches(), source=pol, edge_radius=radius, device=dev, total=total, progress=progress)
    timings["collect_s"] = time.perf_counter() - t0
    cache = _cost_model(cache, latency, budget.cost, notes)
    if not cache.labelled:
        notes.append(
            "no labels in the calibration split: only label-free parts were fitted; mIoU figures are agreement "
            "with the final exit's predictions, cbt ranks classes by the final exit's predictions, "
            "temperatures and the oracle are skipped"
        )
    return _fit_on_cache(pol, cache, budget, temps, timings, notes, progress)


def _cost_model(cache: ExitCache, latency: Optional[LatencyProfile], cost: Optional[str], notes: List[str]) -> ExitCache:
    """The cache costed as asked: measured latency when there is a profile (or asked), else FLOPs."""
    cost = parse_cost(cost)
    if cost == "latency" and latency is None:
        raise ConfigError("--cost latency needs a latency profile in the bundle", "run `mexify profile BUNDLE --device DEV` first, or use --cost flops")
    if latency is not None:
        cache = cache.with_latency(latency)
    if cost == "flops" or latency is None:
        cache = dataclasses.replace(cache, cost="flops")
        why = "asked" if cost == "flops" else "the bundle has no latency profile; `mexify profile` measures one"
        notes.append(f"cost model: FLOPs ({why})")
    else:
        notes.append(f"cost model: measured latency, profile {latency.key}")
    return cache


def _checked(budget: Any) -> Budget:
    """``budget`` when it is a :class:`Budget` (a string such as ``"2x"`` is refused with the way to make one)."""
    if not isinstance(budget, Budget):
        raise ConfigError(f"budget must be a Budget, not {type(budget).__name__} {budget!r}",
                          "Budget.parse('2x'), Budget.max_drop(1.0) or Budget.from_options(...) (mexify.api.Budget)")
    return budget


def _temperatures(model, pol, batches, enabled, dev, total, progress, timings, notes) -> Optional[List[float]]:
    if not enabled:
        return None
    t0 = time.perf_counter()
    temps = fit_temperatures(model, batches(), device=dev, total=total, progress=progress)
    timings["temperature_s"] = time.perf_counter() - t0
    if temps is None:
        notes.append("temperature scaling skipped: the calibration split has no labels")
    pol.temperatures = temps
    return temps


def _fit_on_cache(pol: Policy, cache: ExitCache, budget: Budget, temps: Optional[List[float]], timings: Dict[str, float],
                  notes: List[str], progress: Progress) -> CalibrationReport:
    """Search the thresholds on the cache, then the oracle and the theoretical figures beside them."""
    bounds = budget.bounds(cache.original_cost, cache.cost_unit)
    t0 = time.perf_counter()
    if progress is not None:
        progress("search", 0, 1)
    fit = pol.fit_search(cache, **bounds)
    timings["search_s"] = time.perf_counter() - t0
    if progress is not None:
        progress("search", 1, 1)
    fitted, result = fit.policy, fit.search
    figures = result.figures()
    point = _point_fit(pol, cache, budget, bounds, figures, notes)
    fitted.budget = budget.record()
    fitted.figures = {k: v for k, v in figures.items() if k != "search_seconds"}
    fitted.monitor = expected_stream(cache.exit_names, result.scores, result.assignment, fitted.thresholds)
    oracle, oracle_curve = None, []
    if cache.labelled:
        oracle, oracle_curve = oracle_at(cache, max_cost=bounds["max_cost"], min_miou=result.constraint.get("min_miou"))
    theoretical = None
    if fitted.name == "cbt":
        theoretical = pixel_level_flops(fitted, cache)
        if theoretical is not None:
            theoretical["note"] = "theoretical: settled pixels masked in later stages (ADP-C style); dense hardware does not get this"
    return CalibrationReport(
        policy=fitted, figures=figures, budget=budget, oracle=oracle, best_global=result.best_global,
        pareto=result.pareto, theoretical=theoretical, temperatures=temps, labelled=cache.labelled,
        timings=timings, notes=notes, point=point, cache=cache, search=result, oracle_curve=oracle_curve,
    )


def _point_fit(pol: Policy, cache: ExitCache, budget: Budget, bounds: Dict[str, Any], figures: Dict[str, Any],
               notes: List[str]) -> Optional[Dict[str, Any]]:
    """With a confidence: the point fit's figures on the same cache, and a note when the calibration set is too
    small to certify much of what the point fit reaches (with about how many images would)."""
    if not budget.confidence:
        return None
    point = pol.fit_search(cache, **{**bounds, "confidence": 0.0}).policy.figures
    if not budget.accuracy:
        return point
    saved, point_saved = 1.0 - figures["cost_fraction"], 1.0 - point["cost_fraction"]
    if point_saved <= 0.02 or saved >= 0.5 * point_saved:
        return point
    half = {**bounds, "confidence": 0.0, **({"max_drop": budget.value / 2} if budget.drop is not None else {"max_disagree": budget.value / 2})}
    easier = pol.fit_search(cache, **half)
    test = halves(cache.num_images)[1]  # measured as the certification measures: on its half, for a new set of every image
    risk = RiskBound(cache.subset(test), budget.confidence, new_images=cache.num_images)
    a = easier.search.assignment[test]
    value, upper = risk.drop(a) if budget.drop is not None else risk.disagreement(a)
    needed = images_to_certify(cache.num_images, value, upper, budget.value)
    more = (f"; about {needed} calibration images would certify the {easier.policy.figures['speedup']:.2f}x that the point fit reaches "
            f"within half the budget" if needed and needed > cache.num_images else "")
    notes.append(f"{cache.num_images} calibration images certify {budget.claim} only up to {figures['speedup']:.2f}x: the point fit "
                 f"reaches {point['speedup']:.2f}x on these images, but so close to the budget that new images would break it too "
                 f"often{more}")
    return point
