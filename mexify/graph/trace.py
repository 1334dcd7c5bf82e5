"""Tracing: a model becomes a ``torch.fx.GraphModule`` whose single output is the logits.

``torch.fx.symbolic_trace`` first (with caller-given leaf modules and autowrapped functions);
if it fails, ``torch.export`` (non-strict, batch and spatial sizes dynamic); if both fail, a
:class:`~mexify.errors.TraceError` names the module and source line where tracing broke.
"""
from __future__ import annotations

import importlib
import logging
import traceback
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, TypeVar, Union

import torch
import torch.fx as fx
from torch import nn

from mexify.config import TraceConfig
from mexify.errors import TraceError

__all__ = [
    "TRACER_KEY",
    "MexifyTracer",
    "trace_model",
    "module_path",
    "register_leaf_module",
    "register_autowrap_function",
    "registered_leaf_modules",
    "registered_autowrap_functions",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

TRACER_KEY = "mexify.tracer"  # gm.meta: "fx" or "export", the tracer that made the graph

# Filled by the decorators below; every trace (convert and load) consults them, like timm's
# register_notrace_module / register_notrace_function.
_LEAF_MODULES: set = set()
_AUTOWRAP_FUNCTIONS: dict = {}


def register_leaf_module(module: Union[type, str]) -> Any:
    """Keep a module class (or a qualified module name) as one node when tracing.

    The Python counterpart of ``mexify convert --leaf-module``; usable as a class decorator::

        @mexify.register_leaf_module
        class DataDependentGate(nn.Module): ...

    The registration must run before :func:`mexify.load` too (import the module that
    defines the class), since loading traces the model again.
    """
    if not isinstance(module, (type, str)):
        raise TypeError(f"register_leaf_module takes a module class or a name, not {type(module).__name__}")
    _LEAF_MODULES.add(module)
    return module


def register_autowrap_function(fn: T) -> T:
    """Record calls to ``fn`` as single graph nodes (``mexify convert --autowrap``); a decorator."""
    if not callable(fn):
        raise TypeError(f"register_autowrap_function takes a function, not {type(fn).__name__}")
    _AUTOWRAP_FUNCTIONS[f"{fn.__module__}.{fn.__qualname__}"] = fn
    return fn


def registered_leaf_modules() -> List[str]:
    """Names of the registered leaf modules (classes by class name)."""
    return sorted(m if isinstance(m, str) else m.__name__ for m in _LEAF_MODULES)


def registered_autowrap_functions() -> List[str]:
    """Qualified names of the registered autowrapped functions."""
    return sorted(_AUTOWRAP_FUNCTIONS)


class MexifyTracer(fx.Tracer):
    """An ``fx.Tracer`` that keeps caller-named modules as leaves and remembers where it is.

    Args:
        leaf_modules: class names (``Bottleneck``) or qualified names (``backbone.layer4``)
            of modules to keep as single ``call_module`` nodes.
        autowrap_functions: functions to record as calls instead of tracing through.
    """

    def __init__(self, leaf_modules: Iterable[str] = (), autowrap_functions: Sequence[Callable] = ()):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.leaf_names = set(leaf_modules)
        self.module_scope: List[Tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m).__name__ in self.leaf_names or module_qualified_name in self.leaf_names:
            return True
        if type(m) in _LEAF_MODULES or module_qualified_name in _LEAF_MODULES:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: Any, kwargs: Any) -> Any:
        self.module_scope.append((self.path_of_module(m), type(m).__name__))
        result = super().call_module(m, forward, args, kwargs)
        self.module_scope.pop()
        return result


def _resolve_function(name: str) -> Callable:
    if name in _AUTOWRAP_FUNCTIONS:
        return _AUTOWRAP_FUNCTIONS[name]
    module_name, _, attr = name.rpartition(".") if ":" not in name else name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise TraceError(f"cannot import autowrap function {name!r}", "write it as package.module.function") from e


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: the line where tracing broke."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        f = frame.filename.replace("\\", "/")
        if "/torch/" not in f and "/mexify/" not in f:
            return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return ""


def trace_model(model: nn.Module, config: TraceConfig, example: torch.Tensor) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule, trying torch.fx first and torch.export second.

    Args:
        model: the eager model (left in the train/eval mode it arrived in).
        config: leaf modules, autowrapped functions and the method to use.
        example: an example input batch (used by torch.export only).

    Raises:
        TraceError: neither tracer could handle the model.
    """
    if isinstance(model, fx.GraphModule):
        return model
    was_training = model.training
    fx_error: Optional[BaseException] = None
    where = ""
    try:
        if config.method in ("auto", "fx"):
            wrapped = {f: _resolve_function(f) for f in config.autowrap_functions}
            wrapped.update(_AUTOWRAP_FUNCTIONS)
            tracer = MexifyTracer(config.leaf_modules, list(wrapped.values()))
            try:
                graph = tracer.trace(model)
                name = model.__class__.__name__
                gm = fx.GraphModule(tracer.root, graph, name)
                gm.meta[TRACER_KEY] = "fx"
                return gm
            except TraceError:
                raise
            except Exception as e:  # noqa: BLE001 - fx raises many kinds
                fx_error = e
                if tracer.module_scope:
                    path, cls = tracer.module_scope[-1]
                    where = f" in module {path or '<root>'!r} ({cls})"
                line = _user_frame(e)
                if line:
                    where += f" at {line}"
                log.info("torch.fx could not trace %s%s: %s", type(model).__name__, where, e)
        if config.method in ("auto", "export"):
            try:
                gm = _export(model, example)
                gm.meta[TRACER_KEY] = "export"
                return gm
            except Exception as e:  # noqa: BLE001
                if fx_error is None:
                    raise TraceError(
                        f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: {_first_line(e)}",
                        "try --trace fx with --leaf-module for the offending block",
                    ) from e
                log.info("torch.export could not trace %s either: %s", type(model).__name__, _first_line(e))
        assert fx_error is not None
        leaf = f"--leaf-module {where.split('(')[1].split(')')[0]}" if "(" in where else "--leaf-module NAME"
        raise TraceError(
            f"cannot trace {type(model).__name__}{where}: {type(fx_error).__name__}: {_first_line(fx_error)}",
            f"mark the block as a leaf with {leaf} (a class or qualified module name), "
            "and see `mexify inspect` for the traced graph",
        ) from fx_error
    finally:
        model.train(was_training)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _export(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    from torch.export import Dim

    model.eval()
    if example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()
    auto = getattr(Dim, "AUTO", None)
    attempts = []
    if auto is not None:
        attempts.append(({0: auto, 2: auto, 3: auto},))
        attempts.append(({0: auto},))
    attempts.append(({0: Dim("batch")},))
    last: Optional[BaseException] = None
    for dynamic in attempts:
        try:
            program = torch.export.export(model, (example,), strict=False, dynamic_shapes=dynamic)
            log.info("traced %s with torch.export (dynamic dims %s)", type(model).__name__, list(dynamic[0]))
            return program.module()
        except Exception as e:  # noqa: BLE001
            last = e
    assert last is not None
    raise last


def module_path(node: fx.Node) -> List[str]:
    """Qualified names of the modules a node was traced inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, value in stack.items():
        path = value[0] if isinstance(value, tuple) else key
        out.append(path.replace("L__self__", "").lstrip("._") if isinstance(path, str) else str(key))
    return [p for p in out if p]
