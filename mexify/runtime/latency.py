"""A latency profile: what ``mexify profile`` measured of every stage, head, decision and mask.

One record, :class:`LatencyProfile`, from the measurement (:func:`mexify.tools.profile_latency`)
through the calibration's cost model (:class:`mexify.calibrate.ExitCache`), the configuration search
and ``mexify eval``'s prediction; a bundle keeps it as a plain mapping in its ``latency:`` table
(:meth:`LatencyProfile.to_dict` / :meth:`LatencyProfile.from_dict`, keyed by :func:`profile_key`), and
:func:`select_profile` reads the one a calibration costs exits by.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mexify.config import json_safe
from mexify.errors import ConfigError, DataError
from mexify.runtime.costs import exit_ms_per_image, original_ms_per_image

__all__ = ["LatencyProfile", "profile_key", "select_profile"]


def profile_key(device: str, batch_size: int, dtype: str, size: Tuple[int, int], mode: str = "eager") -> str:
    """How a profile is filed in the bundle: ``"<device name>|b<batch>|<dtype>|<H>x<W>|<eager|graphs>"``."""
    return f"{device}|b{int(batch_size)}|{dtype}|{int(size[0])}x{int(size[1])}|{mode}"


@dataclasses.dataclass(frozen=True)
class LatencyProfile:
    """Milliseconds per batch of ``batch_size`` for each stage, early head and policy step (exit order).

    ``filed_as`` is the key the bundle's table files it under (:attr:`key`; the bundle does not
    repeat it inside the entry).
    """

    device: str
    batch_size: int
    dtype: str
    input_size: Tuple[int, int]
    stage_ms: List[float]
    head_ms: List[float]
    policy_ms: Optional[List[float]]
    warmup: int
    repeats: int
    exit_names: List[str] = dataclasses.field(default_factory=list)
    flops_to_exit: List[int] = dataclasses.field(default_factory=list)  # every head on the way, 1 multiply-add = 1 FLOP
    original_flops: int = 0
    original_ms: Optional[float] = None  # the model's plain forward and its masks: every stage, no head
    mask_ms: Optional[List[float]] = None  # masks of the batch at each exit (resize to the input, argmax)
    mode: str = "eager"  # or "graphs": each stage, head and decision replayed from a CUDA graph
    # bundles with head candidates (convert --heads): every candidate's time, by exit name (calibrate --search)
    candidate_head_ms: Optional[Dict[str, List[float]]] = None
    filed_as: str = dataclasses.field(default="", compare=False)

    @property
    def key(self) -> str:
        """The key it is filed under in a bundle's ``latency:`` table."""
        return self.filed_as or profile_key(self.device, self.batch_size, self.dtype, self.input_size, self.mode)

    @property
    def num_exits(self) -> int:
        return len(self.stage_ms)

    def exit_ms(self, active: Sequence[int]) -> List[float]:
        """Milliseconds per image to leave at each exit when the ``active`` exits' heads run
        (:func:`mexify.runtime.exit_ms_per_image`)."""
        return exit_ms_per_image(self.to_dict(), active)

    def original_ms_per_image(self) -> float:
        """The original model's milliseconds per image from the same pieces (:func:`mexify.runtime.original_ms_per_image`)."""
        return original_ms_per_image(self.to_dict())

    def to_exit_ms(self) -> List[float]:
        """Time per batch to leave at each exit, every head (and policy step) on the way, masks aside."""
        pieces = {"batch_size": 1, "stage_ms": self.stage_ms, "head_ms": self.head_ms, "policy_ms": self.policy_ms}
        return exit_ms_per_image(pieces, range(len(self.stage_ms)))

    def to_dict(self) -> Dict[str, Any]:
        """The bundle's form: every field but ``filed_as`` (the table's key)."""
        d = dataclasses.asdict(self)
        d.pop("filed_as")
        d["input_size"] = list(self.input_size)
        return json_safe(d)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], key: str = "") -> "LatencyProfile":
        """A profile from one entry of a bundle's ``latency:`` table, filed under ``key``.

        Entries written by hand (or by an older mexify) may leave out what was not measured: the
        device, dtype and input size read as unknown, warm-up and repeats as 0.

        Raises:
            DataError: not a mapping, an unknown field, or no ``stage_ms`` / ``head_ms``.
        """
        where = f"latency profile {key!r}" if key else "latency profile"
        if not isinstance(data, Mapping):
            raise DataError(f"{where} is not a mapping", "profile the bundle again: `mexify profile BUNDLE`")
        names = {f.name for f in dataclasses.fields(cls)} - {"filed_as"}
        unknown = sorted(set(data) - names - {"key"})
        if unknown:
            raise DataError(f"{where} has unknown field(s) {', '.join(unknown)}", "profile the bundle again: `mexify profile BUNDLE`")
        missing = [n for n in ("stage_ms", "head_ms") if n not in data]
        if missing:
            raise DataError(f"{where} misses {', '.join(missing)}", "profile the bundle again: `mexify profile BUNDLE`")
        values = {"device": "", "batch_size": 1, "dtype": "", "input_size": (0, 0), "policy_ms": None, "warmup": 0, "repeats": 0}
        values.update({k: v for k, v in data.items() if k in names})
        values["input_size"] = tuple(int(v) for v in values["input_size"])
        return cls(**values, filed_as=str(key or data.get("key") or ""))


def select_profile(table: Optional[Mapping[str, Any]], want: Optional[str] = None,
                   device: Optional[str] = None, largest_batch: bool = False) -> Optional[LatencyProfile]:
    """The latency profile a calibration costs exits by, from a bundle's ``latency:`` table.

    Args:
        table: ``config.latency`` (key -> profile mapping).
        want: part of a key (``"H100|b8|bfloat16"``); the single match is taken.
        device: without ``want``, prefer this device name (``"cpu"``, a GPU's name), batch 1, float32.
        largest_batch: prefer the largest batch size instead of batch 1 (the stage scheduler's full batches).

    Returns:
        the :class:`LatencyProfile` (its ``key`` the table's), or None when the table is empty and
        nothing is asked.

    Raises:
        ConfigError: ``want`` matches no key or several.
    """
    table = dict(table or {})
    if want:
        hits = [k for k in table if want in k]
        if len(hits) != 1:
            keys = ", ".join(table) or "none (run `mexify profile BUNDLE` first)"
            raise ConfigError(
                f"{'no' if not hits else len(hits)} latency profiles match {want!r}",
                f"profiles in the bundle: {keys}",
            )
        return LatencyProfile.from_dict(table[hits[0]], hits[0])
    if not table:
        return None

    def rank(key: str) -> tuple:
        p = table[key]
        b = int(p.get("batch_size", 1))
        return (p.get("device") != device, -b if largest_batch else b != 1, p.get("dtype") != "float32", key)

    key = min(table, key=rank)
    return LatencyProfile.from_dict(table[key], key)
