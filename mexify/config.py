"""Frozen config records and their YAML round-trip.

Configs are frozen dataclasses changed with :func:`dataclasses.replace`, never mutated.
``from_dict`` rejects unknown keys (naming the nearest valid one), missing fields and values of
the wrong type (:func:`coerce`, by the field's annotation).

The parsers of values a user types (sizes, counts, ``key=value`` settings, head settings, the
tracer) live here too, so the command line and the Python API refuse a bad value with the same
:class:`~mexify.errors.ConfigError`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import typing
from typing import Any, Dict, Mapping, Optional, Tuple, Type, TypeVar, Union

import yaml

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
    "coerce",
    "json_safe",
    "parse_size",
    "parse_input_size",
    "parse_image_size",
    "parse_count",
    "parse_counts",
    "parse_assignment",
    "parse_yaml_assignment",
    "parse_head_settings",
    "parse_trace_method",
    "parse_choice",
    "TRACE_METHODS",
    "MAX_IMAGE_SIDE",
    "BUDGET_KINDS",
    "ACCURACY_BUDGETS",
    "within_budget",
]

SCHEMA_VERSION = 1
EXPORT_SCHEMA = 1
"""Version of an exported bundle's ``export:`` manifest (``mexify export``)."""

IGNORE_INDEX = 255
"""Label value of unlabelled pixels, in every dataset, metric and loss."""

MAX_IMAGE_SIDE = 16384
"""The longest image side mexify accepts for a model input (``--input-size``, ``predict --size``):
one float32 image of 16384x16384 already takes 3 GiB."""

TRACE_METHODS = ("auto", "fx", "export")

BUDGET_KINDS = ("speedup", "cost_fraction", "latency_ms", "max_drop", "max_disagree")
"""What a calibration fits for: a speed-up (x), a cost share (0-1), ms per image, mIoU points, a share of pixels."""
ACCURACY_BUDGETS = ("max_drop", "max_disagree")
"""Budget kinds about the masks; the others are about cost."""


def within_budget(kind: str, value: float, observed: float) -> bool:
    """The one rule of whether a figure observed on some images is within a budget of ``kind``: a speed-up at
    least ``value``, every other kind at most; a relative slack of 1e-9 lets a calibration's own figures,
    recomputed, keep their budget through rounding."""
    slack = 1e-9 * max(1.0, abs(value))
    return observed >= value - slack if kind == "speedup" else observed <= value + slack

T = TypeVar("T")


def from_mapping(cls: Type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``: unknown keys (with a "did you mean"), missing fields
    and values of the wrong type (:func:`coerce`) raise :class:`ConfigError` naming ``where.field``."""
    label = where or cls.__name__
    prefix = f"{where}." if where and where != "config.yaml" else ""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label} must be a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = nearest(str(key), names, n=1)
            raise ConfigError(
                f"unknown key {key!r} in {label}",
                f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(names)}",
            )
    hints = _field_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = coerce(data[f.name], hints[f.name], prefix + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{label} misses the field {f.name!r}")
    return cls(**kwargs)


def _field_types(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


_NULL = ("null", "none", "~", "")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce(value: Any, tp: Any, what: str) -> Any:
    """``value`` as type ``tp``: ``int``, finite ``float``, ``str``, ``bool``, ``dict``, ``Optional[X]``,
    ``Tuple[X, ...]``, ``Tuple[X, Y]`` or a config record; text is parsed (``"6:12"`` is a tuple).

    Raises:
        ConfigError: ``"<what> is <value>, expected <kind>"``.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL):
            return None
        kinds = [a for a in args if a is not type(None)]
        return coerce(value, kinds[0], what)
    if origin is tuple:
        return _coerce_tuple(value, args, what)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return tp.from_dict(value, where=what)
        raise _wrong(what, value, "a mapping")
    if tp in (dict, Dict) or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise _wrong(what, value, "a mapping")
    parse = _SCALARS.get(tp)
    if parse is None:
        return value
    return parse(value, what)


