"""Training recipes: a frozen dataclass, YAML round-trip and ``key=value`` overrides.

A recipe is everything the two-stage trainer needs besides the bundle and the data:
optimiser, schedule, iterations per stage, loss weights, distillation, precision and
checkpointing. Recipes ship as YAML files (``mexify/train/recipes/*.yaml``, mirrored in the
repository's ``recipes/``) and are named by file stem (``quick-synthetic``) or given as a path.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple, Union

import yaml

from mexify.config import parse_assignment, parse_size
from mexify.errors import ConfigError, nearest

__all__ = ["Recipe", "load_recipe", "available_recipes", "recipe_dirs", "shipped_recipes_dir", "DISTILL_MODES", "AMP_MODES"]

log = logging.getLogger(__name__)

RECIPE_SCHEMA_VERSION = 1
DISTILL_MODES = ("pfd", "kd", "none")
AMP_MODES = ("none", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")


def _opt(conv):
    """Converter that also accepts None (``null`` in YAML)."""

    def convert(v):
        if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "null", "")):
            return None
        return conv(v)

    convert.__name__ = f"optional {conv.__name__}"
    return convert


def _bool(v):
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return v.strip().lower() in ("true", "yes", "on", "1")
    raise ValueError(f"{v!r} is not a boolean")


def _int(v):
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not an integer")
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError(f"{v!r} is not an integer")
        return int(v)
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            f = float(v)  # "6e4" or "60000.0"
            if not f.is_integer():
                raise ValueError(f"{v!r} is not an integer") from None
            return int(f)
    return int(v)


def _float(v):
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a number")
    return float(v)


def _str(v):
    return str(v)


def _floats(v):
    if isinstance(v, str):
        v = yaml.safe_load(v if v.strip().startswith("[") else f"[{v}]")
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{v!r} is not a list of numbers")
    return tuple(_float(x) for x in v)


def _size(v):
    """One size, ``[h, w]`` or ``HxW``; stored as an int or a 2-tuple."""
    if isinstance(v, str) and "x" not in v.lower():
        v = yaml.safe_load(v)
    return parse_size(v, "size", single="int")


def _f(default, conv, help_: str):
    return field(default=default, metadata={"conv": conv, "help": help_})


@dataclass(frozen=True)
class Recipe:
    """How to train a multi-exit model in two stages (MESS defaults).

    Stage 1 trains backbone, final exit and every early head jointly on the weighted sum of
    per-exit cross-entropies. Stage 2 freezes backbone and final exit and trains the early
    heads with cross-entropy plus ``kd_weight`` times a distillation term from the final exit.
    Change a recipe with :func:`dataclasses.replace` or ``load_recipe(..., overrides)``.
    """

    name: str = _f("custom", _str, "recipe name, recorded in the bundle")
    description: str = _f("", _str, "one line saying what the recipe is for")
    data: Optional[str] = _f(None, _opt(_str), "dataset spec to train on when none is given (--data overrides it)")
    seed: int = _f(0, _int, "seed for initialisation of new heads, data order and augmentation")
    batch_size: int = _f(8, _int, "images per iteration per process")
    crop_size: Union[int, Tuple[int, int]] = _f(512, _size, "training crop, one size or [h, w]")
    base_size: Optional[Union[int, Tuple[int, int]]] = _f(
        None, _opt(_size), "rescale images first: longer side, or [h, w]; null keeps their size"
    )
    num_workers: int = _f(0, _int, "data-loading worker processes")
    optimizer: str = _f("sgd", _str, "optimizer: sgd (the papers' setting) or adamw")
    lr: float = _f(0.02, _float, "initial learning rate of stage 1")
    stage2_lr: Optional[float] = _f(None, _opt(_float), "initial learning rate of stage 2 (default: lr)")
    lr_power: float = _f(0.9, _float, "poly schedule: lr * (1 - it / iters) ** lr_power")
    momentum: float = _f(0.9, _float, "SGD momentum")
    weight_decay: float = _f(1e-4, _float, "weight decay (SGD: L2; AdamW: decoupled)")
    nesterov: bool = _f(False, _bool, "Nesterov momentum")
    stage1_iters: int = _f(60000, _int, "iterations of stage 1 (end-to-end); 0 skips it")
    stage2_iters: int = _f(60000, _int, "iterations of stage 2 (frozen backbone); 0 skips it")
    exit_weights: Optional[Tuple[float, ...]] = _f(
        None, _opt(_floats), "stage-1 CE weight per exit, early exits then final (default: early_weight each, final 1)"
    )
    early_weight: float = _f(
        1.0, _float, "stage-1 CE weight of every early exit when exit_weights is not given (the final exit weighs 1)"
    )
    distill: str = _f("pfd", _str, "stage-2 distillation: pfd (positive filtering), kd, none")
    kd_weight: float = _f(0.5, _float, "weight of the distillation term in stage 2")
    kd_temperature: float = _f(1.0, _float, "softmax temperature of the distillation term")
    grad_clip: Optional[float] = _f(None, _opt(_float), "clip the gradient norm to this value")
    precise_bn_iters: int = _f(
        0, _int, "at the end of each stage, recompute the BatchNorm statistics of the trained layers over this many batches"
    )
    amp: str = _f("none", _str, "mixed precision on GPU: none, bf16, fp16")
    channels_last: bool = _f(False, _bool, "channels_last memory format (GPU)")
    checkpoint_every: int = _f(500, _int, "write a checkpoint every this many iterations (and at stage ends)")
    log_every: int = _f(10, _int, "write a CSV row every this many iterations")

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size < 1:
            problems.append(("batch_size", "must be >= 1"))
        if self.precise_bn_iters < 0:
            problems.append(("precise_bn_iters", "must be >= 0"))
        sizes = self.crop_size if isinstance(self.crop_size, tuple) else (self.crop_size,)
        if any(s < 1 for s in sizes):
            problems.append(("crop_size", "must be >= 1"))
        if self.stage1_iters < 0 or self.stage2_iters < 0:
            problems.append(("stage1_iters" if self.stage1_iters < 0 else "stage2_iters", "must be >= 0"))
        if self.lr <= 0 or (self.stage2_lr is not None and self.stage2_lr <= 0):
            problems.append(("lr", "must be > 0"))
        if self.distill not in DISTILL_MODES:
            problems.append(("distill", f"must be one of {', '.join(DISTILL_MODES)}"))
        if self.amp not in AMP_MODES:
            problems.append(("amp", f"must be one of {', '.join(AMP_MODES)}"))
        if self.optimizer not in OPTIMIZERS:
            problems.append(("optimizer", f"must be one of {', '.join(OPTIMIZERS)}"))
        if self.kd_temperature <= 0:
            problems.append(("kd_temperature", "must be > 0"))
        if self.kd_weight < 0:
            problems.append(("kd_weight", "must be >= 0"))
        if self.checkpoint_every < 1 or self.log_every < 1:
            problems.append(("checkpoint_every" if self.checkpoint_every < 1 else "log_every", "must be >= 1"))
        if self.num_workers < 0:
            problems.append(("num_workers", "must be >= 0"))
        if self.exit_weights is not None and any(w < 0 for w in self.exit_weights):
            problems.append(("exit_weights", "weights must be >= 0"))
        if self.early_weight < 0:
            problems.append(("early_weight", "must be >= 0"))
        if problems:
            key, what = problems[0]
            raise ConfigError(
                f"recipe {self.name!r}: {key} {what} (got {getattr(self, key)!r})",
                f"fix it in the recipe file or with --set {key}=...",
            )

    # --- derived -----------------------------------------------------------------
    @property
    def crop_hw(self) -> Tuple[int, int]:
        return self.crop_size if isinstance(self.crop_size, tuple) else (self.crop_size, self.crop_size)

    @property
    def lr_stage2(self) -> float:
        return self.lr if self.stage2_lr is None else self.stage2_lr

    # --- (de)serialisation -------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain dict (lists, not tuples) that :meth:`from_dict` and YAML round-trip."""
        out: dict = {"schema_version": RECIPE_SCHEMA_VERSION}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def field_names(cls) -> list:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "recipe") -> "Recipe":
        """Build a recipe from a mapping; unknown keys and bad values raise :class:`ConfigError`."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a mapping of recipe fields, got {type(d).__name__}",
                              "a recipe file is a YAML mapping like 'lr: 0.02'")
        d = dict(d)
        version = d.pop("schema_version", RECIPE_SCHEMA_VERSION)
        if version != RECIPE_SCHEMA_VERSION:
            raise ConfigError(f"{source}: recipe schema_version {version!r} is not supported",
                              f"this mexify reads schema_version {RECIPE_SCHEMA_VERSION}")
        return cls()._with(d, source)

    @classmethod
    def parse_override(cls, text: str, source: str = "--set") -> Tuple[str, str]:
        """``"key=value"`` for :meth:`with_overrides`, checked: a recipe field and a value it takes.

        Returns:
            ``(key, value)``, the value as text (parsed again when applied).

        Raises:
            ConfigError: not key=value, an unknown field (the nearest is named) or a bad value.
        """
        key, value = parse_assignment(text, source)
        cls()._with({key: value}, source)
        return key, value

    def with_overrides(self, overrides: Optional[Mapping[str, Any]], source: str = "--set") -> "Recipe":
        """Return a copy with ``overrides`` (field -> value; strings are parsed) applied."""
        return self._with(dict(overrides or {}), source)

    def _with(self, changes: dict, source: str) -> "Recipe":
        fields = {f.name: f for f in dataclasses.fields(self)}
        parsed = {}
        for key, value in changes.items():
            if key not in fields:
                close = nearest(key, fields)
                raise ConfigError(
                    f"{source}: unknown recipe key {key!r}",
                    f"did you mean {close[0]!r}? valid keys: {', '.join(fields)}" if close else None,
                )
            conv = fields[key].metadata["conv"]
            try:
                parsed[key] = conv(value)
            except (TypeError, ValueError, ConfigError) as e:
                raise ConfigError(
                    f"{source}: recipe key {key!r} cannot take {value!r}: {getattr(e, 'message', e)}",
                    f"{key} is {fields[key].metadata['help']}",
                ) from e
        return dataclasses.replace(self, **parsed)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def shipped_recipes_dir() -> Path:
    """The recipes shipped with mexify: the repository's top-level ``recipes/``, installed as
    the package ``mexify.recipes`` (one copy, found in a checkout and in an installed wheel)."""
    return Path(str(importlib.resources.files("mexify.recipes")))


def recipe_dirs() -> list:
    """Where recipe names are looked up, first match wins: ``$MEXIFY_RECIPES`` (os.pathsep
    separated), ``./recipes``, then the recipes shipped with mexify."""
    dirs = [Path(p) for p in os.environ.get("MEXIFY_RECIPES", "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / "recipes")
    dirs.append(shipped_recipes_dir())
    return list(dict.fromkeys(d.resolve() if d.exists() else d for d in dirs))


def available_recipes() -> list:
    """Names of every recipe found in :func:`recipe_dirs`."""
    names = set()
    for d in recipe_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def _find(name: str) -> Path:
    for d in recipe_dirs():
        for ext in (".yaml", ".yml"):
            p = d / f"{name}{ext}"
            if p.is_file():
                return p
    close = nearest(name, available_recipes())
    raise ConfigError(
        f"no recipe named {name!r}",
        (f"did you mean {close[0]!r}? " if close else "")
        + f"available: {', '.join(available_recipes()) or 'none'}; or pass a path to a YAML file",
    )


def load_recipe(
    recipe: Union[str, os.PathLike, Recipe, Mapping[str, Any], None] = "quick-synthetic",
    overrides: Optional[Mapping[str, Any]] = None,
) -> Recipe:
    """Resolve a recipe by name, path, mapping or instance and apply ``overrides``.

    Args:
        recipe: a shipped recipe name (``quick-synthetic``), a path to a YAML file, a mapping
            of fields, or a :class:`Recipe`.
        overrides: field -> value (values given as strings are parsed like ``--set k=v``).

    Raises:
        ConfigError: unknown name, unreadable file, unknown key (naming the nearest valid
            key) or invalid value.
    """
    if recipe is None:
        recipe = "quick-synthetic"
    if isinstance(recipe, Recipe):
        base = recipe
    elif isinstance(recipe, Mapping):
        base = Recipe.from_dict(recipe)
    else:
        text = os.fspath(recipe)
        path = Path(text)
        if not (path.suffix in (".yaml", ".yml") or os.sep in text or path.is_file()):
            path = _find(text)
        if not path.is_file():
            raise ConfigError(f"recipe file {str(path)!r} does not exist",
                              f"available recipe names: {', '.join(available_recipes())}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read recipe {str(path)!r}: {e}", "check the YAML syntax") from e
        if isinstance(data, Mapping) and "name" not in data:
            data = {**data, "name": path.stem}
        base = Recipe.from_dict(data, source=str(path))
        log.debug("recipe %s from %s", base.name, path)
    return base.with_overrides(overrides)
