"""Output adapters: find the logits in what a model returns, in eager outputs and in graphs.

One rule serves both places (the traced graph's output and an eager call's result, e.g. the
original model timed by ``mexify bench``), so they can never disagree:

1. a tensor (or graph node) is the logits;
2. a mapping gives its ``out`` entry, else ``logits``, else its first value;
3. an object with a ``logits`` attribute gives that attribute (HuggingFace outputs);
4. a non-empty tuple or list gives its first element (auxiliary outputs come later).

Branches that feed only the discarded outputs (torchvision's ``aux``) are removed from the graph.
"""
from __future__ import annotations

import builtins
import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree

from mexify.errors import TraceError

__all__ = ["pick_logits", "adapt_output", "prepare_graph", "upsample_to_input"]

_LOGITS_KEYS = ("out", "logits")


def pick_logits(output: Any) -> Any:
    """The logits in ``output`` (a tensor, a graph node, or a structure of them); see the module doc.

    Raises:
        TraceError: nothing in ``output`` is a tensor or a node.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, fx.Node):
        # torch.export keeps dataclass outputs (HuggingFace) as a constructor call with keyword args
        if output.op == "call_function" and isinstance(output.target, type) and "logits" in output.kwargs:
            return pick_logits(output.kwargs["logits"])
        return output
    if isinstance(output, Mapping):
        for key in _LOGITS_KEYS:
            if key in output:
                return pick_logits(output[key])
        if output:
            return pick_logits(next(iter(output.values())))
    elif hasattr(output, "logits"):
        return pick_logits(output.logits)
    elif isinstance(output, (tuple, list)) and output:
        return pick_logits(output[0])
    raise TraceError(f"cannot find the logits in a model output of type {type(output).__name__}",
                     "the model should return a tensor, a dict with 'out'/'logits', or a tuple with the logits first")


def adapt_output(output: Any) -> torch.Tensor:
    """The logits tensor of an eager model call (see :func:`pick_logits`)."""
    return pick_logits(output)


def _output_structure(gm: fx.GraphModule) -> Any:
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    structure = out_node.args[0]
    codegen = getattr(gm.graph, "_codegen", None)
    info = getattr(codegen, "pytree_info", None)
    if info is not None and getattr(info, "out_spec", None) is not None:
        flat = list(structure) if isinstance(structure, (tuple, list)) else [structure]
        structure = pytree.tree_unflatten(flat, info.out_spec)
    return structure


def prepare_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Make the graph return only the logits tensor and take plain positional inputs (in place)."""
    logits = pick_logits(_output_structure(gm))
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