def _wrong(what: str, value: Any, kind: str) -> ConfigError:
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return ConfigError(f"{what} is {shown}, expected {kind}")


def _coerce_tuple(value: Any, args: tuple, what: str) -> tuple:
    if isinstance(value, str):
        items: list = [v for v in re.split(r"[\s:,/]+", value.strip()) if v]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, numbers.Number) and not isinstance(value, bool):
        items = [value]
    else:
        raise _wrong(what, value, "a list")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0], f"{what}[{i}]") for i, v in enumerate(items))
    if len(items) != len(args):
        raise _wrong(what, value, f"a list of {len(args)} values")
    return tuple(coerce(v, a, f"{what}[{i}]") for i, (v, a) in enumerate(zip(items, args)))


def _to_int(value: Any, what: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise _wrong(what, value, "an integer")


def _to_float(value: Any, what: str) -> float:
    out: Optional[float] = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            out = None
    if out is None or not math.isfinite(out):
        raise _wrong(what, value, "a finite number")
    return out


def _to_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise _wrong(what, value, "true or false")


def _to_str(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    raise _wrong(what, value, "a string")


_SCALARS = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by None (JSON and YAML readers elsewhere reject inf/nan)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def parse_size(text: Any, what: str = "size", single: str = "square", lo: int = 1, hi: Optional[int] = None) -> Any:
    """Read a size: ``"512x1024"`` or ``[512, 1024]`` -> ``(512, 1024)`` as (H, W).

    Args:
        text: a string ``HxW`` / ``N``, an int, or a 2-sequence.
        what: the option's name, for the error message.
        single: what one number means: ``"square"`` gives ``(N, N)``; ``"int"`` keeps ``N``
            (the dataset options' "longer side").
        lo, hi: the smallest and largest side accepted (``hi`` None: no bound).

    Raises:
        ConfigError: anything that is not one or two integers in ``[lo, hi]``.
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
        values = tuple(_to_int(p, what) for p in parts)
        if any(v <= 0 for v in values):
            raise ValueError
    except (TypeError, ValueError, ConfigError):
        raise ConfigError(f"{what} {text!r} is not HxW or N", f"write {what} like 512x1024 or 512") from None
    if any(v < lo for v in values):
        raise ConfigError(f"{what} {text!r} is too small", f"use at least {lo}x{lo}")
    if hi is not None and any(v > hi for v in values):
        raise ConfigError(f"{what} {text!r} is too large: mexify takes sides up to {hi} pixels",
                          f"use a smaller {what}, e.g. 512x1024")
    if len(values) == 2:
        return values
    return (values[0], values[0]) if single == "square" else values[0]


def parse_input_size(text: Any, what: str = "--input-size") -> Tuple[int, int]:
    """A model's input size (H, W): sides from 32 (the deepest usual stride) to :data:`MAX_IMAGE_SIDE`."""
    return parse_size(text, what, lo=32, hi=MAX_IMAGE_SIDE)


def parse_image_size(text: Any, what: str = "--size") -> Tuple[int, int]:
    """The size images are resized to (H, W): sides up to :data:`MAX_IMAGE_SIDE`."""
    return parse_size(text, what, hi=MAX_IMAGE_SIDE)


def parse_count(value: Any, what: str, lo: int = 1, hi: Optional[int] = None) -> int:
    """An integer option (batch size, images, repeats, threads): an integer in ``[lo, hi]``.

    Raises:
        ConfigError: not an integer, or out of range (the hint gives the range).
    """
    try:
        n = _to_int(value, what)
    except ConfigError:
        raise ConfigError(f"{what} {value!r} is not an integer", f"e.g. {what} {max(lo, 1)}") from None
    if n < lo or (hi is not None and n > hi):
        rng = f"at least {lo}" if hi is None else f"from {lo} to {hi}"
        raise ConfigError(f"{what} must be {rng}, got {n}", f"e.g. {what} {max(lo, 1)}")
    return n


def parse_number(value: Any, what: str, zero: bool = False) -> float:
    """A positive finite number (``--rate``, ``--slo-ms``, ``--duration``); ``zero``: 0 allowed too (``--max-wait-ms``).

    Raises:
        ConfigError: not a number, not finite, or out of range.
    """
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {value!r} is not a number", f"e.g. {what} 10") from None
    if not math.isfinite(x) or x < 0 or (x == 0 and not zero):
        raise ConfigError(f"{what} must be a finite number {'>= 0' if zero else '> 0'}, got {value!r}", f"e.g. {what} 10")
    return x


def parse_range(text: Any, what: str) -> Tuple[int, int]:
    """``"MIN:MAX"`` integers with ``1 <= MIN <= MAX`` (``serve --autoscale 1:4``).

    Raises:
        ConfigError: anything else.
    """
    lo, sep, hi = str(text).partition(":")
    try:
        a, b = int(lo), int(hi)
    except ValueError:
        a = b = 0
    if not sep or not 1 <= a <= b:
        raise ConfigError(f"{what} {text!r} is not MIN:MAX with 1 <= MIN <= MAX", f"e.g. {what} 1:4")
    return a, b


def parse_counts(values: Any, what: str, lo: int = 1) -> list:
    """A list of integers, ``"1,8"`` or ``[1, 8]``, each at least ``lo`` (``profile --batch-size``).

    Raises:
        ConfigError: an empty list, or an entry that :func:`parse_count` refuses.
    """
    items = [v for v in values.split(",") if v.strip()] if isinstance(values, str) else list(values)
    if not items:
        raise ConfigError(f"{what} {values!r} lists no value", f"e.g. {what} 1,8")
    try:
        return [parse_count(v, what, lo) for v in items]
    except ConfigError:
        raise ConfigError(f"{what} {values!r} is not a comma-separated list of integers >= {lo}", f"e.g. {what} 1,8") from None


def parse_assignment(text: Any, what: str = "--set") -> Tuple[str, str]:
    """``"key=value"`` -> ``("key", "value")``, both stripped; the value stays text.

    Raises:
        ConfigError: no ``=``, or an empty key.
    """
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"{what} {text!r} is not key=value", f"write it as key=value, e.g. {what} name=value")
    key, value = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"{what} {text!r} has no key before '='", f"write it as key=value, e.g. {what} name=value")
    return key.strip(), value.strip()


