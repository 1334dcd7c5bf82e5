"""Tracing: a model becomes a ``torch.fx.GraphModule`` whose single output is the logits.

``torch.fx.symbolic_trace`` first (with caller-given leaf modules and autowrapped functions);
if it fails, ``torch.export`` (non-strict, batch and spatial sizes dynamic); if both fail, a
:class:`~mexify.errors.TraceError` names the module and source line where tracing broke.
"""
from __future__ import annotations

import builtins
import importlib
import logging
import operator
import traceback
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mexify.config import TraceConfig
from mexify.errors import TraceError

__all__ = ["MexifyTracer", "trace_model", "prepare_graph", "module_path", "upsample_to_input"]

log = logging.getLogger(__name__)


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
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: Any, kwargs: Any) -> Any:
        self.module_scope.append((self.path_of_module(m), type(m).__name__))
        result = super().call_module(m, forward, args, kwargs)
        self.module_scope.pop()
        return result


def _resolve_function(name: str) -> Callable:
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
            tracer = MexifyTracer(config.leaf_modules, [_resolve_function(f) for f in config.autowrap_functions])
            try:
                graph = tracer.trace(model)
                name = model.__class__.__name__
                return fx.GraphModule(tracer.root, graph, name)
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
                return _export(model, example)
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


def _output_structure(gm: fx.GraphModule) -> Any:
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    structure = out_node.args[0]
    codegen = getattr(gm.graph, "_codegen", None)
    info = getattr(codegen, "pytree_info", None)
    if info is not None and getattr(info, "out_spec", None) is not None:
        import torch.utils._pytree as pytree

        flat = list(structure) if isinstance(structure, (tuple, list)) else [structure]
        structure = pytree.tree_unflatten(flat, info.out_spec)
    return structure


def _pick_logits(structure: Any, graph: fx.Graph) -> fx.Node:
    if isinstance(structure, fx.Node):
        if structure.op == "call_function" and isinstance(structure.target, type) and "logits" in structure.kwargs:
            return _pick_logits(structure.kwargs["logits"], graph)
        return structure
    if isinstance(structure, dict):
        for key in ("out", "logits"):
            if key in structure:
                return _pick_logits(structure[key], graph)
        return _pick_logits(next(iter(structure.values())), graph)
    if isinstance(structure, (tuple, list)) and structure:
        return _pick_logits(structure[0], graph)
    if hasattr(structure, "logits"):
        return _pick_logits(structure.logits, graph)
    raise TraceError(f"cannot find the logits in the traced output {structure!r}")


def prepare_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Make the graph return only the logits tensor and take plain positional inputs.

    The output adapter follows what users of the model do: a tensor as is, ``out`` or
    ``logits`` of a dict, ``.logits`` of an object, the first element of a tuple/list.
    Branches feeding only discarded outputs (e.g. torchvision's ``aux``) are removed.
    """
    structure = _output_structure(gm)
    logits = _pick_logits(structure, gm.graph)
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    out_node.args = (logits,)
    out_node.kwargs = {}
    if getattr(gm.graph, "_codegen", None) is not None and type(gm.graph._codegen) is not fx.graph.CodeGen:
        gm.graph._codegen = fx.graph.CodeGen()
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def upsample_to_input(gm: fx.GraphModule) -> fx.GraphModule:
    """Append a bilinear upsampling of the logits to the input's spatial size (in place)."""
    graph = gm.graph
    image = next(n for n in graph.nodes if n.op == "placeholder")
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    logits = out_node.args[0]
    with graph.inserting_before(out_node):
        shape = graph.call_function(builtins.getattr, (image, "shape"))
        size = graph.call_function(operator.getitem, (shape, slice(-2, None)))
        up = graph.call_function(F.interpolate, (logits,), {"size": size, "mode": "bilinear", "align_corners": False})
    out_node.args = (up,)
    graph.lint()
    gm.recompile()
    return gm
