"""How every value of a graph depends on the batch, so that a batch can shrink between stages.

Early exits shrink the batch after a cut: the rows that left are dropped from every value
alive there. A tensor with the batch along dimension 0 is the easy case, but graphs also carry
the batch in Python ints (``b = x.shape[0]``), in sizes (``B, C, H, W = x.shape``), along
another dimension (sequence-first ``(N, B, C)`` tensors) or mixed into a dimension
(``(B * heads, N, C)``). Slicing only first dimensions that happen to equal the batch size
crashes in a later ``reshape`` or, worse, mixes rows of different images.

:func:`analyze_batch` runs the graph twice, at two batch sizes, on fake tensors (no arithmetic)
and classifies every node's value by comparing the two runs:

* ``none``: the same at both sizes; shared by all rows (a constant, a spatial size, a weight);
* ``dim:k``: a tensor with the batch along dimension ``k`` and no other dimension changing;
* ``int``: an int equal to the batch size;
* ``size:k``: a size or tuple of ints with the batch size at index ``k``;
* ``unsafe``: anything else that changes with the batch (``B * heads``, a flattened batch):
  it cannot be shrunk, so placement avoids cuts where such a value is alive.

:func:`shrink_value` applies a classification to keep some rows of a value, and :func:`join_values`
to join the rows of several batches into one (the stage scheduler batches requests this way).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from mexify.graph.modes import training_mode
from mexify.graph.flops import run_fake_or_real

log = logging.getLogger(__name__)

__all__ = ["BATCH_KEY", "BatchDim", "analyze_batch", "classify", "join_values", "shrink_value"]

BATCH_KEY = "mexify.batch"
_SIZES = (2, 5)  # two batch sizes unlikely to coincide with any other dimension


@dataclasses.dataclass(frozen=True)
class BatchDim:
    """How one value depends on the batch (see the module docstring); ``str()`` is its bundle form."""

    kind: str  # none | dim | int | size | unsafe
    index: int = 0
    why: str = ""

    @property
    def safe(self) -> bool:
        return self.kind != "unsafe"

    def __str__(self) -> str:
        return f"{self.kind}:{self.index}" if self.kind in ("dim", "size") else self.kind

    @classmethod
    def parse(cls, text: str) -> "BatchDim":
        kind, _, index = str(text).partition(":")
        if kind not in ("none", "dim", "int", "size", "unsafe"):
            raise ValueError(f"unknown batch dependence {text!r}")
        return cls(kind, int(index) if index else 0)


def _signature(value: Any) -> Any:
    """What is compared between the two runs: shapes of tensors, values of ints and sizes."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(int(s) for s in value.shape))
    if isinstance(value, bool) or value is None or isinstance(value, (float, str, torch.dtype, torch.device)):
        return ("const", value)
    if isinstance(value, int) or isinstance(value, torch.SymInt):
        return ("int", int(value))
    if isinstance(value, (tuple, list)) and all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in value):
        return ("ints", tuple(int(v) for v in value))
    if isinstance(value, (tuple, list)):
        return ("seq", tuple(_signature(v) for v in value))
    if isinstance(value, Mapping):  # a model output (transformers' are dicts) from a module kept whole: never "none" by its type
        return ("map", tuple((k, _signature(v)) for k, v in value.items()))
    return ("other", type(value).__name__)