def parse_yaml_assignment(text: Any, what: str = "--arg") -> Tuple[str, Any]:
    """``"key=value"`` with the value read as a YAML scalar or list (``null``, ``3``, ``true``, ``[1, 2]``).

    Raises:
        ConfigError: not key=value, or a value that is not valid YAML.
    """
    key, value = parse_assignment(text, what)
    if value == "":
        return key, ""
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{what} {text!r}: the value is not valid YAML ({problem})",
                          "quote it, or write a number, true/false, null or [a, b]") from None


def parse_head_settings(settings: Union[str, Mapping[str, Any], None], what: str = "--head-set") -> Dict[str, Any]:
    """Head settings, ``"width=128,blocks=2,aspp_rates=6:12"`` or a mapping, typed and checked.

    Returns:
        setting -> value (``aspp_rates`` a tuple), each valid for :class:`HeadConfig`.

    Raises:
        ConfigError: not key=value, an unknown setting (the nearest is named), a value of the
            wrong type or out of range.
    """
    if settings is None:
        return {}
    if isinstance(settings, str):
        pairs = [parse_assignment(item, what) for item in settings.split(",") if item.strip()]
    elif isinstance(settings, Mapping):
        pairs = [(str(k), v) for k, v in settings.items()]
    else:
        raise ConfigError(f"{what} {settings!r} is not key=value,...", "e.g. width=128,blocks=2")
    fields = [f.name for f in dataclasses.fields(HeadConfig) if f.name != "template"]
    changes: Dict[str, Any] = {}
    for key, value in pairs:
        if key not in fields:
            close = nearest(key, fields, n=1)
            raise ConfigError(f"unknown head setting {key!r}", (f"did you mean {close[0]!r}? " if close else "")
                              + f"settings: {', '.join(fields)}")
        changes[key] = value
    checked = dataclasses.replace(HeadConfig(), **changes)
    return {k: getattr(checked, k) for k in changes}


