"""Dataset spec strings: ``scheme:target[?key=value&...]``.

Examples: ``synthetic:scenes?classes=8&size=128``, ``voc:/data/VOCdevkit/VOC2012``,
``cityscapes:/data/cityscapes?split=val``, ``ade20k:/data/ADEChallengeData2016``,
``folder:/data/my_set``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Mapping, Optional
from urllib.parse import parse_qsl

from mexify.config import parse_size
from mexify.errors import ConfigError, DataError, nearest

__all__ = ["DatasetSpec", "parse_spec", "OptionReader"]


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec string."""

    scheme: str
    target: str
    options: Mapping[str, str] = field(default_factory=dict)
    text: str = ""

    def __str__(self) -> str:
        return self.text or f"{self.scheme}:{self.target}"


def parse_spec(spec: str, schemes: Iterable[str]) -> DatasetSpec:
    """Split ``scheme:target?k=v&k=v`` into its parts.

    Args:
        spec: the spec string.
        schemes: the valid schemes (for the error message).

    Returns:
        A :class:`DatasetSpec`.

    Raises:
        DataError: malformed string or unknown scheme (the valid ones are listed).
    """
    schemes = list(schemes)
    valid = ", ".join(f"{s}:" for s in schemes)
    if not isinstance(spec, str) or ":" not in spec:
        raise DataError(
            f"dataset spec {spec!r} has no scheme",
            f"write it as SCHEME:TARGET with SCHEME one of {valid} e.g. synthetic:scenes or voc:/data/VOC2012",
        )
    scheme, rest = spec.split(":", 1)
    scheme = scheme.strip().lower()
    if scheme not in schemes:
        close = nearest(scheme, schemes, n=1)
        raise DataError(
            f"unknown dataset scheme {scheme!r} in {spec!r}",
            f"valid schemes: {valid}" + (f" (did you mean {close[0]}:?)" if close else ""),
        )
    target, _, query = rest.partition("?")
    options: Dict[str, str] = {}
    if query:
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
            options[key.strip()] = value.strip()
        if not options:
            raise DataError(f"cannot read the options {query!r} in dataset spec {spec!r}", "write them as ?key=value&key=value")
    return DatasetSpec(scheme=scheme, target=target, options=options, text=spec)


_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n", ""}


class OptionReader:
    """Typed access to a spec's options; unknown keys are reported with the nearest valid key."""

    def __init__(self, spec: DatasetSpec, valid: Iterable[str]):
        self.spec = spec
        self.valid = list(valid)
        self._opts = dict(spec.options)
        unknown = [k for k in self._opts if k not in self.valid]
        if unknown:
            k = unknown[0]
            close = nearest(k, self.valid, n=1)
            raise DataError(
                f"unknown option {k!r} in dataset spec {str(spec)!r}",
                (f"did you mean {close[0]!r}? " if close else "") + "valid options: " + ", ".join(self.valid),
            )

    def has(self, key: str) -> bool:
        return key in self._opts

    def get(self, key: str, default: Any, conv: Callable[[str], Any] = str) -> Any:
        if key not in self._opts:
            return default
        raw = self._opts[key]
        try:
            return conv(raw)
        except (TypeError, ValueError, ConfigError) as e:
            what = getattr(conv, "__name__", "value")
            raise DataError(
                f"option {key}={raw!r} in dataset spec {str(self.spec)!r} is not a valid {what}",
                f"e.g. {key}={default}" if default is not None else f"give {key} a valid {what}",
            ) from e

    def size(self, key: str, default: Any) -> Any:
        """``512`` -> 512 (the longer side); ``512x1024`` -> (512, 1024) as (H, W)."""
        return self.get(key, default, _size)

    def int(self, key: str, default: Optional[int], lo: Optional[int] = None) -> Optional[int]:
        v = self.get(key, default, int)
        if v is not None and lo is not None and v < lo:
            raise DataError(f"option {key}={v} in dataset spec {str(self.spec)!r} must be >= {lo}", f"e.g. {key}={default if default is not None else lo}")
        return v

    def float(self, key: str, default: float, lo: float = float("-inf"), hi: float = float("inf")) -> float:
        v = self.get(key, default, _finite)
        if not lo <= v <= hi:
            raise DataError(f"option {key}={v} in dataset spec {str(self.spec)!r} must lie in [{lo}, {hi}]", f"e.g. {key}={default}")
        return v

    def bool(self, key: str, default: bool) -> bool:
        if key not in self._opts:
            return default
        raw = self._opts[key].lower()
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        raise DataError(f"option {key}={raw!r} in dataset spec {str(self.spec)!r} is not a boolean", f"use {key}=1 or {key}=0")

    def choice(self, key: str, default: str, choices: Iterable[str]) -> str:
        choices = list(choices)
        v = self.get(key, default, str)
        if v not in choices:
            raise DataError(f"option {key}={v!r} in dataset spec {str(self.spec)!r} is not one of {', '.join(choices)}", f"e.g. {key}={default}")
        return v


def _finite(raw: str) -> float:
    v = float(raw)
    if not math.isfinite(v):
        raise ValueError(raw)
    return v


_finite.__name__ = "number"


def _size(raw: str) -> Any:
    return parse_size(raw, "size", single="int")


_size.__name__ = "size (N or HxW)"
