"""Output adapters: find the logits in what a model returns, in eager outputs and in graphs.

One rule serves both places (the traced graph's output and an eager call's result, e.g. the
original model timed by ``mexify bench``), so they can never disagree:

1. a tensor (or graph node) is the logits;
2. a mapping gives its ``out`` entry, else ``logits``, else its first value;
3. an object with a ``logits`` attribute gives that attribute (HuggingFace outputs);
4. a non-empty tuple or list gives its first element (auxiliary outputs come later).

Mask-classification segmenters (Mask2Former, MaskFormer: class logits and a mask per query) are
wrapped before tracing (:func:`adapt_module`, :class:`MaskClassification`) so that they answer
per-pixel log class scores: the log of what their library's semantic post-processing computes.

Branches that feed only the discarded outputs (torchvision's ``aux``) are removed from the graph,
and reads of an input's shape move to the start of the graph (:func:`hoist_input_shapes`): a model
that resizes its logits to ``input.shape[-2:]`` at the end would otherwise carry the full-resolution
image across every cut only for its size. Int arithmetic on sizes is recomputed where it is used
(:func:`sink_int_arithmetic`), so that no ``batch * heads`` is carried across a cut.
"""
from __future__ import annotations

import builtins
import operator
from collections.abc import Mapping
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from mexify.errors import TraceError

__all__ = ["pick_logits", "adapt_output", "prepare_graph", "upsample_to_input", "hoist_input_shapes", "sink_int_arithmetic",
           "semantic_scores", "MaskClassification", "register_mask_classifier", "adapt_module"]

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
    hoist_input_shapes(gm.graph)
    sink_int_arithmetic(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm


def _reads_shape(node: fx.Node, of: fx.Node) -> bool:
    """``of.shape``, ``of.size(...)`` or ``aten.sym_size(of, d)`` (torch.export's) with constant arguments."""
    if not node.args or node.args[0] is not of or any(isinstance(a, fx.Node) for a in node.args[1:]) or node.kwargs:
        return False
    if node.op == "call_function" and node.target is builtins.getattr:
        return node.args[1] == "shape"
    if node.op == "call_method":
        return node.target == "size"
    return node.op == "call_function" and node.target in _SYM_SIZE


_SYM_SIZE = tuple(getattr(torch.ops.aten.sym_size, name) for name in ("int", "default") if hasattr(torch.ops.aten.sym_size, name))


def hoist_input_shapes(graph: fx.Graph) -> None:
    """Move reads of an input's shape (and constant indexing of them) to just after the inputs (in place).

    Pure reads of metadata, so the graph computes the same; but the value alive until the end is then the
    size, not the image, and the split carries a few ints instead of the full-resolution input.
    """
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if not inputs:
        return
    anchor = inputs[-1]
    for image in inputs:
        for read in [u for u in image.users if _reads_shape(u, image)]:
            anchor.append(read)
            anchor = read
            for index in [u for u in read.users if u.op == "call_function" and u.target is operator.getitem
                          and len(u.args) == 2 and not isinstance(u.args[1], fx.Node) and not u.kwargs]:
                anchor.append(index)
                anchor = index


_INT_OPS = frozenset(op for op in (operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg,
                                    operator.truediv, getattr(torch, "sym_max", None), getattr(torch, "sym_min", None),
                                    getattr(torch, "sym_int", None), getattr(torch, "sym_float", None)) if op is not None)


def _is_symbolic_int(node: fx.Node) -> bool:
    """Arithmetic on ints only, as torch.export records it (its value is a SymInt or an int)."""
    value = node.meta.get("val")
    return (node.op == "call_function" and node.target in _INT_OPS and not node.kwargs
            and isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool))


def sink_int_arithmetic(graph: fx.Graph) -> None:
    """Recompute int arithmetic (``batch * heads``) just before each of its users (in place).

    torch.export computes a size expression once and reuses it wherever it recurs, so ``B * heads``
    worked out in an early attention block stays alive until the last one. Alive across a cut, such an
    int cannot follow a shrinking batch; recomputed at each use, only the batch size itself (read from
    the input and hoisted to the start, see :func:`hoist_input_shapes`) is carried.
    """
    for node in reversed(list(graph.nodes)):
        if not _is_symbolic_int(node) or any(u.op == "output" for u in node.users):
            continue
        for user in list(node.users):
            with graph.inserting_before(user):
                copy = graph.node_copy(node)
            copy.meta = dict(node.meta)  # computed where it is used: inside its user's modules (block outputs read them)
            copy.meta.pop("nn_module_stack", None)
            if "nn_module_stack" in user.meta:
                copy.meta["nn_module_stack"] = dict(user.meta["nn_module_stack"])
            user.replace_input_with(node, copy)
        graph.erase_node(node)


