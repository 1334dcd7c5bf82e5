"""mexify: turn any PyTorch semantic-segmentation model into a multi-exit model.

The Python API mirrors the CLI: every verb (``convert``, ``inspect``, ``load``, ``train``,
``calibrate``, ``search``, ``compare``, ``evaluate``, ``predict``, ``bench``, ``compare_engines``,
``profile``, ``export``) is in :mod:`mexify.api`. ``convert``, ``inspect`` and ``load`` are
re-exported here with the option objects (``TraceConfig``, ``Budget``, ``Trust``) and the extension
points for tracing, FLOP counting and policies (``train`` and ``calibrate`` are not: those names are
subpackages). ``mexify.inspect`` is left out of ``__all__``: ``from mexify import *`` would shadow
the standard library's ``inspect``.

The names below are imported on first use (PEP 562), so that ``import mexify.deploy`` (the
onnxruntime runner) does not import torch.
"""
from importlib import import_module
from typing import Any

from mexify._version import __version__

_LAZY = {
    "convert": "mexify.api",
    "inspect": "mexify.api",
    "load": "mexify.api",
    "MexifyError": "mexify.errors",
    "register_flop_formula": "mexify.graph.flops",
    "register_autowrap_function": "mexify.graph.trace",
    "register_leaf_module": "mexify.graph.trace",
    "register_mask_classifier": "mexify.graph.adapt",
    "MultiExitModel": "mexify.nn",
    "register_policy": "mexify.policies",
    "ConvertResult": "mexify.prepare",
    "Trust": "mexify.trust",
    "Budget": "mexify.calibrate.budget",
    "TraceConfig": "mexify.config",
    "register_builder": "mexify.trust",
}

__all__ = [
    "__version__",
    "MexifyError",
    "ConvertResult",
    "MultiExitModel",
    "convert",
    "load",
    "register_leaf_module",
    "register_mask_classifier",
    "register_autowrap_function",
    "register_flop_formula",
    "register_policy",
    "register_builder",
    "Trust",
    "Budget",
    "TraceConfig",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    try:  # a subpackage (``mexify.api``, ``mexify.runtime``, ...), as an eager import would have bound it
        return import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'mexify' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
