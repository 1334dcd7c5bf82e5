"""Frozen config records and their YAML round-trip.

Configs are frozen dataclasses changed with :func:`dataclasses.replace`, never mutated.
``from_dict`` rejects unknown keys and names the nearest valid one.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple, Type, TypeVar

from mexify.errors import ConfigError, nearest

__all__ = [
    "SCHEMA_VERSION",
    "EXPORT_SCHEMA",
    "IGNORE_INDEX",
    "HeadConfig",
    "TraceConfig",
    "ExitConfig",
    "BundleConfig",
    "from_mapping",
    "json_safe",
    "parse_size",
]

SCHEMA_VERSION = 1
EXPORT_SCHEMA = 1
"""Version of an exported bundle's ``export:`` manifest (``mexify export``)."""

IGNORE_INDEX = 255
"""Label value of unlabelled pixels, in every dataset, metric and loss."""

T = TypeVar("T")


def from_mapping(cls: Type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with a "did you mean"."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = nearest(str(key), names, n=1)
            raise ConfigError(
                f"unknown key {key!r} in {where or cls.__name__}",
                f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(names)}",
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            if isinstance(value, list) and _is_tuple_type(f.type):
                value = tuple(value)
            kwargs[f.name] = value
    return cls(**kwargs)


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by None (JSON and YAML readers elsewhere reject inf/nan)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def parse_size(text: Any, what: str = "size", single: str = "square") -> Any:
    """Read a size: ``"512x1024"`` or ``[512, 1024]`` -> ``(512, 1024)`` as (H, W).

    Args:
        text: a string ``HxW`` / ``N``, an int, or a 2-sequence.
        what: the option's name, for the error message.
        single: what one number means: ``"square"`` gives ``(N, N)``; ``"int"`` keeps ``N``
            (the dataset options' "longer side").

    Raises:
        ConfigError: anything that is not one or two positive integers.
    """
    try:
        if isinstance(text, str):
            parts = text.strip().lower().replace("\u00d7", "x").split("x")
        elif isinstance(text, (list, tuple)):
            parts = list(text)
        else:
            parts = [text]
        if isinstance(text, bool) or len(parts) not in (1, 2):
            raise ValueError
        values = tuple(int(p) for p in parts)
        if any(v <= 0 for v in values) or any(isinstance(p, float) and p != int(p) for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {text!r} is not HxW or N", f"write {what} like 512x1024 or 512") from None
    if len(values) == 2:
        return values
    return (values[0], values[0]) if single == "square" else values[0]


def _is_tuple_type(tp: Any) -> bool:
    return "Tuple" in str(tp) or "tuple" in str(tp)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    return obj


class _Record:
    def to_dict(self) -> dict:
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        return from_mapping(cls, data)


@dataclasses.dataclass(frozen=True)
class HeadConfig(_Record):
    """An exit head from the search space.

    ``fcn``: 3x3 conv-BN-ReLU (``width`` channels, 0 = in_channels // 4), dropout, 1x1 classifier
    (the uniform baseline). ``mess``: 1x1 reduction to ``width`` (0 = the widest head within 3% of
    the model's FLOPs, resolved at conversion), ``blocks`` 3x3 conv-BN-ReLU blocks
    with ``dilation``, optional light ASPP with ``aspp_rates``, dropout, 1x1 classifier.
    Every head upsamples its logits bilinearly to the input resolution.
    """

    template: str = "mess"
    width: int = 0
    blocks: int = 1
    dilation: int = 1
    aspp_rates: Tuple[int, ...] = ()
    dropout: float = 0.1

    def __post_init__(self):
        if self.template not in ("fcn", "mess"):
            raise ConfigError(f"unknown head template {self.template!r}", "use 'mess' or 'fcn'")
        if not 0 <= self.blocks <= 4:
            raise ConfigError(f"head blocks={self.blocks} is out of range", "use 0 to 4 blocks")
        if self.width < 0:
            raise ConfigError(f"head width={self.width} is invalid", "use a positive channel count (0 = automatic)")
        if self.dilation < 1 or any(int(r) < 1 for r in self.aspp_rates):
            raise ConfigError("head dilation and ASPP rates must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head dropout={self.dropout} is out of range", "use 0 <= dropout < 1")
        object.__setattr__(self, "aspp_rates", tuple(int(r) for r in self.aspp_rates))


@dataclasses.dataclass(frozen=True)
class TraceConfig(_Record):
    """How a model is traced: leaf modules, autowrapped functions and the profiling input size."""

    input_size: Tuple[int, int] = (512, 512)
    leaf_modules: Tuple[str, ...] = ()
    autowrap_functions: Tuple[str, ...] = ()
    method: str = "auto"  # "auto" (fx, then export), "fx", or "export"
    # torch.export only: which dimensions stayed dynamic, "batch+spatial" or "batch" (spatial sizes
    # fixed at input_size); "" = try in that order. Recorded by convert so loading repeats it.
    export_shapes: str = ""


@dataclasses.dataclass(frozen=True)
class ExitConfig(_Record):
    """One early exit: where it attaches, what it sees, and its head."""

    name: str
    in_channels: int
    stride: float
    head: HeadConfig
    stage_flops: int = 0
    head_flops: int = 0
    # values alive after this exit -> how each follows the batch (none, dim:k, int, size:k);
    # None in bundles written before mexify recorded it: then tensors are sliced along dim 0
    batch_dims: Optional[dict] = None
    # head candidates (``convert --heads``) until ``calibrate --search`` keeps one: their configs and
    # FLOPs; ``head`` is candidate ``chosen``
    candidates: Optional[Tuple[HeadConfig, ...]] = None
    candidate_flops: Optional[Tuple[int, ...]] = None
    chosen: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExitConfig":
        data = dict(data)
        data["head"] = HeadConfig.from_dict(data.get("head", {}))
        if data.get("candidates") is not None:
            data["candidates"] = tuple(HeadConfig.from_dict(c) for c in data["candidates"])
            data["candidate_flops"] = tuple(int(f) for f in data.get("candidate_flops") or ())
        return from_mapping(cls, data, "exit")


@dataclasses.dataclass(frozen=True)
class BundleConfig(_Record):
    """Everything needed to rebuild a converted model (``config.yaml`` of a bundle)."""

    spec: dict
    trace: TraceConfig
    exits: Tuple[ExitConfig, ...]
    num_classes: int
    final_flops: int = 0
    original_flops: int = 0
    upsample_logits: bool = False
    versions: dict = dataclasses.field(default_factory=dict)
    training: Optional[dict] = None
    policy: Optional[dict] = None
    train_issue: Optional[str] = None  # why stage-1 training cannot run the model's train mode (None: it can)
    latency: Optional[dict] = None  # measured profiles (mexify profile), keyed "<device>|b<batch>|<dtype>|<H>x<W>"
    export: Optional[dict] = None  # an exported bundle's manifest (mexify export): format, programs, their inputs and outputs
    schema_version: int = SCHEMA_VERSION

    @property
    def exit_names(self) -> list:
        return [e.name for e in self.exits] + ["final"]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BundleConfig":
        data = dict(data)
        version = data.get("schema_version", SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"bundle schema_version {version} is newer than this mexify supports ({SCHEMA_VERSION})",
                "upgrade mexify",
            )
        export = data.get("export")
        if isinstance(export, Mapping) and int(export.get("schema", 0)) > EXPORT_SCHEMA:
            raise ConfigError(
                f"this bundle was exported with export schema {export.get('schema')}, newer than this mexify reads ({EXPORT_SCHEMA})",
                "upgrade mexify, or export the bundle again with this version",
            )
        data["trace"] = from_mapping(TraceConfig, data.get("trace", {}), "trace")
        data["exits"] = tuple(ExitConfig.from_dict(e) for e in data.get("exits", []))
        return from_mapping(cls, data, "config.yaml")
