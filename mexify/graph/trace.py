"""Tracing: a model becomes a ``torch.fx.GraphModule`` whose single output is the logits.

``torch.fx.symbolic_trace`` first (with caller-given leaf modules and autowrapped functions);
if it fails, ``torch.export`` (non-strict, batch and spatial sizes dynamic); if both fail, a
:class:`~mexify.errors.TraceError` names the module and source line where tracing broke.
"""
from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, TypeVar, Union

import torch
import torch.fx as fx
from torch import nn

from mexify.config import TraceConfig
from mexify.errors import TraceError
from mexify.graph.modes import training_mode

__all__ = [
    "TRACER_KEY",
    "EXPORT_SHAPES_KEY",
    "time_limit",
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
EXPORT_SHAPES_KEY = "mexify.export_shapes"  # gm.meta: which dimensions torch.export kept dynamic

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


def trace_model(model: nn.Module, config: TraceConfig, example: torch.Tensor, training: bool = False) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule, trying torch.fx first and torch.export second.

    torch.export tries batch and spatial sizes dynamic, then the batch only (spatial sizes fixed
    at the example's), each attempt bounded by ``MEXIFY_TRACE_TIMEOUT`` seconds (default 120);
    ``gm.meta`` records the tracer (:data:`TRACER_KEY`) and the export attempt that worked
    (:data:`EXPORT_SHAPES_KEY`).

    Args:
        model: the eager model (left in the train/eval mode it arrived in).
        config: leaf modules, autowrapped functions and the method to use.
        example: an example input batch (used by torch.export only).
        training: export the model's train-mode behaviour (torch.fx traces the modes the caller set).

    Raises:
        TraceError: neither tracer could handle the model.
    """
    if isinstance(model, fx.GraphModule):
        return model
    fx_error: Optional[BaseException] = None
    scope: Optional[Tuple[str, str]] = None
    with training_mode(model, None):  # the caller's model is handed back in its mode
        if config.method in ("auto", "fx"):
            gm, fx_error, scope = _trace_fx(model, config)
            if gm is not None:
                return gm
        if config.method in ("auto", "export"):
            try:
                return _export(model, example, config.export_shapes, training)
            except Exception as e:  # noqa: BLE001
                if fx_error is None:
                    raise TraceError(
                        f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: {_first_line(e)}",
                        "try --trace fx with --leaf-module for the offending block",
                    ) from e
                log.info("torch.export could not trace %s either: %s", type(model).__name__, _first_line(e))
        assert fx_error is not None
        raise _fx_failure(model, fx_error, scope) from fx_error


def _trace_fx(model: nn.Module, config: TraceConfig):
    """(GraphModule, None, None) on success, else (None, the error, the innermost (path, class) traced)."""
    wrapped = {f: _resolve_function(f) for f in config.autowrap_functions}
    wrapped.update(_AUTOWRAP_FUNCTIONS)
    tracer = MexifyTracer(config.leaf_modules, list(wrapped.values()))
    try:
        graph = tracer.trace(model)
    except TraceError:
        raise
    except Exception as e:  # noqa: BLE001 - fx raises many kinds
        scope = tracer.module_scope[-1] if tracer.module_scope else None
        log.info("torch.fx could not trace %s in %s: %s", type(model).__name__, scope, e)
        return None, e, scope
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    gm.meta[TRACER_KEY] = "fx"
    return gm, None, None


def _fx_failure(model: nn.Module, error: BaseException, scope: Optional[Tuple[str, str]]) -> TraceError:
    """The error for a model neither tracer could handle: where it broke and which leaf to try."""
    where = ""
    if scope is not None:
        path, cls = scope
        where = f" in module {path or '<root>'!r} ({cls})"
    line = _user_frame(error)
    if line:
        where += f" at {line}"
    if scope is not None and scope[0]:
        leaf = f"--leaf-module {scope[1]} (its class) or --leaf-module {scope[0]} (this instance)"
    elif scope is not None:
        leaf = "--leaf-module NAME for the block that holds this line (the whole model is the root)"
    else:
        leaf = "--leaf-module NAME (a class or qualified module name)"
    return TraceError(
        f"cannot trace {type(model).__name__}{where}: {type(error).__name__}: {_first_line(error)}",
        f"mark the block as a leaf with {leaf}, and see `mexify inspect` for the traced graph",
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


EXPORT_ATTEMPTS = ("batch+spatial", "batch")


def _trace_timeout() -> Optional[float]:
    value = os.environ.get("MEXIFY_TRACE_TIMEOUT", "120")
    try:
        seconds = float(value)
    except ValueError:
        raise TraceError(f"MEXIFY_TRACE_TIMEOUT={value!r} is not a number of seconds", "e.g. MEXIFY_TRACE_TIMEOUT=300") from None
    return seconds if seconds > 0 else None


class _TimeLimit(BaseException):
    """Raised by :func:`time_limit`; a BaseException so that the ``except Exception`` blocks inside
    torch.export and sympy cannot swallow it."""


@contextmanager
def time_limit(seconds: Optional[float]):
    """Raise inside the block once ``seconds`` have passed (main thread on POSIX; elsewhere no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise _TimeLimit(f"gave up after {seconds:g} s (MEXIFY_TRACE_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)  # and again every second until the block ends
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _dynamic_shapes(kind: str) -> dict:
    from torch.export import Dim  # imported here: torch.export is slow to import and only needed on this path

    auto = getattr(Dim, "AUTO", None)
    dims = (0, 2, 3) if kind == "batch+spatial" else (0,)
    if auto is not None:
        return {d: auto for d in dims}
    return {0: Dim("batch")} if kind == "batch" else {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}


def _check_sizes(gm: fx.GraphModule, example: torch.Tensor, spatial: bool) -> None:
    """Run the exported graph at batch 1 and 3, and with ``spatial`` at twice the example's size, on fake tensors
    (on real ones where a result depends on values: ``.item()``, ``nonzero``). Its guards may tie the batch to
    the spatial size (seen on MobileViT-style patch unfolding), which a shrinking batch breaks, or bound the
    spatial sizes it was called dynamic in (a size read as a Python int in a range check)."""
    from torch._subclasses.fake_tensor import (  # private, present on every supported torch
        DataDependentOutputException,
        DynamicOutputShapeException,
        FakeTensorMode,
    )

    h, w = example.shape[-2:]
    sizes = [(1, h, w), (3, h, w)] + ([(1, 2 * h, 2 * w)] if spatial else [])
    for b, hh, ww in sizes:
        x = example[:1].expand(b, *example.shape[1:]) if (hh, ww) == (h, w) else example.new_zeros(b, example.shape[1], hh, ww)
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
                try:
                    gm(mode.from_tensor(x))
                except (DataDependentOutputException, DynamicOutputShapeException):  # .item(), nonzero: run it for real
                    mode = None
            if mode is None:
                with torch.no_grad():
                    gm(x.contiguous())
        except Exception as e:  # noqa: BLE001 - a failed guard or shape check
            what = f"batch {b}" if (hh, ww) == (h, w) else f"{hh}x{ww} images"
            raise RuntimeError(f"the exported graph does not accept {what}: {_first_line(e)}") from e


def _export(model: nn.Module, example: torch.Tensor, shapes: str = "", training: bool = False) -> fx.GraphModule:
    """torch.export (non-strict), dynamic batch and spatial sizes, else the batch only; each attempt time-bounded.

    With ``training``, the train-mode program (BatchNorm updating its statistics in place, dropout
    on); its parameters and buffers are the model's own, as in the eval-mode program.
    """
    model.train(training)
    if example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()
    attempts = [shapes] if shapes else list(EXPORT_ATTEMPTS)
    errors = []
    for kind in attempts:
        try:
            with time_limit(_trace_timeout()):
                program = torch.export.export(model, (example,), strict=False, dynamic_shapes=(_dynamic_shapes(kind),))
            gm = program.module()
            if not training:  # the train-mode graph runs at the training batch size, never shrunk
                _check_sizes(gm, example, spatial=kind == "batch+spatial")
        except (Exception, _TimeLimit) as e:  # noqa: BLE001 - export raises many kinds; try the next, report all
            errors.append(f"{kind}: {type(e).__name__}: {_first_line(e)}")
            log.info("torch.export with %s dynamic failed: %s", kind, errors[-1])
            continue
        log.info("traced %s with torch.export (%s dynamic)", type(model).__name__, kind)
        gm.meta[TRACER_KEY] = "export"
        gm.meta[EXPORT_SHAPES_KEY] = kind
        return gm
    raise RuntimeError("; ".join(errors))


def module_path(node: fx.Node) -> List[str]:
    """Qualified names of the modules a node was traced inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, value in stack.items():
        path = value[0] if isinstance(value, tuple) else key
        out.append(path.replace("L__self__", "").lstrip("._") if isinstance(path, str) else str(key))
    return [p for p in out if p]
