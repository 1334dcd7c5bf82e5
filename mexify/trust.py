"""What a file may make mexify do: the trust policy.

A bundle's ``config.yaml`` names the model's factory, and a model file may hold pickles. Both are
code: importing a module runs it, calling a factory runs it, unpickling runs whatever the pickle
names. A bundle or ``.pt2`` archive may come from anyone (a colleague, a model zoo, a CI
artefact), so mexify decides *before* importing, calling or unpickling anything, in the spirit of
transformers' ``trust_remote_code``:

* **Trusted by default:** the model builders of well-known libraries (torchvision's model
  builders, segmentation_models_pytorch's architectures and ``create_model``, timm's model
  entrypoints and ``create_model``, transformers' ``PreTrainedModel`` classes built from a
  config), and what the user registered (:func:`register_builder`, or the
  ``MEXIFY_TRUSTED_CODE`` environment variable: comma-separated ``package.module:factory``
  targets, module prefixes, or ``.py`` files and folders).
* ``Trust(code=True)`` (``--trust-code``): import and call any factory or ``file.py`` a bundle names.
* ``Trust(pickle=True)`` (``--trust-pickle``): unpickle a ``.pt`` module or a pickled entry of a
  ``.pt2`` archive.

A spec given directly to ``convert`` or ``inspect`` (typed on the command line, written in the
caller's code) is the caller's own choice and runs as code; what a *file* names is checked here.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Set, Union

from mexify.errors import SpecError

__all__ = ["Trust", "register_builder", "registered_builders", "check_factory", "check_import", "TRUST_ENV"]

TRUST_ENV = "MEXIFY_TRUSTED_CODE"
_LOCK = threading.Lock()
_REGISTERED: Set[str] = set()

# arguments that make a known builder read a file of the caller's choosing (timm reads checkpoints
# with torch.load); a bundle may not pass them without --trust-code
_FILE_ARGS = {"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_model_name_or_path"}
_LIBRARIES = ("torchvision", "segmentation_models_pytorch", "timm", "transformers", "torch")


@dataclasses.dataclass(frozen=True)
class Trust:
    """How far mexify trusts the files it is given (both off by default).

    Attributes:
        code: import and call any factory, module or ``file.py`` that a bundle names.
        pickle: unpickle a pickled module (``.pt``) or pickled entries of a ``.pt2`` archive.
    """

    code: bool = False
    pickle: bool = False

    def flags(self) -> str:
        """The command-line flags that give this trust (for hints)."""
        return " ".join(f for f, on in (("--trust-code", self.code), ("--trust-pickle", self.pickle)) if on)


def register_builder(target: Union[str, Callable[..., Any]]) -> Union[str, Callable[..., Any]]:
    """Trust a model builder of your own, so bundles naming it load without ``--trust-code``.

    ``target`` is a callable (usable as a decorator), ``package.module:factory``, a module prefix
    (``mypkg`` trusts every factory under ``mypkg``), or a ``.py`` file or a folder of them.
    """
    if callable(target):
        name = f"{target.__module__}:{target.__qualname__}"
    elif isinstance(target, str) and target:
        name = target
    else:
        raise SpecError(f"register_builder takes a callable or a string, not {target!r}")
    with _LOCK:
        _REGISTERED.add(_normalise(name))
    return target


def registered_builders() -> Set[str]:
    """What the user trusts: :func:`register_builder` entries and ``MEXIFY_TRUSTED_CODE``."""
    env = {_normalise(e.strip()) for e in os.environ.get(TRUST_ENV, "").split(",") if e.strip()}
    with _LOCK:
        return set(_REGISTERED) | env


def _normalise(entry: str) -> str:
    path = entry.rpartition(":")[0] if entry.rpartition(":")[0].endswith(".py") else entry
    if path.endswith(".py") or os.sep in path or path.startswith(("~", ".")):
        resolved = str(Path(path).expanduser().resolve())
        return resolved + entry[len(path):]
    return entry


def _user_trusts_module(module: str, name: str) -> bool:
    for entry in registered_builders():
        if ":" in entry and not entry.rpartition(":")[0].endswith(".py"):
            if entry == f"{module}:{name}":
                return True
        elif module == entry or module.startswith(entry + "."):
            return True
    return False


def _user_trusts_file(file: str, name: str) -> bool:
    file = str(Path(file).resolve())
    for entry in registered_builders():
        if entry == file or entry == f"{file}:{name}":
            return True
        if not entry.endswith(".py") and ":" not in entry and file.startswith(entry.rstrip(os.sep) + os.sep):
            return True
    return False


def _refuse(target: str, where: str, why: str) -> SpecError:
    entry = target.rpartition(":")[0] or target
    return SpecError(
        f"{where} names {target!r}, {why}; loading it would import and run that code",
        f"pass --trust-code (trust=mexify.Trust(code=True)) if you trust where it came from, "
        f"or trust it once with {TRUST_ENV}={entry}",
    )


def check_factory(kind: str, target: str, args: Optional[Mapping[str, Any]], trust: Trust, where: str = "the bundle") -> None:
    """Decide, before anything is imported or called, whether a spec from a file may be built.

    Args:
        kind: the spec kind (``factory``, ``file``, ``export``, ``pickle``).
        target: ``package.module:factory`` or ``/path/file.py:factory``.
        args: the keyword arguments the factory would get.
        trust: the caller's trust.
        where: what named the target, for the message.

    Raises:
        SpecError: the target is not a known or registered model builder and ``trust.code`` is off.
    """
    if kind == "pickle":
        if not trust.pickle:
            raise SpecError(
                f"{where} is a pickled module ({target}); unpickling runs arbitrary code from the file",
                "pass --trust-pickle (trust_pickle=True) if you trust it; `mexify export BUNDLE -o OUT --format pt2 "
                "--trust-pickle` once gives a bundle that loads without it",
            )
        return
    if kind not in ("factory", "file") or trust.code:
        return
    if kind == "file":
        file, _, name = target.rpartition(":")
        if not _user_trusts_file(file, name):
            raise _refuse(target, where, "a Python file")
        return
    module, _, name = target.partition(":")
    if _user_trusts_module(module, name):
        return
    root = module.split(".")[0]
    if root not in _LIBRARIES or root == "torch":
        raise _refuse(target, where, "which is not a known model builder")
    reason = _library_builder_issue(root, module, name)
    if reason:
        raise _refuse(target, where, reason)
    bad = sorted(set(args or {}) & _FILE_ARGS)
    if bad:
        raise _refuse(target, where, f"with argument(s) {', '.join(bad)} that make it read other files")


def _library_builder_issue(root: str, module_name: str, name: str) -> str:
    """Why ``module_name:name`` is not a model builder of the library ``root`` ("" when it is).

    The library itself is trusted code, so it is imported to look the callable up; nothing is called.
    """
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return ""  # build_model reports the missing package in its own words
    except Exception as e:  # noqa: BLE001 - a broken install of the library
        return f"whose module fails to import ({type(e).__name__})"
    obj = getattr(module, name, None)
    if obj is None:
        return ""  # build_model names the missing factory with suggestions
    if root == "torchvision":
        from torchvision import models

        ok = module_name.startswith("torchvision.models") and any(obj is models.get_model_builder(n) for n in models.list_models())
    elif root == "timm":
        import timm

        ok = obj is timm.create_model or (timm.is_model(name) and obj is timm.models.model_entrypoint(name))
    elif root == "segmentation_models_pytorch":
        import segmentation_models_pytorch as smp
        from torch import nn

        ok = obj is smp.create_model or (
            inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__.startswith("segmentation_models_pytorch"))
    else:  # transformers: model classes, built from their config class (never from_pretrained)
        import transformers

        ok = inspect.isclass(obj) and issubclass(obj, transformers.PreTrainedModel) and obj is not transformers.PreTrainedModel
    return "" if ok else f"which is not one of {root}'s model builders"


def check_import(name: str, trust: Trust, where: str = "the bundle") -> None:
    """Whether a module a file names (an autowrap function ``package.module.fn``) may be imported.

    Raises:
        SpecError: the module is outside the known libraries and the user's registered builders.
    """
    if trust.code:
        return
    module = name.partition(":")[0] if ":" in name else name.rpartition(".")[0]
    if module.split(".")[0] in _LIBRARIES or _user_trusts_module(module, name):
        return
    raise _refuse(name, where, "a function of a module that is not a known library")
