"""Shape and FLOPs profiling of a traced model, one fx node at a time.

FLOPs follow fvcore's convention: one multiply-add counts as one FLOP, and only the
operators in fvcore's default handle table cost anything (convolutions, matrix
products, normalisations, 2-D nearest/bilinear upsampling, adaptive average pooling,
grid sampling). Element-wise operators (``add``, ``relu``, ``sigmoid``, ...), plain
pooling and reductions count as zero, exactly as in ``fvcore.nn.FlopCountAnalysis``;
they are listed in :attr:`FlopReport.unsupported` and logged once, as fvcore does.

One deliberate difference: fvcore does not count ``scaled_dot_product_attention``;
we do, as ``batch * heads * L_q * L_k * (d_qk + d_v)`` multiply-adds (half of what
``torch.utils.flop_counter`` reports, which counts a multiply-add as two FLOPs), so
that transformer segmenters are not reported as nearly free.

How it works: an :class:`torch.fx.Interpreter` runs every node once. Each node runs
under a small ``TorchDispatchMode`` (the mechanism of
``torch.utils.flop_counter.FlopCounterMode``) with autograd disabled through
``torch.inference_mode``, so the mode sees the same high-level aten operators that
fvcore's JIT trace sees (``aten::conv2d``, ``aten::batch_norm``,
``aten::adaptive_avg_pool2d``, ``aten::upsample_bilinear2d``) before they decompose;
an operator without a formula is decomposed and its parts are counted, as
``FlopCounterMode`` does. We use our own mode rather than ``FlopCounterMode`` itself
because we need the table of formulas replaced (not merged with torch's, which counts
two FLOPs per multiply-add) and the list of operators that were not counted.

The graph runs on fake tensors (``FakeTensorMode``), so no real arithmetic happens
and profiling a large model at 512x512 takes well under a second. If an operator
cannot run on fake tensors (data-dependent shapes, ``.item()``, custom kernels
without a meta implementation), the whole graph is run again on real tensors and the
failing node is logged.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_map

from mexify.graph.modes import training_mode

try:  # private, but present on every torch this package supports (>= 2.4)
    from torch.utils._python_dispatch import TorchDispatchMode
except ImportError:  # pragma: no cover - guarded for future torch releases
    TorchDispatchMode = None  # type: ignore[assignment,misc]

try:
    from torch._subclasses.fake_tensor import FakeTensorMode
except ImportError:  # pragma: no cover - guarded for future torch releases
    FakeTensorMode = None  # type: ignore[assignment,misc]

__all__ = ["NodeProfile", "FlopReport", "profile_graph", "count_flops", "register_flop_formula", "FLOP_FORMULAS", "META_KEY"]

logger = logging.getLogger(__name__)

META_KEY = "mexify.profile"

aten = torch.ops.aten


@dataclass(frozen=True)
class NodeProfile:
    """What running one fx node produced, recorded in ``node.meta["mexify.profile"]``.

    Attributes:
        shape: output shape if the node outputs a single tensor, else ``None``.
        dtype: output dtype if the node outputs a single tensor, else ``None``.
        flops: FLOPs of this node alone (one multiply-add = one FLOP).
        is_tensor: whether the node outputs a single tensor.
    """

    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    flops: int
    is_tensor: bool


@dataclass(frozen=True)
class FlopReport:
    """FLOPs of one profiled forward pass.

    Attributes:
        total: FLOPs of the whole graph (one multiply-add = one FLOP).
        per_node: fx node name -> FLOPs of that node, for every node in graph order.
        by_operator: operator name (e.g. ``"aten::convolution"``) -> FLOPs.
        unsupported: operator name -> number of calls that were counted as zero.
    """

    total: int
    per_node: dict[str, int]
    by_operator: dict[str, int]
    unsupported: dict[str, int]


# --------------------------------------------------------------------------- formulas
# Each formula takes the operator's arguments bound by name (defaults filled in) and
# its output, and returns FLOPs in fvcore's convention. They mirror
# fvcore/nn/jit_handles.py and fvcore/nn/flop_count.py (_DEFAULT_SUPPORTED_OPS).

Formula = Callable[[Mapping[str, Any], Any], int]


def _numel(t: Any) -> int:
    return int(math.prod(t.shape)) if isinstance(t, torch.Tensor) else 0


def _first_tensor(out: Any) -> Any:
    leaves, _ = tree_flatten(out)
    return next((leaf for leaf in leaves if isinstance(leaf, torch.Tensor)), None)


def _conv(a: Mapping[str, Any], out: Any) -> int:
    # fvcore conv_flop_count: batch * prod(weight) * prod(spatial), spatial of the
    # output (of the input when transposed). Bias is not counted.
    x, w = a["input"], a["weight"]
    spatial = x.shape[2:] if a.get("transposed", False) else _first_tensor(out).shape[2:]
    return int(x.shape[0] * math.prod(w.shape) * math.prod(spatial))


def _linear(a: Mapping[str, Any], out: Any) -> int:
    return _numel(a["input"]) * int(a["weight"].shape[0])


def _addmm(a: Mapping[str, Any], out: Any) -> int:
    n, k = a["mat1"].shape
    return int(n * k * a["mat2"].shape[1])


def _mm(a: Mapping[str, Any], out: Any) -> int:
    n, k = a["self"].shape
    return int(n * k * a["mat2"].shape[1])


def _bmm(a: Mapping[str, Any], out: Any) -> int:
    # bmm(self, mat2); baddbmm(self, batch1, batch2) where self is the added term
    left, right = (a["batch1"], a["batch2"]) if "batch1" in a else (a["self"], a["mat2"])
    b, n, k = left.shape
    m = right.shape[-1]
    return int(b * n * k * m)


def _matmul(a: Mapping[str, Any], out: Any) -> int:
    # Every output element is one dot product of length k (broadcast batches included).
    return _numel(_first_tensor(out)) * int(a["self"].shape[-1])


def _sdpa(a: Mapping[str, Any], out: Any) -> int:
    # Not counted by fvcore; counted here as Q @ K^T plus attn @ V in multiply-adds.
    q, k, v = a["query"], a["key"], a["value"]
    batch = math.prod(q.shape[:-2])
    return int(batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1]))


def _norm(weight_arg: str) -> Formula:
    # fvcore norm_flop_counter: 5 per element with an affine weight, else 4.
    def formula(a: Mapping[str, Any], out: Any) -> int:
        return _numel(a["input"]) * (5 if a.get(weight_arg) is not None else 4)

    return formula


def _batch_norm(training_arg: str | None, training: bool = False) -> Formula:
    # fvcore batchnorm_flop_jit: in training a full norm, in eval 2 per element with an
    # affine weight (scale and shift), else 1.
    def formula(a: Mapping[str, Any], out: Any) -> int:
        is_training = bool(a[training_arg]) if training_arg else training
        affine = a.get("weight") is not None
        if is_training:
            return _numel(a["input"]) * (5 if affine else 4)
        return _numel(a["input"]) * (2 if affine else 1)

    return formula


def _per_output(scale: int) -> Formula:
    def formula(a: Mapping[str, Any], out: Any) -> int:
        return scale * _numel(_first_tensor(out))

    return formula


def _per_input(scale: int) -> Formula:
    def formula(a: Mapping[str, Any], out: Any) -> int:
        return scale * _numel(a["self"] if "self" in a else a["input"])

    return formula


def _packets(*names: str) -> list[Any]:
    """Operator packets for the given aten names that exist in this torch build."""
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def _build_table() -> dict[Any, Formula]:
    entries: list[tuple[tuple[str, ...], Formula]] = [
        (("convolution", "_convolution", "convolution_overrideable", "cudnn_convolution",
          "mkldnn_convolution", "_slow_conv2d_forward", "thnn_conv2d"), _conv),
        (("linear",), _linear),
        (("addmm",), _addmm),
        (("mm",), _mm),
        (("bmm", "baddbmm"), _bmm),
        (("matmul",), _matmul),
        (("scaled_dot_product_attention", "_scaled_dot_product_attention_math",
          "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
          "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"),
         _sdpa),
        (("batch_norm", "native_batch_norm", "_native_batch_norm_legit"), _batch_norm("training")),
        (("_native_batch_norm_legit_no_training", "_batch_norm_no_update"), _batch_norm(None, False)),
        (("_batch_norm_with_update",), _batch_norm(None, True)),
        (("group_norm", "native_group_norm", "layer_norm", "native_layer_norm"), _norm("weight")),
        (("instance_norm",), _norm("weight")),
        (("upsample_nearest2d", "_upsample_nearest_exact2d"), _per_output(1)),
        (("upsample_bilinear2d",), _per_output(4)),
        (("adaptive_avg_pool2d", "_adaptive_avg_pool2d"), _per_input(1)),
        (("grid_sampler", "grid_sampler_2d"), _per_output(4)),
    ]
    table: dict[Any, Formula] = {}
    for names, formula in entries:
        for packet in _packets(*names):
            table[packet] = formula
    return table


FLOP_FORMULAS: dict[Any, Formula] = _build_table()
"""Operator packet -> formula; public, filled by :func:`register_flop_formula`."""


def register_flop_formula(targets: Any) -> Callable[[Formula], Formula]:
    """Count a custom operator: register ``formula(args, out) -> FLOPs`` for ``targets``.

    Like ``torch.utils.flop_counter.register_flop_formula``, but in this package's
    convention (one multiply-add = one FLOP) and with the operator's arguments bound by
    schema name. ``targets`` is an operator (``torch.ops.torchvision.deform_conv2d``), an
    overload of one, or a list of them. Example::

        @mexify.register_flop_formula(torch.ops.torchvision.deform_conv2d)
        def deform_conv_flops(args, out):
            w = args["weight"]
            return out.numel() * w.shape[1] * w.shape[2] * w.shape[3]

    Returns:
        a decorator that registers the formula and returns it unchanged.
    """
    items = list(targets) if isinstance(targets, (list, tuple)) else [targets]

    def decorate(formula: Formula) -> Formula:
        for target in items:
            packet = getattr(target, "overloadpacket", target)
            if not hasattr(packet, "_qualified_op_name"):
                raise TypeError(f"register_flop_formula needs torch operators (torch.ops.ns.op), got {target!r}")
            FLOP_FORMULAS[packet] = formula
        return formula

    return decorate

# Operators that cost zero FLOPs by convention and are not worth a warning: fvcore's
# _IGNORED_OPS, plus the view, metadata and memory operators that only show up at the
# dispatcher level (fvcore's JIT trace never sees them).
_IGNORED = frozenset(
    "Int ScalarImplicit __and__ arange bitwise_not cat chunk clamp clamp_ constant_pad_nd "
    "contiguous copy_ detach dropout empty eq expand flatten floor floor_divide full "
    "full_like gather ge gt index index_put_ masked_fill max narrow new_empty new_full "
    "new_zeros nonzero ones permute relu relu_ remainder reshape roll select size slice "
    "split split_with_sizes squeeze stack t to transpose type_as unbind unsqueeze unsqueeze_ "
    "view zeros zeros_like "
    # dispatcher-level views, copies and metadata
    "alias _to_copy _unsafe_view _reshape_alias as_strided clone detach_ empty_like "
    "empty_strided expand_as lift_fresh lift_fresh_copy new_ones ones_like view_as fill_ "
    "zero_ scalar_tensor _local_scalar_dense sym_size sym_stride sym_numel dim numel "
    "is_contiguous stride storage_offset squeeze_ t_ transpose_ split_with_sizes_copy "
    "view_copy slice_copy select_copy unbind_copy permute_copy expand_copy "
    "feature_dropout dropout_ native_dropout device repeat tile pad index_select flip".split()
)


def _op_name(func: Any) -> str:
    packet = getattr(func, "overloadpacket", func)
    qualified = getattr(packet, "_qualified_op_name", None)
    return qualified if qualified is not None else str(packet)


def _bind(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The operator's arguments by schema name, with defaults filled in."""
    bound: dict[str, Any] = {}
    schema_args = func._schema.arguments
    for i, spec in enumerate(schema_args):
        if i < len(args) and not spec.kwarg_only:
            bound[spec.name] = args[i]
        elif spec.name in kwargs:
            bound[spec.name] = kwargs[spec.name]
        elif spec.has_default_value():
            bound[spec.name] = spec.default_value
    return bound


