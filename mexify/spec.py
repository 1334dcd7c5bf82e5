"""Model specs: how a user names a model, and how mexify builds it.

Spec forms:

* ``package.module:factory`` with keyword arguments (``--arg key=value``),
* ``path/to/file.py:factory`` for a model defined in a local file,
* a ``torch.export`` archive (``.pt2``),
* a pickled ``nn.Module`` (``.pt``/``.pth``), only with an explicit trust flag.

``--weights`` loads a state_dict (``torch.load(weights_only=True)``) or a ``.safetensors`` file.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from mexify.errors import SpecError, nearest
from mexify.graph.adapt import adapt_module
from mexify.graph.serde import load_pt2
from mexify.trust import Trust, check_factory

__all__ = ["ModelSpec", "parse_spec", "build_model", "load_state_dict_file", "load_weights"]

log = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec; ``to_dict`` is what bundles record."""

    kind: str  # "factory" | "file" | "export" | "pickle"
    target: str
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    weights: Optional[str] = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "target": self.target, "args": dict(self.args), "weights": self.weights}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        return cls(kind=data["kind"], target=data["target"], args=dict(data.get("args") or {}), weights=data.get("weights"))

    def __str__(self) -> str:
        return self.target


def parse_spec(spec: str, args: Optional[Mapping[str, Any]] = None, weights: Optional[str] = None) -> ModelSpec:
    """Classify a spec string; files are checked for existence and made absolute.

    Raises:
        SpecError: the spec names no existing file and is not ``module:factory``.
    """
    if not spec:
        raise SpecError("empty model spec", "give package.module:factory, a .pt2 archive, or file.py:factory")
    if weights is not None:
        if not Path(weights).is_file():
            raise SpecError(f"weights file not found: {weights}", "check the path given to --weights")
        weights = str(Path(weights).resolve())
    args = dict(args or {})
    lower = spec.lower()
    if lower.endswith(".pt2"):
        return ModelSpec("export", str(_existing(spec)), args, weights)
    if lower.endswith(_PICKLE_SUFFIXES):
        return ModelSpec("pickle", str(_existing(spec)), args, weights)
    if ":" in spec:
        path, _, factory = spec.rpartition(":")
        if path.endswith(".py"):
            if not factory:
                raise SpecError(f"spec {spec!r} names no factory", "write it as path/to/file.py:factory")
            return ModelSpec("file", f"{_existing(path)}:{factory}", args, weights)
        if path and factory and all(p.isidentifier() for p in path.split(".")) and factory.isidentifier():
            return ModelSpec("factory", spec, args, weights)
    if Path(spec).exists():
        raise SpecError(
            f"cannot tell what kind of model file {spec!r} is",
            "use a .pt2 torch.export archive, a .pt/.pth pickled module with --trust-pickle, or file.py:factory",
        )
    raise SpecError(
        f"unknown model spec {spec!r}",
        "use package.module:factory (e.g. torchvision.models.segmentation:deeplabv3_resnet50), "
        "a .pt2 archive, or path/to/file.py:factory",
    )


def _existing(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"model file not found: {path}", "check the path")
    return p.resolve()


def build_model(spec: ModelSpec, trust: Trust = Trust(), *, named_by: Optional[str] = None) -> nn.Module:
    """Build the model a spec names (random init unless the spec carries weights).

    Args:
        spec: the spec.
        trust: what may run: pickles need ``trust.pickle``; factories a file names need
            ``trust.code`` unless they are known model builders (:mod:`mexify.trust`).
        named_by: the file the spec was read from (a bundle's config): its factory is checked
            against the trust policy before anything is imported. ``None``: the caller named the
            spec itself (``convert``), which is its own choice of code to run.

    Raises:
        SpecError: refused by the trust policy, import/factory failure, or weights that do not fit.
    """
    if named_by is not None:
        check_factory(spec.kind, spec.target, spec.args, trust, where=named_by)
    if spec.kind == "factory":
        module_name, _, factory_name = spec.target.partition(":")
        module = _import_module(module_name, spec.target)
        model = _call_factory(module, factory_name, spec)
    elif spec.kind == "file":
        file, _, factory_name = spec.target.rpartition(":")
        module = _import_file(file)
        model = _call_factory(module, factory_name, spec)
    elif spec.kind == "export":
        model = _load_export(spec.target, trust.pickle)
    elif spec.kind == "pickle":
        model = _load_pickle(spec.target, trust.pickle)
    else:
        raise SpecError(f"unknown spec kind {spec.kind!r}", "the bundle's spec.kind must be factory, file, export or pickle")
    if not isinstance(model, nn.Module):
        raise SpecError(f"spec {spec.target!r} gave a {type(model).__name__}, not a torch.nn.Module")
    if spec.weights:
        load_weights(model, spec.weights)
    return adapt_module(model)  # weights load into the model itself; a mask classifier is wrapped after