def upsample_to_input(gm: fx.GraphModule) -> fx.GraphModule:
    """Append a bilinear upsampling of the logits to the input's spatial size (in place)."""
    graph = gm.graph
    image = next(n for n in graph.nodes if n.op == "placeholder")
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    logits = out_node.args[0]
    with graph.inserting_after([n for n in graph.nodes if n.op == "placeholder"][-1]):  # the size is read first (see above)
        shape = graph.call_function(builtins.getattr, (image, "shape"))
    with graph.inserting_after(shape):
        size = graph.call_function(operator.getitem, (shape, slice(-2, None)))
    with graph.inserting_before(out_node):
        up = graph.call_function(F.interpolate, (logits,), {"size": size, "mode": "bilinear", "align_corners": False})
    out_node.args = (up,)
    graph.lint()
    gm.recompile()
    return gm


# ---------------------------------------------------------------------- mask classification
def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                    mask_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Per-pixel class scores ``(B, K, h, w)`` of a mask-classification model (Mask2Former, MaskFormer,
    OneFormer): each query's class probabilities without the last "no object" class, weighted by its
    sigmoid mask and summed over queries, as transformers' ``post_process_semantic_segmentation``
    computes them before its resize and argmax. ``mask_size``: the masks are first resized to it
    (bilinear), as Mask2Former's processor does (to 384x384).

    Args:
        class_logits: ``(B, Q, K + 1)``.
        mask_logits: ``(B, Q, h, w)``.
    """
    if mask_size is not None:
        mask_logits = F.interpolate(mask_logits, size=tuple(mask_size), mode="bilinear", align_corners=False)
    return torch.einsum("bqc,bqhw->bchw", class_logits.softmax(dim=-1)[..., :-1], mask_logits.sigmoid())


SCORE_FLOOR = 1e-12
"""Scores below this are taken as this before their log (a class no query covers; exact zeros from a saturated sigmoid)."""


class MaskClassification(nn.Module):
    """A query-based (mask-classification) segmenter answering per-pixel log class scores.

    The model it wraps is called as ``model(pixel_values=x)`` (or ``call(model, x)``); its class and mask
    logits give :func:`semantic_scores`, resized bilinearly to the input as the library's post-processing
    does with the image size as target, and the wrapper returns their log (floored at :data:`SCORE_FLOOR`).
    ``exp`` of the output is the library's semantic scores and its argmax the library's mask; a softmax over
    classes (what policies and distillation read, as for any other model's logits) is the scores normalised
    over classes, and the output is a valid target and input for a cross entropy.

    Args:
        model: the segmenter (its parameters keep their names under ``model.``).
        mask_size: masks resized to this size before the sum (Mask2Former: 384x384), None: their own.
        outputs: ``outputs(result) -> (class_logits, mask_logits)`` for a model whose output names differ.
        call: ``call(model, x) -> result`` for a model with other inputs (default ``model(pixel_values=x)``).
        queries: qualified names (inside ``model``) of the modules that run on the queries (the transformer
            decoder): exits are placed before the first of them, on the per-pixel features.
        task: token ids of a fixed task input (OneFormer's "the task is semantic"), passed as ``task_inputs``.
        eval_in_training: class names of layers traced in eval mode for the training graph, because their
            train-only branch tests values (Mask2Former's pixel-decoder encoder layer clamps non-finite values
            after an ``if``, which torch.export cannot trace); their dropout is then off in training too.
    """

    def __init__(self, model: nn.Module, mask_size: Optional[Tuple[int, int]] = None,
                 outputs: Optional[Callable[[Any], Tuple[torch.Tensor, torch.Tensor]]] = None,
                 call: Optional[Callable[[nn.Module, torch.Tensor], Any]] = None,
                 queries: Sequence[str] = (), task: Optional[Sequence[int]] = None, eval_in_training: Sequence[str] = ()):
        super().__init__()
        self.model = model
        self.mask_size = tuple(mask_size) if mask_size else None
        self._outputs = outputs or _query_outputs
        self._call = call
        for q in queries:
            try:
                model.get_submodule(q)
            except AttributeError:
                raise ValueError(f"{type(model).__name__} has no module {q!r} (the queries= of its mask-classifier registration)") from None
        self.query_modules = tuple(f"model.{q}" for q in queries)
        self.eval_in_training = tuple(eval_in_training)
        if task is not None:
            self.register_buffer("task_inputs", torch.tensor([list(task)], dtype=torch.float32), persistent=False)

    def train(self, mode: bool = True) -> "MaskClassification":
        super().train(mode)
        for m in self.modules() if mode else ():
            if type(m).__name__ in self.eval_in_training:
                m.training = False
        return self

    def _default_call(self, x: torch.Tensor) -> Any:
        if not hasattr(self, "task_inputs"):
            return self.model(pixel_values=x)
        # (B, L) from the (1, L) buffer; a product with the batch rather than .expand(proxy), which fx cannot trace
        task = x.new_ones(x.shape[0], 1) * self.task_inputs.to(x.dtype)
        return self.model(pixel_values=x, task_inputs=task)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        class_logits, mask_logits = self._outputs(self._call(self.model, x) if self._call else self._default_call(x))
        scores = semantic_scores(class_logits, mask_logits, self.mask_size)
        if tuple(scores.shape[-2:]) != tuple(x.shape[-2:]):
            scores = F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return scores.float().clamp_min(SCORE_FLOOR).log()


def _query_outputs(result: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(result, Mapping):
        return result["class_queries_logits"], result["masks_queries_logits"]
    return result.class_queries_logits, result.masks_queries_logits


ONEFORMER_SEMANTIC_TASK = (49406, 518, 10549, 533, 29119, 1550, 49407)
"""OneFormer's task input for semantic segmentation: the CLIP token ids of "the task is semantic" (start and end
tokens included) that ``OneFormerProcessor`` builds, zero-padded to the model's ``task_seq_len``."""


def _oneformer_options(model: nn.Module) -> Dict[str, Any]:
    length = int(getattr(model.config, "task_seq_len", 77))
    return {"task": (ONEFORMER_SEMANTIC_TASK + (0,) * length)[:length]}


_QUERIES = ("model.transformer_module",)  # transformers' Mask2Former, MaskFormer and OneFormer
_MASK_CLASSIFIERS: Dict[str, Dict[str, Any]] = {
    # transformers' classes, by name (transformers is not imported for this); Mask2Former's processor scores at 384x384
    "Mask2FormerForUniversalSegmentation": {"mask_size": (384, 384), "queries": _QUERIES,
                                            "eval_in_training": ("Mask2FormerPixelDecoderEncoderLayer",)},
    "MaskFormerForInstanceSegmentation": {"queries": _QUERIES},
    "OneFormerForUniversalSegmentation": {"queries": _QUERIES, "options": _oneformer_options},
}


def register_mask_classifier(cls: Union[type, str], *, mask_size: Optional[Tuple[int, int]] = None,
                             outputs: Optional[Callable[[Any], Tuple[torch.Tensor, torch.Tensor]]] = None,
                             call: Optional[Callable[[nn.Module, torch.Tensor], Any]] = None,
                             queries: Sequence[str] = ()) -> None:
    """Convert models of class ``cls`` (or its name) as mask classifiers: :class:`MaskClassification` wraps them
    before tracing, so the final exit is their per-pixel log class scores (see its arguments)."""
    name = cls if isinstance(cls, str) else cls.__name__
    _MASK_CLASSIFIERS[name] = {"mask_size": mask_size, "outputs": outputs, "call": call, "queries": tuple(queries)}


def adapt_module(model: nn.Module) -> nn.Module:
    """``model`` wrapped in :class:`MaskClassification` when its class is a registered mask classifier (transformers'
    Mask2Former, MaskFormer and OneFormer classes, and what :func:`register_mask_classifier` adds), else itself."""
    if isinstance(model, MaskClassification):
        return model
    for klass in type(model).__mro__:
        options = _MASK_CLASSIFIERS.get(klass.__name__)
        if options is not None:
            options = dict(options)
            more = options.pop("options", None)
            return MaskClassification(model, **options, **(more(model) if more else {}))
    return model
