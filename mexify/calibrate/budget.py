"""Budgets: ``--budget 2x``, ``40%`` or ``8ms`` as a mean-cost bound."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Union

from mexify.errors import ConfigError

__all__ = ["parse_budget", "parse_max_drop", "parse_cost", "budget_max_cost", "COST_MODELS", "MIN_CALIBRATION_IMAGES",
           "small_set_note"]

COST_MODELS = ("latency", "flops")
MIN_CALIBRATION_IMAGES = 50
"""Below this many calibration images, thresholds fitted for a budget are noise more than a fit."""


def parse_budget(text: Union[str, float, None]) -> Optional[Dict[str, Any]]:
    """``"2x"`` -> mean speed-up >= 2; ``"40%"`` -> mean cost <= 40% of the original;
    ``"8ms"`` -> mean measured latency per image <= 8 ms (needs a latency profile).

    Returns:
        ``{"kind": "speedup" | "cost_fraction" | "latency_ms", "value": float, "text": str}`` or None.

    Raises:
        ConfigError: anything else.
    """
    if text is None:
        return None
    s = str(text).strip().lower().replace(" ", "")
    for suffix, kind, scale, top in (("ms", "latency_ms", 1.0, math.inf), ("x", "speedup", 1.0, math.inf),
                                     ("%", "cost_fraction", 0.01, 100.0)):
        if s.endswith(suffix):
            try:
                v = float(s[: -len(suffix)])
            except ValueError:
                break
            if math.isfinite(v) and 0 < v <= top:
                return {"kind": kind, "value": v * scale, "text": s}
            raise ConfigError(f"budget {text!r} is out of range", "a speed-up or latency above 0 (2x, 8ms), "
                              "or a cost share in (0, 100]% (40%)")
    raise ConfigError(f"cannot read budget {text!r}", "write a speed-up like 2x, a cost share like 40% or a latency like 8ms")


def parse_max_drop(value: Union[str, float, None]) -> Optional[float]:
    """The accuracy budget ``--max-drop``: mIoU points (0 to 100) the policy may lose against the final exit.

    Raises:
        ConfigError: not a number, not finite, negative or above 100.
    """
    if value is None:
        return None
    try:
        v = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ConfigError(f"--max-drop {value!r} is not a number", "give mIoU points, e.g. --max-drop 1.0") from None
    if not (math.isfinite(v) and 0.0 <= v <= 100.0):
        raise ConfigError(f"--max-drop {value!r} is out of range", "give mIoU points from 0 to 100, e.g. --max-drop 1.0")
    return v


def parse_cost(value: Optional[str]) -> Optional[str]:
    """The cost model: ``latency`` (measured, needs a profile) or ``flops``; None: decided later."""
    if value is None:
        return None
    if value not in COST_MODELS:
        raise ConfigError(f"unknown cost model {value!r}", "use --cost latency or --cost flops")
    return value


def small_set_note(images: int) -> Optional[str]:
    """A warning when a calibration set is too small to fit a budget on (fewer than :data:`MIN_CALIBRATION_IMAGES`)."""
    if images >= MIN_CALIBRATION_IMAGES:
        return None
    return (f"only {images} calibration image{'s' if images != 1 else ''}: thresholds fitted on so few are unreliable "
            f"for any budget; calibrate on {MIN_CALIBRATION_IMAGES} or more (a larger split or --limit)")


def budget_max_cost(budget: Dict[str, Any], original_cost: float, unit: str = "flops") -> float:
    """The budget as a bound on the mean cost, in the cost model's unit (``flops`` or ``ms``).

    Raises:
        ConfigError: a budget in milliseconds with a FLOPs cost model.
    """
    if budget["kind"] == "latency_ms":
        if unit != "ms":
            raise ConfigError(
                f"a budget of {budget['text']} needs measured latencies, and this calibration counts FLOPs",
                "run `mexify profile BUNDLE --device DEV` first (then calibrate with --cost latency), or give 2x / 40%",
            )
        return float(budget["value"])
    if budget["kind"] == "speedup":
        return float(original_cost) / budget["value"]
    return float(original_cost) * budget["value"]