def _import_module(module_name: str, target: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(f"cannot import {module_name!r} for spec {target!r}: {e}", "is the package installed?") from e
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a user package can raise anything (or exit) at import
        raise SpecError(f"importing {module_name!r} for spec {target!r} failed: {_one_line(e)}",
                        "fix the package so that it imports cleanly") from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _call_factory(module: Any, name: str, spec: ModelSpec) -> Any:
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        close = nearest(name, public)
        raise SpecError(
            f"{getattr(module, '__name__', module)!s} has no factory {name!r}",
            f"did you mean {', '.join(close)}?" if close else None,
        )
    try:
        if _is_pretrained_class(factory):  # transformers: a model class built from its config (random init)
            return factory(factory.config_class(**dict(spec.args)))
        return factory(**dict(spec.args))
    except TypeError as e:
        raise SpecError(f"{spec.target} rejected its arguments {dict(spec.args)}: {e}", "check the --arg names") from e
    except (Exception, SystemExit) as e:  # noqa: BLE001 - user code can raise anything; report it in one line
        hint = None
        text = f"{type(e).__name__}: {e}"
        if "download" in text.lower() or "urlopen" in text.lower() or "url" in type(e).__name__.lower():
            hint = "no weights can be downloaded; pass --arg weights=null --arg weights_backbone=null"
        raise SpecError(f"building {spec.target} failed: {_one_line(e)}", hint) from e


def _is_pretrained_class(factory: Any) -> bool:
    """A transformers ``PreTrainedModel`` class: ``--arg`` values are its config's fields."""
    return isinstance(factory, type) and getattr(factory, "config_class", None) is not None and hasattr(factory, "from_pretrained")


def _import_file(file: str) -> Any:
    name = "mexify_user_" + Path(file).stem
    module_spec = importlib.util.spec_from_file_location(name, file)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"cannot import {file}", "give a Python file (file.py:factory)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - user code can raise anything (or exit) at import
        sys.modules.pop(name, None)
        raise SpecError(f"importing {file} failed: {_one_line(e)}", "fix the file so that it imports cleanly") from e
    return module


def _load_export(path: str, trust_pickle: bool = False) -> nn.Module:
    """The module of a ``.pt2`` archive, read without running code from it (:func:`mexify.graph.serde.load_pt2`):
    a pickled entry needs ``trust_pickle``."""
    program = load_pt2(path, trust_pickle)
    try:
        return program.module()
    except Exception as e:  # noqa: BLE001 - torch raises several types for a program it cannot rebuild
        text = str(e).strip().splitlines()
        raise SpecError(f"cannot rebuild the module of torch.export archive {path}: {type(e).__name__}: {text[0] if text else ''}",
                        "re-save it with torch.export.save") from None


def _peek(path: str) -> str:
    """What a ``.pt`` file holds, without running code from it: ``weights``, ``pickle`` or ``other``.

    ``torch.load(weights_only=True)`` only rebuilds tensors and plain containers; it refuses any
    other class with an UnpicklingError naming "Weights only load failed".
    """
    try:
        torch.load(path, map_location="meta", weights_only=True)
        return "weights"
    except pickle.UnpicklingError as e:
        return "pickle" if "Weights only load failed" in str(e) else "other"
    except Exception:  # noqa: BLE001 - a truncated zip, a text file, an image: not a torch.save file
        return "other"


def _load_pickle(path: str, trust: bool) -> nn.Module:
    kind = _peek(path)
    if kind == "weights":
        raise SpecError(
            f"{path} holds weights only (a state_dict), not a model",
            "name the architecture with a spec (package.module:factory or file.py:factory) and pass this file with --weights",
        )
    if kind == "other":
        raise SpecError(f"{path} is not a PyTorch file (torch.save) that mexify can read",
                        "give a pickled module (with --trust-pickle), a .pt2 archive, or package.module:factory")
    if not trust:
        raise SpecError(
            f"refusing to unpickle {path}: loading a pickled module runs arbitrary code from the file",
            "pass --trust-pickle if you trust it, or give package.module:factory with --weights STATE_DICT, or a .pt2 archive",
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise SpecError(f"cannot load {path}: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict):
        raise SpecError(
            f"{path} holds a state_dict, not a module",
            "give the model as package.module:factory and pass this file with --weights",
        )
    return obj


def load_state_dict_file(path: str) -> dict:
    """Read a state_dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    Wrappers such as ``{"state_dict": ...}`` / ``{"model": ...}`` and a DDP ``module.`` prefix are undone.
    """
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"weights file not found: {path}", "check the path given to --weights")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise SpecError(
            f"cannot read weights from {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            "give a state_dict saved with torch.save or a .safetensors file",
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(f"{path} does not hold a state_dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str) -> None:
    """Load a weights file into ``model`` strictly; mismatched keys are reported by name.

    Raises:
        SpecError: missing or unexpected keys, or shape mismatches.
    """
    state = load_state_dict_file(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_few(unexpected)}")
        if wrong:
            parts.append(
                "shape mismatch: "
                + _few([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong])
            )
        raise SpecError(
            f"weights in {os.path.basename(path)} do not fit the model: " + "; ".join(parts),
            "check that the weights belong to this architecture and --arg settings (e.g. num_classes)",
        )
    model.load_state_dict(state, strict=True)


def _few(items: list, n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")
