"""Calibration: collect an exit cache once, then fit a policy's thresholds for a budget.

``(model, batches) -> fitted Policy``: :mod:`~mexify.calibrate.cache` (one pass, per-image
statistics), :mod:`~mexify.calibrate.search` (thresholds on the cache),
:mod:`~mexify.calibrate.temperature`, :mod:`~mexify.calibrate.budget`, :mod:`~mexify.calibrate.risk` (bounds on new images), and
:func:`~mexify.calibrate.fit.fit_policy`, which composes them; :func:`~mexify.calibrate.compare.compare_policies`
fits every policy on one split and judges it on another.
"""
from mexify.calibrate.budget import (BUDGET_KINDS, COST_MODELS, MIN_CALIBRATION_IMAGES, Budget, parse_budget, parse_cost, parse_max_disagree,
                                     parse_max_drop, small_set_note)
from mexify.calibrate.cache import ExitCache, collect_cache
from mexify.calibrate.configure import ConfigurationReport, apply_configuration, search_configuration
from mexify.calibrate.compare import PolicyComparison, comparable_policies, compare_policies
from mexify.calibrate.fit import CalibrationReport, fit_policy
from mexify.calibrate.risk import DEFAULT_CONFIDENCE, RiskBound, images_to_certify, parse_confidence
from mexify.calibrate.search import SearchResult, oracle_at, search_thresholds
from mexify.calibrate.temperature import fit_temperatures

__all__ = [
    "Budget",
    "BUDGET_KINDS",
    "ExitCache",
    "SearchResult",
    "CalibrationReport",
    "collect_cache",
    "fit_temperatures",
    "fit_policy",
    "compare_policies",
    "search_configuration",
    "apply_configuration",
    "ConfigurationReport",
    "comparable_policies",
    "PolicyComparison",
    "parse_budget",
    "parse_max_drop",
    "parse_max_disagree",
    "parse_confidence",
    "RiskBound",
    "images_to_certify",
    "DEFAULT_CONFIDENCE",
    "parse_cost",
    "small_set_note",
    "COST_MODELS",
    "MIN_CALIBRATION_IMAGES",
    "search_thresholds",
    "oracle_at",
]