def _varying(a: Tuple[int, ...], b: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
    """Indices where two equally long int tuples differ, or None when the lengths differ."""
    if len(a) != len(b):
        return None
    return tuple(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def classify(small: Any, large: Any, sizes: Sequence[int] = _SIZES) -> BatchDim:
    """Classify a value from its signatures at batch sizes ``sizes[0]`` and ``sizes[1]``."""
    b0, b1 = sizes
    if small == large:
        return BatchDim("none")
    kind0, kind1 = small[0], large[0]
    if kind0 != kind1:
        return BatchDim("unsafe", why="changes type with the batch size")
    if kind0 == "int":
        ok = (small[1], large[1]) == (b0, b1)
        return BatchDim("int") if ok else BatchDim("unsafe", why=f"an int that is {small[1]} at batch {b0}, {large[1]} at batch {b1}")
    if kind0 in ("tensor", "ints"):
        diff = _varying(small[1], large[1])
        if diff is not None and len(diff) == 1 and (small[1][diff[0]], large[1][diff[0]]) == (b0, b1):
            return BatchDim("dim" if kind0 == "tensor" else "size", diff[0])
        what = "a tensor of shape" if kind0 == "tensor" else "a size"
        return BatchDim("unsafe", why=f"{what} {list(small[1])} at batch {b0}, {list(large[1])} at batch {b1}")
    if kind0 == "seq" and len(small[1]) == len(large[1]):
        parts = {str(classify(a, b, sizes)) for a, b in zip(small[1], large[1])}
        if len(parts) == 1 and next(iter(parts)).startswith("dim"):
            return BatchDim.parse(next(iter(parts)))  # a tuple of tensors batched alike
    return BatchDim("unsafe", why=f"a {kind0} value that changes with the batch size")


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.signatures: Dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.signatures[n.name] = _signature(out)
        return out


def analyze_batch(gm: fx.GraphModule, input_size: Tuple[int, int]) -> Dict[str, BatchDim]:
    """Classify every node's value by its batch dependence; also stored in ``node.meta[BATCH_KEY]``.

    The graph runs on fake tensors (real ones if an operator has no fake kernel) at two batch
    sizes of ``(B, 3, H, W)`` inputs.
    """
    h, w = input_size
    runs = []
    with training_mode(gm, False, flags_only=True):
        for b in _SIZES:
            example = torch.zeros(b, 3, h, w)

            def run(wrap, example=example):
                rec = _Recorder(gm)
                rec.run(*tree_map(wrap, [example]))
                return rec.signatures

            runs.append(run_fake_or_real(run))
    out = {}
    for n in gm.graph.nodes:
        if n.name in runs[0] and n.name in runs[1]:
            dim = classify(runs[0][n.name], runs[1][n.name])
            n.meta[BATCH_KEY] = dim
            out[n.name] = dim
    return out


def shrink_value(value: Any, dim: BatchDim, index: torch.Tensor) -> Any:
    """Keep batch rows ``index`` of one value, as its classification says.

    Raises:
        ValueError: the value is ``unsafe`` (it cannot be shrunk).
    """
    if dim.kind == "none":
        return value
    if dim.kind == "int":
        return int(index.numel())
    if dim.kind == "size":
        kept = list(value)
        kept[dim.index] = int(index.numel())
        return type(value)(kept) if not isinstance(value, list) else kept
    if dim.kind == "dim":
        if isinstance(value, (tuple, list)):
            return type(value)(v.index_select(dim.index, index.to(v.device)) for v in value)
        return value.index_select(dim.index, index.to(value.device))
    raise ValueError(f"a value that depends on the batch as {dim.why or 'unsafe'} cannot be shrunk")


def join_values(values: Sequence[Any], dim: BatchDim, sizes: Sequence[int]) -> Any:
    """One value of several batches (of ``sizes`` rows) joined in order, as its classification says:
    the inverse of :func:`shrink_value` (joining the rows one batch selected gives them back).

    Raises:
        ValueError: the value is ``unsafe``.
    """
    total = int(sum(sizes))
    if dim.kind == "none":
        return values[0]  # shared by every row (the same in every batch of one input size)
    if dim.kind == "int":
        return total
    if dim.kind == "size":
        kept = list(values[0])
        kept[dim.index] = total
        return type(values[0])(kept) if not isinstance(values[0], list) else kept
    if dim.kind == "dim":
        if isinstance(values[0], (tuple, list)):
            return type(values[0])(torch.cat(parts, dim.index) for parts in zip(*values))
        return torch.cat(list(values), dim.index)
    raise ValueError(f"a value that depends on the batch as {dim.why or 'unsafe'} cannot be joined")
