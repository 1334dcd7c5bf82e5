"""Budgets: ``--budget 2x``, ``40%`` or ``8ms`` as a mean-cost bound."""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

from mexify.errors import ConfigError

__all__ = ["parse_budget", "budget_max_cost"]


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
    try:
        if s.endswith("ms"):
            v = float(s[:-2])
            if v <= 0:
                raise ValueError
            return {"kind": "latency_ms", "value": v, "text": s}
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
    raise ConfigError(f"cannot read budget {text!r}", "write a speed-up like 2x, a cost share like 40% or a latency like 8ms")


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