# --------------------------------------------------------------------------- counting
class _Tally:
    """Running FLOPs and zero-cost operator counts, shared by the modes below."""

    def __init__(self) -> None:
        self.flops = 0
        self.by_operator: Counter[str] = Counter()
        self.unsupported: Counter[str] = Counter()

    def add(self, func: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: Any) -> None:
        formula = FLOP_FORMULAS.get(getattr(func, "overloadpacket", None))
        name = _op_name(func)
        if formula is None:
            if name.split("::")[-1] not in _IGNORED:
                self.unsupported[name] += 1
            return
        flops = int(formula(_bind(func, args, kwargs), out))
        self.flops += flops
        self.by_operator[name] += flops


if TorchDispatchMode is not None:

    class _CountingMode(TorchDispatchMode):
        """Counts FLOPs of every aten operator, decomposing those without a formula."""

        def __init__(self, tally: _Tally) -> None:
            super().__init__()
            self.tally = tally

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            packet = getattr(func, "overloadpacket", None)
            if packet not in FLOP_FORMULAS and getattr(func, "namespace", None) == "aten":
                # Same as FlopCounterMode: CompositeImplicit operators (conv2d -> convolution,
                # einsum -> bmm) are counted through their parts.
                with self:
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            out = func(*args, **kwargs)
            self.tally.add(func, args, kwargs, out)
            return out


