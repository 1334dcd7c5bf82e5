"""Split a graph into stages at exit points, carrying every value alive at each cut.

Stage ``i`` runs the nodes after exit ``i - 1`` up to and including exit ``i``. Its inputs
are the values alive at the previous cut (skip tensors, saved shapes, ...), its outputs the
values alive at its own cut plus the exit's feature map, so inference can stop after any
stage and continue from it. The last stage returns the logits alone.

``keep`` carries more values than the graph needs: a fused exit head's skip feature is an output
of every stage from the one computing it to its exit's (and an input of those in between), like
any value alive at a cut, so batch shrinking, CUDA graphs and exports carry and shrink it too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch.fx as fx
from torch.fx.graph_module import _copy_attr  # what torchvision's feature extraction uses too

from mexify.errors import PlacementError, nearest
from mexify.graph.batching import BATCH_KEY
from mexify.graph.trace import module_path
from mexify.graph.liveness import compute_nodes, last_uses, live_values

__all__ = ["Stage", "split_stages", "DualGraphModule", "pair_stages", "corresponding_node"]


@dataclasses.dataclass
class Stage:
    """One piece of the graph: ``module(*inputs) -> outputs`` (a tuple except for the last stage)."""

    module: fx.GraphModule
    inputs: List[str]
    outputs: List[str]
    exit_value: str  # name of the exit feature map among ``outputs`` ("" for the last stage)
    batch_dims: Dict[str, str] = dataclasses.field(default_factory=dict)  # output -> batch dependence
    # the train-mode graph's (inputs, outputs) when ``module`` is a DualGraphModule: train mode may
    # carry other values across a cut (e.g. the batch size for stochastic depth's noise)
    train_io: Optional[Tuple[List[str], List[str]]] = None


def split_stages(gm: fx.GraphModule, exit_names: Sequence[str], keep: Optional[Mapping[str, str]] = None) -> List[Stage]:
    """Cut ``gm`` after each named node; returns ``len(exit_names) + 1`` stages.

    Args:
        keep: value name -> the exit up to whose cut it stays alive (a fused head's skip feature).

    Raises:
        PlacementError: a name is not a node of the graph, or the names are out of order.
    """
    nodes = compute_nodes(gm.graph)
    pos = {n.name: i for i, n in enumerate(nodes)}
    keep = dict(keep or {})
    for name in [*exit_names, *keep, *keep.values()]:
        if name not in pos:
            raise PlacementError(
                f"{name!r} is not a node of the traced graph",
                f"nearest: {', '.join(nearest(name, pos, n=5))}; see `mexify inspect`",
            )
    cuts = [pos[n] for n in exit_names]
    if cuts != sorted(cuts) or len(set(cuts)) != len(cuts):
        raise PlacementError("exit points must be distinct and in execution order")
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    logits = out_node.args[0]
    last_in, last_out = _kept_alive(nodes, pos, keep)

    stages: List[Stage] = []
    bounds = [-1] + cuts + [len(nodes) - 1]
    for s in range(len(bounds) - 1):
        lo, hi = bounds[s], bounds[s + 1]
        is_last = s == len(bounds) - 2
        live_in = live_values(nodes, lo, last_in) if lo >= 0 else []
        graph = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        attrs: Dict[str, fx.Node] = {}
        for v in live_in:
            env[v] = graph.placeholder(v.name)

        def lookup(a: fx.Node) -> fx.Node:
            if a in env:
                return env[a]
            if a.op == "get_attr":  # parameters and buffers are fetched where they are used
                if a.target not in attrs:
                    attrs[a.target] = graph.get_attr(a.target)
                    attrs[a.target].meta = dict(a.meta)
                return attrs[a.target]
            raise PlacementError(f"node {a.name!r} is used before it is computed in stage {s}")

        for n in nodes[lo + 1: hi + 1]:
            new = graph.node_copy(n, lookup)
            env[n] = new
        if is_last:
            graph.output(lookup(logits))
            outputs, exit_value, batch_dims = [logits.name], "", {}
        else:
            exit_node = nodes[hi]
            live_out = live_values(nodes, hi, last_out)
            out_list = [exit_node] + [v for v in live_out if v is not exit_node]
            graph.output(tuple(lookup(v) for v in out_list))
            outputs, exit_value = [v.name for v in out_list], exit_node.name
            batch_dims = {v.name: str(v.meta[BATCH_KEY]) for v in out_list if BATCH_KEY in v.meta}
        graph.lint()
        module = fx.GraphModule(gm, graph, f"Stage{s}")
        inputs = [v.name for v in live_in] if lo >= 0 else [n.name for n in nodes if n.op == "placeholder"]
        stages.append(Stage(module, inputs, outputs, exit_value, batch_dims))
    return stages


def _kept_alive(nodes: List[fx.Node], pos: Dict[str, int], keep: Mapping[str, str]) -> Tuple[Dict[fx.Node, int], Dict[fx.Node, int]]:
    """Last uses for a stage's inputs and for its outputs: a kept value leaves every stage up to its exit's (alive
    *at* that cut) but enters only the stages before that exit's."""
    last_use = last_uses(nodes)
    last_in, last_out = dict(last_use), dict(last_use)
    for name, until in keep.items():
        if pos[name] > pos[until]:
            raise PlacementError(f"value {name!r} is computed after exit {until!r} and cannot be carried to it")
        v = nodes[pos[name]]
        last_out[v] = max(last_use[v], pos[until] + 1)
        last_in[v] = max(last_use[v], pos[until])
    return last_in, last_out


def _signature(n: fx.Node) -> Optional[Tuple[int, Any]]:
    """Rank and channels of a node's value where the trace recorded them (torch.export's ``val``), else None."""
    val = n.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    return len(shape), (shape[1] if len(shape) > 1 and isinstance(shape[1], int) else None)


def corresponding_node(eval_gm: fx.GraphModule, train_gm: fx.GraphModule, name: str) -> Optional[str]:
    """The train-mode graph's node for the eval-mode node ``name``: the same operation of the same module with a value
    of the same rank and channels, counted in order (train-only nodes, e.g. stochastic depth's ``rand + keep``, shift
    fx's name counters and add operations of the same kind); None when there is none."""
    def same_kind(gm: fx.GraphModule, like: fx.Node) -> List[fx.Node]:
        return [n for n in gm.graph.nodes if _same_node(n, like) and _signature(n) in (None, _signature(like))]

    node = next((n for n in eval_gm.graph.nodes if n.name == name), None)
    if node is None:
        return None
    k, twins = same_kind(eval_gm, node).index(node), same_kind(train_gm, node)
    return twins[k].name if k < len(twins) else None


class DualGraphModule(fx.GraphModule):
    """One stage with a train-mode and an eval-mode graph over the same parameters.

    ``train()`` and ``eval()`` swap the graph, as torchvision's feature extraction does: tracing
    fixes ``F.dropout(x, self.training)`` or stochastic depth to the mode traced in, so each mode
    gets its own trace. Parameters and buffers are registered once (shared by both graphs), so
    the state dict is that of the eval-mode stage.
    """

    def __init__(self, eval_module: fx.GraphModule, train_module: fx.GraphModule, class_name: str = "DualStage"):
        super(fx.GraphModule, self).__init__()  # nn.Module's: GraphModule's would take one graph
        self.meta = {}
        for source in (eval_module, train_module):
            for node in source.graph.nodes:
                if node.op in ("get_attr", "call_module"):
                    _copy_attr(source, self, node.target)
        self.train_graph = train_module.graph
        self.eval_graph = eval_module.graph
        self._class_name = class_name
        self.training = False
        self.graph = self.eval_graph

    def train(self, mode: bool = True) -> "DualGraphModule":
        if mode != self.training:
            self.graph = self.train_graph if mode else self.eval_graph
        return super().train(mode)


def _same_node(a: fx.Node, b: fx.Node) -> bool:
    return a.op == b.op and a.target == b.target and module_path(a) == module_path(b)


def pair_stages(eval_stages: Sequence[Stage], train_stages: Sequence[Stage], eval_gm: fx.GraphModule,
                train_gm: fx.GraphModule) -> str:
    """Give every eval-mode stage its train-mode graph (in place); returns why not ("" when done).

    Both graphs must cut at the same operations (node names alone are not enough: train-only
    nodes shift the name counters) and end with the same logits; the values carried across a cut
    may differ, and are recorded in ``Stage.train_io``.
    """
    if len(eval_stages) != len(train_stages):
        return "the train-mode graph has other exit points"
    by_name_e = {n.name: n for n in eval_gm.graph.nodes}
    by_name_t = {n.name: n for n in train_gm.graph.nodes}
    if eval_stages[0].inputs != train_stages[0].inputs:
        return "in train mode, the model takes other inputs"
    for e, t in zip(eval_stages, train_stages):
        end_e, end_t = (e.exit_value, t.exit_value) if e.exit_value else (e.outputs[0], t.outputs[0])
        if not _same_node(by_name_e[end_e], by_name_t[end_t]):
            return f"in train mode, exit {end_e!r} is another operation" if e.exit_value else "in train mode, the model ends with another operation"
    for e, t in zip(eval_stages, train_stages):
        e.module = DualGraphModule(e.module, t.module, type(e.module).__name__)
        e.train_io = (list(t.inputs), list(t.outputs))
    return ""
