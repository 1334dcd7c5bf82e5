"""Budgets: ``--budget 2x`` or ``40%`` as a mean-cost bound."""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

from mexify.errors import ConfigError

__all__ = ["parse_budget", "budget_max_cost"]


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
