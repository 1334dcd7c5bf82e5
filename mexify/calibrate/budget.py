"""Budgets: what a calibration fits thresholds for (``--budget 2x``, ``40%``, ``8ms`` or ``--max-drop 1.0``)
and how it costs exits (``--cost``, ``--profile``), as one :class:`Budget`."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Union

from mexify.calibrate.risk import DEFAULT_CONFIDENCE, parse_confidence
from mexify.config import ACCURACY_BUDGETS, BUDGET_KINDS, within_budget
from mexify.errors import ConfigError

__all__ = ["Budget", "BUDGET_KINDS", "parse_budget", "parse_max_drop", "parse_max_disagree", "parse_cost", "COST_MODELS", "MIN_CALIBRATION_IMAGES",
           "small_set_note"]

COST_MODELS = ("latency", "flops")

MIN_CALIBRATION_IMAGES = 50
"""Below this many calibration images, thresholds fitted for a budget are noise more than a fit."""


def parse_budget(text: Union[str, float, None]) -> Optional[Dict[str, Any]]:
    """``"2x"`` -> mean speed-up >= 2; ``"40%"`` -> mean cost <= 40% of the original;
    ``"8ms"`` -> mean measured latency per image <= 8 ms (needs a latency profile);
    ``"250/s"`` -> a throughput of at least 250 images per second served with full batches: mean measured
    latency per image <= 4 ms at the largest profiled batch size (``batched``; the stage scheduler keeps
    every stage's batches full under load, so a batch-B profile's per-image cost is what it spends).

    Returns:
        ``{"kind": "speedup" | "cost_fraction" | "latency_ms", "value": float, "text": str}`` (plus
        ``"batched": True`` for a throughput) or None.

    Raises:
        ConfigError: anything else.
    """
    if text is None:
        return None
    s = str(text).strip().lower().replace(" ", "")
    for suffix in ("img/s", "/s"):
        if s.endswith(suffix):
            try:
                v = float(s[: -len(suffix)])
            except ValueError:
                break
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"budget {text!r} is out of range", "a throughput above 0 images per second, e.g. 250/s")
            return {"kind": "latency_ms", "value": 1000.0 / v, "text": f"{v:g}/s", "batched": True}
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
    raise ConfigError(f"cannot read budget {text!r}",
                      "write a speed-up like 2x, a cost share like 40%, a latency like 8ms or a throughput like 250/s")


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


def parse_max_disagree(value: Union[str, float, None]) -> Optional[float]:
    """The label-free accuracy budget ``--max-disagree``: the share of pixels whose class may differ from the
    final exit's, as a percentage (``2%``) or a fraction (``0.02``); returns the fraction in (0, 1].

    Raises:
        ConfigError: not a number, not finite, at most 0, above 100% (or a bare number above 1).
    """
    if value is None:
        return None
    text = value.strip() if isinstance(value, str) else value
    percent = isinstance(text, str) and text.endswith("%")
    try:
        v = float(text[:-1] if percent else text) * (0.01 if percent else 1.0)
    except (TypeError, ValueError):
        raise ConfigError(f"--max-disagree {value!r} is not a share of pixels", "e.g. --max-disagree 2% (or 0.02)") from None
    if not (math.isfinite(v) and 0.0 < v <= 1.0):
        raise ConfigError(f"--max-disagree {value!r} is out of range",
                          "a share of pixels above 0 and at most 100%, e.g. --max-disagree 2% (a bare number is a fraction: 0.02)")
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


@dataclasses.dataclass(frozen=True)
class Budget:
    """What a calibration fits for, and how it costs exits: one value for ``calibrate``, ``search`` and ``compare``.

    A *cost* budget (``speedup``, ``cost_fraction``, ``latency_ms``) asks for the most accurate thresholds
    within a mean cost; an *accuracy* budget (``max_drop``, the default: 1.0 point; or ``max_disagree``,
    which needs no labels) for the cheapest thresholds within ``value`` of the final exit.

    With a ``confidence`` (the default, 0.9) the budget is a promise about *new* images drawn like the
    calibration images: the fitted configuration keeps its drop (or mean cost) within the budget on a new
    set as large as the calibration set with at least that probability (:mod:`mexify.calibrate.risk`).
    ``confidence=0`` is the point fit: within the budget on the calibration images themselves.

    Attributes:
        kind: ``"speedup"`` (mean speed-up >= value), ``"cost_fraction"`` (mean cost <= value x the
            original's, in (0, 1]), ``"latency_ms"`` (mean measured ms per image <= value; needs a latency
            profile), ``"max_drop"`` (mIoU points, 0 to 100, against the labels, or against the final exit's
            masks where there are none) or ``"max_disagree"`` (share of pixels, in (0, 1], whose class differs
            from the final exit's; needs no labels).
        value: the bound, in the kind's unit.
        cost: what the search minimises, ``"latency"`` (a measured profile) or ``"flops"``; None: latency
            when the bundle has a latency profile, else FLOPs.
        profile: part of a latency-profile key (``"cpu|b1"``, ``"H100|b8|bfloat16"``); None: the profile of
            the calibration device at batch 1, float32 where there is one.
        confidence: the probability, in [0, 1), that the budget holds on a new set of images as large as the
            calibration set (default 0.9); 0 (or None) fits on the calibration images alone.
        text: how the budget reads in reports (``"2x"``, ``"max-drop 1.0"``); filled in when left empty.
        batched: cost exits at full batches: without ``profile``, the profile of the largest batch size on the
            calibration device (a throughput budget, ``"250/s"``, is a ``latency_ms`` budget costed this way).

    Build one with :meth:`parse` (``"2x"``, ``"40%"``, ``"8ms"``), :meth:`max_drop`, :meth:`from_options`
    (the command line's ``--budget``/``--max-drop``/``--cost``/``--profile``) or :meth:`from_dict`;
    change one with ``dataclasses.replace``.

    Raises:
        ConfigError: an unknown kind or cost model, a value out of the kind's range, or a confidence.
    """

    kind: str = "max_drop"
    value: float = 1.0
    cost: Optional[str] = None
    profile: Optional[str] = None
    confidence: Optional[float] = DEFAULT_CONFIDENCE
    text: str = ""
    batched: bool = False

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ConfigError(f"unknown budget kind {self.kind!r}", f"use one of {', '.join(BUDGET_KINDS)}")
        if self.kind == "max_drop":
            value = parse_max_drop(self.value)
        elif self.kind == "max_disagree":
            value = parse_max_disagree(self.value)
        else:
            value = _cost_bound(self.kind, self.value)
        object.__setattr__(self, "value", float(value))
        parse_cost(self.cost)
        if self.profile is not None and not isinstance(self.profile, str):
            raise ConfigError(f"profile {self.profile!r} is not text", "give part of a latency-profile key, e.g. 'cpu|b1'")
        object.__setattr__(self, "confidence", parse_confidence(self.confidence))
        if not self.text:
            object.__setattr__(self, "text", _text(self.kind, self.value))

    # ------------------------------------------------------------------ building
    @classmethod
    def parse(cls, text: Union[str, float], *, cost: Optional[str] = None, profile: Optional[str] = None,
              confidence: Optional[float] = DEFAULT_CONFIDENCE) -> "Budget":
        """A cost budget from ``"2x"``, ``"40%"`` or ``"8ms"`` (:func:`parse_budget`)."""
        return cls(**parse_budget(text), cost=cost, profile=profile, confidence=confidence)

    @classmethod
    def max_drop(cls, points: Union[str, float], *, cost: Optional[str] = None, profile: Optional[str] = None,
                 confidence: Optional[float] = DEFAULT_CONFIDENCE) -> "Budget":
        """An accuracy budget: the cheapest thresholds within ``points`` mIoU points of the final exit."""
        return cls("max_drop", parse_max_drop(points), cost=cost, profile=profile, confidence=confidence)

    @classmethod
    def max_disagree(cls, share: Union[str, float], *, cost: Optional[str] = None, profile: Optional[str] = None,
                     confidence: Optional[float] = DEFAULT_CONFIDENCE) -> "Budget":
        """A label-free accuracy budget: the cheapest thresholds whose masks differ from the final exit's on at
        most ``share`` of the pixels (``"2%"`` or ``0.02``)."""
        return cls("max_disagree", parse_max_disagree(share), cost=cost, profile=profile, confidence=confidence)

    @classmethod
    def from_options(cls, budget: Optional[str] = None, max_drop: Optional[float] = None, cost: Optional[str] = None,
                     profile: Optional[str] = None, max_disagree: Union[str, float, None] = None,
                     confidence: Union[str, float, None] = DEFAULT_CONFIDENCE) -> "Budget":
        """The budget the command line's ``--budget`` / ``--max-drop`` / ``--max-disagree`` (at most one; none:
        ``max-drop 1.0``), ``--cost``, ``--profile`` and ``--confidence`` give."""
        given = [f"--{n}" for n, v in (("budget", budget), ("max-drop", max_drop), ("max-disagree", max_disagree)) if v is not None]
        if len(given) > 1:
            raise ConfigError(f"give one of --budget, --max-drop and --max-disagree, not {' and '.join(given)}",
                              "e.g. --budget 2x, --max-drop 1.0 or --max-disagree 2%")
        conf = parse_confidence(confidence)
        if budget is not None:
            return cls(**parse_budget(budget), cost=cost, profile=profile, confidence=conf)
        if max_disagree is not None:
            return cls.max_disagree(max_disagree, cost=cost, profile=profile, confidence=conf)
        return cls.max_drop(1.0 if max_drop is None else max_drop, cost=cost, profile=profile, confidence=conf)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Budget":
        """Inverse of :meth:`to_dict` (also reads a fitted policy's ``budget`` record); a record without a
        confidence is a point fit (confidence 0), as every record written before confidences were."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a budget must be a mapping, got {type(data).__name__}")
        data = {"confidence": 0.0, **data}
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown budget field(s) {', '.join(sorted(unknown))}",
                              "fields: kind, value, cost, profile, confidence, text, batched")
        return cls(**data)

    # ------------------------------------------------------------------ reading
    def to_dict(self) -> Dict[str, Any]:
        """Plain form: :meth:`record` plus the cost model and the profile when set."""
        out = self.record()
        out.update({k: v for k, v in (("cost", self.cost), ("profile", self.profile)) if v is not None})
        return out

    def record(self) -> Dict[str, Any]:
        """What a fitted policy (in the bundle) and the reports keep: ``kind``, ``value``, ``text``."""
        out: Dict[str, Any] = {"kind": self.kind, "value": float(self.value), "text": self.text}
        if self.confidence:
            out["confidence"] = float(self.confidence)
        if self.batched:
            out["batched"] = True
        return out

    @property
    def drop(self) -> Optional[float]:
        """The mIoU points a ``max_drop`` budget allows (None for other kinds)."""
        return self.value if self.kind == "max_drop" else None

    @property
    def disagree(self) -> Optional[float]:
        """The share of pixels a ``max_disagree`` budget lets differ from the final exit's (None for other kinds)."""
        return self.value if self.kind == "max_disagree" else None

    @property
    def accuracy(self) -> bool:
        """True for an accuracy budget (``max_drop``, ``max_disagree``): the cheapest thresholds within it."""
        return self.kind in ACCURACY_BUDGETS

    @property
    def claim(self) -> str:
        """What the budget promises, in words: ``"max-drop 1.0 at 90% confidence on new images"``."""
        if not self.confidence:
            return f"{self.text} on the calibration images (point fit)"
        return f"{self.text} at {100 * self.confidence:g}% confidence on new images like the calibration images"

    def held(self, figures: Mapping[str, Any]) -> Optional[bool]:
        """Whether figures measured on some images (a test split, a benchmark) are within the budget: the drop
        (``drop``), the disagreement (``disagreement``), the speed-up (``speedup``), the cost share
        (``cost_fraction``) or the latency (``mean_ms``); None when the figure it needs is missing."""
        key = {"max_drop": "drop", "max_disagree": "disagreement", "speedup": "speedup", "cost_fraction": "cost_fraction",
               "latency_ms": "mean_ms"}[self.kind]
        v = figures.get(key)
        if v is None or not math.isfinite(float(v)):
            return None
        return within_budget(self.kind, self.value, float(v))

    def max_cost(self, original_cost: float, unit: str = "flops") -> Optional[float]:
        """The budget as a bound on the mean cost, in the cost model's unit (``flops`` or ``ms``); None for
        an accuracy budget.

        Raises:
            ConfigError: a budget in milliseconds with a FLOPs cost model.
        """
        if self.accuracy:
            return None
        if self.kind == "latency_ms":
            if unit != "ms":
                raise ConfigError(
                    f"a budget of {self.text} needs measured latencies, and this calibration counts FLOPs",
                    "run `mexify profile BUNDLE --device DEV` first (then calibrate with --cost latency), or give 2x / 40%",
                )
            return float(self.value)
        if self.kind == "speedup":
            return float(original_cost) / self.value
        return float(original_cost) * self.value

    def bounds(self, original_cost: float, unit: str = "flops") -> Dict[str, Optional[float]]:
        """The keywords of a threshold search (:meth:`mexify.policies.Policy.fit`): ``max_cost``, ``max_drop``,
        ``max_disagree`` and ``confidence``."""
        return {"max_cost": self.max_cost(original_cost, unit), "max_drop": self.drop, "max_disagree": self.disagree,
                "confidence": float(self.confidence or 0.0)}


def _cost_bound(kind: str, value: Any) -> float:
    """A cost budget's value checked: finite, above 0, a cost share at most 1."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"budget value {value!r} is not a number", "e.g. Budget.parse('2x')") from None
    if not (math.isfinite(v) and 0 < v <= (1.0 if kind == "cost_fraction" else math.inf)):
        raise ConfigError(f"budget {_text(kind, v) if math.isfinite(v) else value!r} is out of range",
                          "a speed-up or latency above 0 (2x, 8ms), or a cost share in (0, 100]% (40%)")
    return v


def _text(kind: str, value: float) -> str:
    if kind == "max_drop":
        return f"max-drop {float(value)}"
    if kind == "max_disagree":
        return f"max-disagree {100 * value:g}%"
    if kind == "cost_fraction":
        return f"{100 * value:g}%"
    return f"{value:g}{'ms' if kind == 'latency_ms' else 'x'}"