def parse_choice(text: Any, choices: Any, what: str) -> str:
    """``text`` if it is one of ``choices``.

    Raises:
        ConfigError: ``"unknown <what> <text>"``, listing the choices and the nearest one.
    """
    choices = [str(c) for c in choices]
    if text not in choices:
        close = nearest(str(text), choices, n=1)
        raise ConfigError(f"unknown {what} {text!r}", f"choose one of {', '.join(choices)}"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    return str(text)


def parse_trace_method(text: Any, what: str = "--trace") -> str:
    """The tracer: ``auto`` (torch.fx, then torch.export), ``fx`` or ``export``."""
    method = text.strip().lower() if isinstance(text, str) else text
    if method not in TRACE_METHODS:
        close = nearest(str(text), TRACE_METHODS, n=1)
        raise ConfigError(f"unknown tracer {text!r}", f"use {what} {', '.join(TRACE_METHODS)}"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    return method


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
    def from_dict(cls, data: Mapping[str, Any], where: str = ""):
        return from_mapping(cls, data, where)


@dataclasses.dataclass(frozen=True)
class HeadConfig(_Record):
    """An exit head from the search space.

    ``fcn``: 3x3 conv-BN-ReLU (``width`` channels, 0 = in_channels // 4), dropout, 1x1 classifier
    (the uniform baseline). ``mess``: 1x1 reduction to ``width`` (0 = the widest head within 3% of
    the model's FLOPs, resolved at conversion), ``blocks`` 3x3 conv-BN-ReLU blocks
    with ``dilation``, optional light ASPP with ``aspp_rates``, dropout, 1x1 classifier.
    ``fuse``: where the exit has a finer feature to fuse (:attr:`ExitConfig.skip`, chosen by convert),
    that feature is reduced by a 1x1 conv-BN-ReLU to ``min(48, width)`` channels, the deep branch is
    upsampled to its resolution and concatenated with it, and a light 3x3 (depthwise 3x3 then 1x1,
    each with BN-ReLU) mixes them before the classifier, as DeepLabV3+'s decoder does. Without a
    skip feature the head is the plain one. The head's logits are at the resolution of its finest input.
    """

    template: str = "mess"
    width: int = 0
    blocks: int = 1
    dilation: int = 1
    aspp_rates: Tuple[int, ...] = ()
    dropout: float = 0.1
    fuse: bool = False

    def __post_init__(self):
        hints = _field_types(HeadConfig)
        try:
            for f in dataclasses.fields(self):
                object.__setattr__(self, f.name, coerce(getattr(self, f.name), hints[f.name], f"head {f.name}"))
        except ConfigError as e:
            raise ConfigError(e.message, "e.g. width=128, blocks=2, dilation=2, aspp_rates=6:12, dropout=0.1, fuse=true") from None
        if self.template not in ("fcn", "mess"):
            raise ConfigError(f"unknown head template {self.template!r}", "use 'mess' or 'fcn'")
        if not 0 <= self.blocks <= 4:
            raise ConfigError(f"head blocks={self.blocks} is out of range", "use 0 to 4 blocks")
        if self.width < 0:
            raise ConfigError(f"head width={self.width} is invalid", "use a positive channel count (0 = automatic)")
        if self.dilation < 1 or any(r < 1 for r in self.aspp_rates):
            raise ConfigError("head dilation and ASPP rates must be >= 1", "e.g. dilation=2, aspp_rates=6:12")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head dropout={self.dropout} is out of range", "use 0 <= dropout < 1")
        if self.template == "fcn" and (self.blocks != 1 or self.dilation != 1 or self.aspp_rates):
            raise ConfigError("the fcn head is one 3x3 block: blocks, dilation and aspp_rates are mess settings",
                              "use --head mess for them, or set only width, dropout and fuse on fcn")


@dataclasses.dataclass(frozen=True)
class TraceConfig(_Record):
    """How a model is traced: leaf modules, autowrapped functions and the profiling input size.

    One value for ``convert`` and ``inspect`` (``api.convert(spec, trace=TraceConfig((256, 256), method="fx"))``);
    the bundle records it (``trace:`` in ``config.yaml``), with the leaf modules and functions registered
    with :func:`mexify.register_leaf_module` / :func:`mexify.register_autowrap_function` added.

    Attributes:
        input_size: (H, W) (or ``"HxW"``) at which shapes and FLOPs are profiled.
        leaf_modules: module classes or qualified names kept as one graph node (``--leaf-module``).
        autowrap_functions: functions (``package.module.fn``) recorded as one call (``--autowrap``).
        method: ``auto`` (torch.fx, then torch.export), ``fx`` or ``export`` (``--trace``).
        export_shapes: set by convert (torch.export only: which dimensions stayed dynamic).
    """

    input_size: Tuple[int, int] = (512, 512)
    leaf_modules: Tuple[str, ...] = ()
    autowrap_functions: Tuple[str, ...] = ()
    method: str = "auto"  # "auto" (fx, then export), "fx", or "export"
    # torch.export only: which dimensions stayed dynamic, "batch+spatial" or "batch" (spatial sizes
    # fixed at input_size); "" = try in that order. Recorded by convert so loading repeats it.
    export_shapes: str = ""

    def __post_init__(self):
        size = self.input_size
        size = parse_size(size, "input_size") if isinstance(size, str) else tuple(int(v) for v in size)
        object.__setattr__(self, "input_size", size)
        for name in ("leaf_modules", "autowrap_functions"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        object.__setattr__(self, "method", parse_trace_method(self.method))


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
    # the finer feature a ``fuse`` head reads (a node computed before this exit, carried across the
    # cuts up to it), its channels and stride; "" when the exit has none (its heads are plain)
    skip: str = ""
    skip_channels: int = 0
    skip_stride: float = 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "exit") -> "ExitConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
        data = dict(data)
        data["head"] = HeadConfig.from_dict(data.get("head", {}), f"{where}.head")
        if data.get("candidates") is not None:
            if not isinstance(data["candidates"], (list, tuple)):
                raise _wrong(f"{where}.candidates", data["candidates"], "a list")
            data["candidates"] = tuple(HeadConfig.from_dict(c, f"{where}.candidates[{i}]") for i, c in enumerate(data["candidates"]))
            data["candidate_flops"] = coerce(data.get("candidate_flops") or (), Tuple[int, ...], f"{where}.candidate_flops")
        return from_mapping(cls, data, where)


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
    def from_dict(cls, data: Mapping[str, Any], where: str = "config.yaml") -> "BundleConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
        data = dict(data)
        version = coerce(data.get("schema_version", SCHEMA_VERSION), int, "schema_version")
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"bundle schema_version {version} is newer than this mexify supports ({SCHEMA_VERSION})",
                "upgrade mexify",
            )
        export = data.get("export")
        if isinstance(export, Mapping) and coerce(export.get("schema", 0), int, "export.schema") > EXPORT_SCHEMA:
            raise ConfigError(
                f"this bundle was exported with export schema {export.get('schema')}, newer than this mexify reads ({EXPORT_SCHEMA})",
                "upgrade mexify, or export the bundle again with this version",
            )
        data["trace"] = from_mapping(TraceConfig, data.get("trace", {}), "trace")
        exits = data.get("exits", [])
        if not isinstance(exits, (list, tuple)):
            raise _wrong("exits", exits, "a list")
        data["exits"] = tuple(ExitConfig.from_dict(e, f"exits[{i}]") for i, e in enumerate(exits))
        return from_mapping(cls, data, where)