@contextmanager
def _counting(tally: _Tally) -> Iterator[None]:
    if TorchDispatchMode is None:  # pragma: no cover - only on a torch without the API
        raise RuntimeError("torch.utils._python_dispatch.TorchDispatchMode is unavailable")
    with _CountingMode(tally):
        yield


def _eval_mode(module: torch.nn.Module) -> Any:
    """Every submodule in eval mode, each one's own flag restored afterwards. Flags are set directly: modules
    from torch.export refuse .eval() (their graph already fixed the mode), and train() overrides must not run twice."""
    return training_mode(module, False, flags_only=True)


def _infer_device(module: torch.nn.Module, device: Any) -> torch.device | None:
    if device is not None:
        return torch.device(device)
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


def _to_device(inputs: Sequence[Any], device: torch.device | None) -> tuple[Any, ...]:
    if device is None:
        return tuple(inputs)
    return tuple(tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, list(inputs)))


def _profile_of(value: Any, flops: int) -> NodeProfile:
    if isinstance(value, torch.Tensor):
        return NodeProfile(tuple(int(s) for s in value.shape), value.dtype, int(flops), True)
    return NodeProfile(None, None, int(flops), False)


class _ProfilingInterpreter(torch.fx.Interpreter):
    """Runs each node under the counting mode and records a NodeProfile in its meta."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.per_node: dict[str, int] = {}
        self.tally = _Tally()

    def run_node(self, n: torch.fx.Node) -> Any:
        before = self.tally.flops
        try:
            with _counting(self.tally):
                out = super().run_node(n)
        except Exception as e:
            raise _NodeFailure(n, e) from e
        flops = self.tally.flops - before
        self.per_node[n.name] = flops
        n.meta[META_KEY] = _profile_of(out, flops)
        return out


class _NodeFailure(Exception):
    """A node raised while profiling; carries the node for the error message."""

    def __init__(self, node: torch.fx.Node, error: Exception) -> None:
        lines = str(error).strip().splitlines()
        target = getattr(node.target, "__name__", node.target)
        self.summary = f"node {node.name!r} ({node.op} {target}): {lines[0] if lines else type(error).__name__}"
        super().__init__(self.summary)
        self.node = node
        self.error = error


def _fake_mode() -> Any:
    if FakeTensorMode is None:
        return None
    try:
        return FakeTensorMode(allow_non_fake_inputs=True)
    except TypeError:  # pragma: no cover - signature changed in some future torch
        return None


@contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    # FakeTensorMode logs a traceback at ERROR level before re-raising a failing meta
    # kernel; we retry on real tensors (which raise the same error if it is genuine).
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        fake_log.setLevel(level)


def run_fake_or_real(run_fn: Callable[[Callable[[Any], Any]], Any]) -> Any:
    """Call ``run_fn(wrap)`` on fake tensors, or on real ones if fake execution fails.

    ``wrap`` turns an example input into what the run should use. Returns whatever
    ``run_fn`` returns from the successful attempt.
    """
    mode = _fake_mode()
    if mode is not None:
        try:
            with torch.inference_mode(), _quiet_fake_tensor_log(), mode:
                return run_fn(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t)
        except _NodeFailure as e:
            logger.info("Profiling on fake tensors failed at %s; running on real tensors instead", e.summary)
        except Exception as e:  # any operator may lack a fake (meta) implementation
            logger.info("Profiling on fake tensors failed (%s); running on real tensors instead", e)
    with torch.inference_mode():
        return run_fn(lambda t: t)


_warned: set[str] = set()


def _warn_unsupported(unsupported: Mapping[str, int]) -> None:
    new = {k: v for k, v in unsupported.items() if k not in _warned}
    if not new:
        return
    _warned.update(new)
    listed = ", ".join(f"{k} ({v}x)" for k, v in sorted(new.items()))
    logger.warning("FLOPs of these operators are counted as zero (fvcore convention): %s", listed)


def profile_graph(gm: torch.fx.GraphModule, *example_inputs: Any, device: Any = None) -> FlopReport:
    """Run every node of a traced model once, recording shapes and FLOPs per node.

    Each node gets a :class:`NodeProfile` in ``node.meta["mexify.profile"]``
    (placeholders and the output node included). The graph runs in eval mode without
    gradients; every submodule's train/eval flag is restored afterwards.

    Args:
        gm: the traced model.
        *example_inputs: one value per placeholder, e.g. a ``(1, 3, H, W)`` tensor.
        device: device to place the example inputs on; defaults to the device of the
            model's first parameter or buffer.

    Returns:
        A :class:`FlopReport` with the total, FLOPs per node and per operator, and the
        operators counted as zero.

    Raises:
        RuntimeError: if a node fails even on real tensors; the message names the node.
    """
    inputs = _to_device(example_inputs, _infer_device(gm, device))

    def run(wrap: Callable[[Any], Any]) -> _ProfilingInterpreter:
        interp = _ProfilingInterpreter(gm)
        interp.run(*tree_map(wrap, list(inputs)))
        return interp

    with _eval_mode(gm):
        try:
            interp = run_fake_or_real(run)
        except _NodeFailure as e:
            raise RuntimeError(f"profiling failed at {e.summary}") from e.error

    tally = interp.tally
    unsupported = dict(sorted(tally.unsupported.items()))
    _warn_unsupported(unsupported)
    return FlopReport(
        total=int(tally.flops),
        per_node=dict(interp.per_node),
        by_operator=dict(sorted(tally.by_operator.items(), key=lambda kv: -kv[1])),
        unsupported=unsupported,
    )


def count_flops(module: torch.nn.Module, *example_inputs: Any) -> int:
    """FLOPs of one eager forward of a module (one multiply-add = one FLOP).

    Runs in eval mode without gradients, on fake tensors when possible; the module's
    train/eval flags are restored afterwards.

    Args:
        module: any module, e.g. an exit head.
        *example_inputs: the forward's positional arguments.

    Returns:
        The FLOPs, counted with the same formulas as :func:`profile_graph`.
    """
    inputs = _to_device(example_inputs, _infer_device(module, None))

    def run(wrap: Callable[[Any], Any]) -> _Tally:
        tally = _Tally()
        args = tree_map(wrap, list(inputs))
        with _counting(tally):
            module(*args)
        return tally

    with _eval_mode(module):
        tally = run_fake_or_real(run)
    _warn_unsupported(tally.unsupported)
    return int(tally.flops)
