"""Preparation: a model (or its spec) becomes a multi-exit model, in memory.

``spec | nn.Module -> trace -> profile -> place exits -> split -> heads -> (MultiExitModel,
BundleConfig)``, like ``torch.ao``'s ``prepare_fx``: objects in, objects out, no file
written (:mod:`mexify.api` writes bundles). :func:`rebuild` is the same pipeline driven by a
bundle's config instead of placement, which is how :func:`mexify.bundle.load` rebuilds a model.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mexify._version import __version__
from mexify.config import BundleConfig, ExitConfig, HeadConfig, TraceConfig
from mexify.errors import BundleError, MexifyError, PlacementError, TraceError
from mexify.graph.adapt import MaskClassification, adapt_module, prepare_graph, upsample_to_input
from mexify.graph.batching import analyze_batch
from mexify.graph.modes import training_mode
from mexify.graph.placement import (PROFILE_KEY, ExitPoint, PlacementConfig, find_candidates, fuse_sources, fuse_stride, output_stride,
                                    select_exit_points)
from mexify.graph.flops import count_flops, profile_graph
from mexify.graph.split import corresponding_node, pair_stages, split_stages
from mexify.graph.trace import EXPORT_SHAPES_KEY, TRACER_KEY, registered_autowrap_functions, registered_leaf_modules, trace_model
from mexify.nn import MultiExitModel, build_head, parse_head_overrides
from mexify.spec import ModelSpec, build_model, parse_spec
from mexify.trust import Trust, check_import

__all__ = ["ConvertResult", "convert", "inspect", "rebuild", "check_shrinking", "TracedModel", "trace_for_exits", "build_exit_heads",
           "resolution_notes"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TracedModel:
    """A traced, output-adapted and profiled model with its exit candidates."""

    graph_module: fx.GraphModule
    num_classes: int
    input_size: Tuple[int, int]
    total_flops: int
    upsampled: bool
    candidates: list
    logits_shape: Tuple[int, ...]
    train_graph_module: Optional[fx.GraphModule] = None  # the train-mode trace (None: see train_issue)
    train_issue: str = ""  # why training mode cannot be represented ("" when it can)
    output_stride: float = 1.0  # stride of the finest class map before the upsampling to the input


@dataclasses.dataclass
class ConvertResult:
    """What :func:`convert` returns: the model, its config, the exit table and timing."""

    model: MultiExitModel
    config: BundleConfig
    exits: list  # ExitPoint per early exit
    seconds: float
    notes: list = dataclasses.field(default_factory=list)  # warnings about the conversion (heads that cost too much)
    output_stride: float = 1.0  # stride of the model's finest class map (see :func:`~mexify.graph.placement.output_stride`)

    def table(self) -> list:
        """One row per exit (final last): node, stride, channels, the skip feature its head fuses, FLOPs figures."""
        m = self.model
        rows = []
        total = m.original_flops or 1
        for i, name in enumerate(m.exit_names):
            cum_stage = sum(m.stage_flops[: i + 1])
            skip, skip_stride = "", None
            if i < len(self.exits):
                e = self.exits[i]
                stride, channels = e.stride, e.channels
                if m.heads[name].fused:
                    skip, skip_stride = self.config.exits[i].skip, self.config.exits[i].skip_stride
            else:
                stride, channels = self.output_stride, m.num_classes
            rows.append(
                {
                    "exit": i,
                    "node": name,
                    "stride": stride,
                    "channels": channels,
                    "skip": skip,
                    "skip_stride": skip_stride,
                    "backbone_flops": cum_stage,
                    "backbone_percent": 100.0 * cum_stage / total,
                    "head_flops": m.head_flops[i] if i < len(m.head_flops) else 0,
                    "flops_to_exit": m.cost_to_exit(i),
                    "percent_of_original": 100.0 * m.cost_to_exit(i) / total,
                }
            )
        return rows


def _as_spec(spec: Union[str, ModelSpec], args: Optional[Mapping[str, Any]], weights: Optional[str]) -> ModelSpec:
    return spec if isinstance(spec, ModelSpec) else parse_spec(spec, args, weights)


def trace_for_exits(
    model: nn.Module, trace: TraceConfig, placement: PlacementConfig = PlacementConfig()
) -> TracedModel:
    """Trace, adapt the output, profile at ``trace.input_size`` and list exit candidates."""
    h, w = trace.input_size
    example = torch.zeros(1, 3, h, w)
    with training_mode(model, False, flags_only=True):
        gm = trace_model(model, trace, example)
    gm = prepare_graph(gm)
    train_gm, train_issue = _train_graph(model, trace, example, gm)
    try:
        report = profile_graph(gm, example)
    except RuntimeError as e:
        raise TraceError(f"running the traced graph at {h}x{w} failed: {e}", "check --input-size") from e
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    prof = out_node.args[0].meta.get(PROFILE_KEY)
    if prof is None or not prof.is_tensor or prof.shape is None or len(prof.shape) != 4:
        raise TraceError(
            "the model's output is not a 4-D logits tensor (N, classes, H, W)",
            "is this a semantic-segmentation model?",
        )
    shape = tuple(prof.shape)
    num_classes = int(shape[1])
    total = int(report.total)
    _analyze_batch(gm, (h, w))
    queries = model.query_modules if isinstance(model, MaskClassification) else ()
    candidates = find_candidates(gm, (h, w), num_classes, placement, stop_modules=queries)
    out_stride = output_stride(gm, (h, w), num_classes)
    upsampled = tuple(shape[-2:]) != (h, w)
    if upsampled:
        total += _upsample_flops(shape, (h, w))
        upsample_to_input(gm)
        if train_gm is not None:
            upsample_to_input(train_gm)
    return TracedModel(gm, num_classes, (h, w), total, upsampled, candidates, shape, train_gm, train_issue, out_stride)


def _static_size(trace: TraceConfig) -> Optional[Tuple[int, int]]:
    """The only input size a graph accepts when torch.export kept just the batch dynamic."""
    return tuple(int(v) for v in trace.input_size) if trace.export_shapes == "batch" else None


def _train_graph(model: nn.Module, trace: TraceConfig, example: torch.Tensor, eval_gm: fx.GraphModule):
    """The train-mode trace of ``model`` with the tracer (and export shapes) of the eval-mode one, or
    None and the reason it cannot be had."""
    if eval_gm.meta.get(TRACER_KEY) == "export":
        method = dataclasses.replace(trace, method="export", export_shapes=eval_gm.meta.get(EXPORT_SHAPES_KEY, ""))
    else:
        method = dataclasses.replace(trace, method="fx")
    with training_mode(model, True, flags_only=True):
        try:
            gm = prepare_graph(trace_model(model, method, example, training=True))
        except MexifyError as e:
            return None, f"the model cannot be traced in train mode: {e.message}"
    return gm, ""


def _stages(gm: fx.GraphModule, train_gm: Optional[fx.GraphModule], names: Sequence[str], issue: str, skips: Sequence[str] = ()):
    """Stages of the eval-mode graph, each given its train-mode graph when the two agree; why not; and each exit's
    skip feature in the train-mode graph.

    ``skips``: per exit, the skip feature its fused heads read ("" for none), carried up to that exit.
    """
    keep = {skip: name for name, skip in zip(names, skips) if skip}  # in order: the last exit reading a skip wins
    stages = split_stages(gm, names, keep)
    if train_gm is None:
        return stages, issue, None
    twin = {skip: corresponding_node(gm, train_gm, skip) for skip in keep}
    if None in twin.values():
        return stages, f"in train mode, the skip feature {next(k for k, v in twin.items() if v is None)!r} is not computed", None
    try:
        train_stages = split_stages(train_gm, names, {twin[skip]: name for skip, name in keep.items()})
    except MexifyError as e:
        return stages, f"in train mode the exit points differ: {e.message}", None
    issue = pair_stages(stages, train_stages, gm, train_gm)
    return stages, issue, None if issue else [twin[s] if s else "" for s in skips]


def _analyze_batch(gm: fx.GraphModule, size: Tuple[int, int]) -> None:
    """Record how every value follows the batch (``node.meta``), for placement and shrinking."""
    try:
        analyze_batch(gm, size)
    except Exception as e:  # noqa: BLE001 - e.g. a graph specialised to batch 1; the self-check decides
        log.warning("could not tell how values depend on the batch (%s: %s); the shrink self-check decides",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")


def check_shrinking(model: MultiExitModel, size: Tuple[int, int], rows: int = 3) -> None:
    """At every cut: run ``rows`` images, drop one after the cut and go on; compare with the kept rows alone.

    Runs at a small size when the graph allows (the batch is what is checked), else at ``size``.

    Raises:
        PlacementError: a cut where shrinking fails or mixes rows, naming the cut and its live values.
    """
    was_training = model.training
    model.eval()  # through train(): a stage with train- and eval-mode graphs swaps to the eval graph
    try:
        with torch.no_grad():
            for hw in dict.fromkeys([(min(size[0], 64), min(size[1], 64)), tuple(size)]):
                try:
                    reference = model(_check_input(rows, hw)[[0, 2]])
                except Exception:  # noqa: BLE001 - a graph fixed to its profiling size
                    continue
                _check_cuts(model, _check_input(rows, hw), reference)
                return
    finally:
        model.train(was_training)


def check_train_mode(model: MultiExitModel, size: Tuple[int, int]) -> str:
    """One train-mode forward and backward through every exit on a small batch; returns what failed ("" if nothing).

    Catches train-mode graphs that run but cannot be differentiated once split into stages.
    Parameters, buffers, gradients and the random state are restored. Runs with gradients on
    whatever the caller's mode (a conversion under ``torch.no_grad()`` must not mark a trainable
    model untrainable).
    """
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(), torch.inference_mode(False), torch.enable_grad():
            return _train_step_issue(model, size)
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
        model.train(was_training)


def _train_step_issue(model: MultiExitModel, size: Tuple[int, int]) -> str:
    for hw in dict.fromkeys([(min(size[0], 64), min(size[1], 64)), tuple(size)]):
        x = _check_input(2, hw)
        try:
            outs = model.forward_all(x)
        except Exception:  # noqa: BLE001 - a graph fixed to its profiling size: try that size
            continue
        try:
            sum(o.float().mean() for o in outs).backward()
        except RuntimeError as e:
            return f"a train-mode forward and backward pass through the stages fails ({_first(e)})"
        return ""
    return "its train-mode graph does not run on a small batch"


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def _check_input(rows: int, hw: Tuple[int, int]) -> torch.Tensor:
    return torch.randn(rows, 3, *hw, generator=torch.Generator().manual_seed(0))


def _check_cuts(model: MultiExitModel, x: torch.Tensor, reference: torch.Tensor) -> None:
    keep = torch.tensor([0, 2])
    state = model.start(x)
    for i, name in enumerate(model.exit_names[:-1]):
        state = model.run_stage(i, state)
        live = ", ".join(f"{k} ({state.dims[k] if state.dims and k in state.dims else '?'})" for k in state.values)
        try:
            rest = state.select(keep)
            for j in range(i + 1, model.num_exits):
                rest = model.run_stage(j, rest)
            out = model.exit_logits(model.num_exits - 1, rest)
        except Exception as e:  # noqa: BLE001 - any failure here is the model's, reported with the cut
            raise PlacementError(
                f"the batch cannot shrink after exit {name!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                f"values alive there: {live}; choose other exit points with --at (see `mexify inspect`)",
            ) from e
        scale = float(reference.abs().max()) or 1.0
        if out.shape != reference.shape or not torch.allclose(out, reference, rtol=1e-3, atol=1e-4 * scale):
            raise PlacementError(
                f"rows of different images would mix after exit {name!r}: dropping a row there changes the others' output",
                f"values alive there: {live}; choose other exit points with --at (see `mexify inspect`)",
            )


class _Upsample(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, x):
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


def _upsample_flops(shape: Sequence[int], size: Tuple[int, int]) -> int:
    return count_flops(_Upsample(size), torch.zeros(*shape))


def _stage_flops(gm: fx.GraphModule, exit_names: Sequence[str], total: int) -> list:
    """FLOPs per stage, from the per-node profile (the appended upsampling goes to the last stage)."""
    flops, current = [], 0
    names = set(exit_names)
    for n in gm.graph.nodes:
        prof = n.meta.get(PROFILE_KEY)
        current += prof.flops if prof is not None else 0
        if n.name in names:
            flops.append(current)
            current = 0
    flops.append(total - sum(flops))
    return flops


@torch.inference_mode(False)  # the converted model must be trainable whatever the caller's mode
def convert(
    spec: Union[str, ModelSpec, nn.Module],
    *,
    trace: TraceConfig = TraceConfig(),
    args: Optional[Mapping[str, Any]] = None,
    weights: Optional[str] = None,
    exits: int = 6,
    at: Optional[Sequence[str]] = None,
    head: str = "mess",
    head_set: Optional[Mapping[str, Any]] = None,
    trust: Trust = Trust(),
    placement: PlacementConfig = PlacementConfig(),
    check: bool = True,
    heads: Optional[Sequence[HeadConfig]] = None,
) -> ConvertResult:
    """Turn a segmentation model into a :class:`MultiExitModel` with its bundle config (in memory).

    Args:
        spec: ``package.module:factory``, ``file.py:factory``, a ``.pt2`` archive, a pickled
            module (with ``Trust(pickle=True)``), or an ``nn.Module`` (not re-loadable as a bundle).
        trace: how it is traced and at which input size it is profiled (:class:`~mexify.config.TraceConfig`;
            the registered leaf modules and autowrapped functions are added).
        args: keyword arguments for a factory spec.
        weights: a state_dict or ``.safetensors`` file to load into the model first.
        exits: number of early exits placed by FLOPs (ignored when ``at`` is given).
        at: exit point node names, overriding placement.
        head, head_set: head template (``mess`` or ``fcn``) and overrides of its fields.
        check: run :func:`check_shrinking` (every cut, a few small forward passes).
        heads: head candidates for every exit (a space, :func:`~mexify.nn.head_space`) instead of one
            head: stage 2 trains them all and ``calibrate --search`` keeps one per exit.

    Raises:
        MexifyError: any user-facing problem, with a hint.
    """
    t0 = time.perf_counter()
    trace_cfg = _with_registered(trace)
    head_cfg = parse_head_overrides(head, head_set)
    if isinstance(spec, nn.Module):
        model_spec = ModelSpec("module", f"{type(spec).__module__}:{type(spec).__qualname__}")
        model = adapt_module(spec)
    else:
        model_spec = _as_spec(spec, args, weights)
        model = build_model(model_spec, trust)
    traced = trace_for_exits(model, trace_cfg, placement)
    trace_cfg = dataclasses.replace(trace_cfg, export_shapes=traced.graph_module.meta.get(EXPORT_SHAPES_KEY, ""))
    chosen = select_exit_points(traced.candidates, exits, at, placement)
    space = tuple(heads) if heads else (head_cfg,)
    result = _assemble(traced, chosen, [space] * len(chosen), model_spec, trace_cfg)
    result.output_stride = traced.output_stride
    if check:
        check_shrinking(result.model, trace_cfg.input_size)
    if not result.model.train_issue:
        result.model.train_issue = check_train_mode(result.model, trace_cfg.input_size)
    if result.model.train_issue:
        result.config = result.model.config = dataclasses.replace(result.config, train_issue=result.model.train_issue)
    result.notes.extend(_head_cost_notes(result.model))
    result.notes.extend(resolution_notes(result.config, traced.output_stride))
    result.seconds = time.perf_counter() - t0
    return result


def resolution_notes(config: BundleConfig, out_stride: float) -> list:
    """Warnings for the exits whose heads cannot reach the model's output detail: coarser than the fuse stride
    (:func:`~mexify.graph.placement.fuse_stride`) with no fused head, or no finer feature computed before them."""
    target = fuse_stride(out_stride)
    plain, alone = [], []
    for i, e in enumerate(config.exits):
        if e.stride > target * 1.01 and not e.skip:  # (convert gives a skip only to an exit with a fused head)
            (alone if any(c.fuse for c in (e.candidates or (e.head,))) else plain).append(f"{i} ({e.name}, stride {e.stride:g})")
    lead = f"the model's output path is at stride {out_stride:g}, so the masks of exit"
    notes = []
    if plain:
        notes.append(f"{lead}{'s' * (len(plain) > 1)} {', '.join(plain)} will lack its detail: their heads are plain "
                     "(fused heads read a finer feature: --head-set fuse=true, the mess default)")
    if alone:
        notes.append(f"{lead}{'s' * (len(alone) > 1)} {', '.join(alone)} will lack its detail: no finer feature is computed "
                     "before them for a fused head to read")
    return notes


HEADS_COST_LIMIT = 1.0
"""When the exit heads together cost more than this share of the original model, convert warns."""


def _head_cost_notes(model: MultiExitModel) -> list:
    """A warning when the early heads together cost more than the original model: an image that reaches the
    final exit then costs more than twice the original (calibration can still switch exits off)."""
    original = model.original_flops or 0
    heads = sum(model.head_flops)
    if not original or heads <= HEADS_COST_LIMIT * original:
        return []
    final = model.cost_to_exit(model.num_exits - 1)
    return [f"the {len(model.head_flops)} exit heads together cost {100 * heads / original:.0f}% of the original model's "
            f"FLOPs: an image that reaches the final exit costs {100 * final / original:.0f}% of the original; "
            "use fewer exits (--exits) or lighter heads (--head-set width=..., blocks=0)"]


def _with_registered(trace: TraceConfig) -> TraceConfig:
    """The trace settings a bundle records: the caller's plus the registered leaf modules and functions."""
    leaves = tuple(dict.fromkeys([*trace.leaf_modules, *registered_leaf_modules()]))
    wrapped = tuple(dict.fromkeys([*trace.autowrap_functions, *registered_autowrap_functions()]))
    return dataclasses.replace(trace, leaf_modules=leaves, autowrap_functions=wrapped)


def _assemble(
    traced: TracedModel, chosen: Sequence[ExitPoint], spaces: Sequence[Sequence[HeadConfig]], spec: ModelSpec, trace_cfg: TraceConfig
) -> ConvertResult:
    """The model and config from the trace, the exit points and each exit's head candidates (one: no candidates)."""
    names = [c.name for c in chosen]
    gm = traced.graph_module
    fusing = [any(cfg.fuse for cfg in space) for space in spaces]
    sources = [s if f else None for s, f in zip(fuse_sources(traced.candidates, chosen, traced.output_stride), fusing)]
    skips = [s.name if s is not None else "" for s in sources]
    stages, train_issue, train_skips = _stages(gm, traced.train_graph_module, names, traced.train_issue, skips)
    stage_flops = _stage_flops(gm, names, traced.total_flops)
    heads, head_flops, exit_cfgs, candidates = {}, [], [], {}
    for point, source, space, sf, stage in zip(chosen, sources, spaces, stage_flops, stages):
        inputs = [torch.zeros(1, point.channels, point.height, point.width)]
        if source is not None:
            inputs.append(torch.zeros(1, source.channels, source.height, source.width))
        skip_channels = source.channels if source is not None else 0
        cfgs, modules, flops = [], [], []
        for cfg in space:
            if cfg.template == "mess" and cfg.width == 0:
                cfg = _auto_width(cfg, point.channels, skip_channels, traced.num_classes, inputs, traced.input_size, traced.total_flops)
            head = build_head(cfg, point.channels, traced.num_classes, skip_channels)
            cfgs.append(cfg)
            modules.append(head)
            flops.append(_head_flops(head, inputs, traced.input_size))
        heads[point.name] = modules[0]
        head_flops.append(flops[0])
        many = len(space) > 1
        if many:
            candidates[point.name] = modules
        exit_cfgs.append(ExitConfig(point.name, point.channels, point.stride, cfgs[0], int(sf), flops[0], dict(stage.batch_dims) or None,
                                    candidates=tuple(cfgs) if many else None, candidate_flops=tuple(flops) if many else None,
                                    skip=source.name if source else "", skip_channels=skip_channels,
                                    skip_stride=source.stride if source else 0.0))
    model = MultiExitModel(stages, heads, traced.num_classes, traced.input_size, stage_flops, head_flops, traced.total_flops,
                           candidates=candidates or None, skips=skips, train_skips=train_skips)
    model.train_issue = train_issue
    model.static_size = _static_size(trace_cfg)
    model.eval()
    config = BundleConfig(
        spec=spec.to_dict(),
        trace=trace_cfg,
        exits=tuple(exit_cfgs),
        num_classes=traced.num_classes,
        final_flops=int(stage_flops[-1]),
        original_flops=int(traced.total_flops),
        upsample_logits=traced.upsampled,
        versions={"mexify": __version__, "torch": torch.__version__.split("+")[0]},
    )
    model.config = config
    return ConvertResult(model, config, list(chosen), 0.0)


AUTO_WIDTHS = (256, 192, 128, 96, 64, 48, 32, 24, 16)
HEAD_BUDGET = 0.03  # an auto-sized head may cost at most this fraction of the original model


def _head_flops(head: nn.Module, inputs: Sequence[torch.Tensor], size: Tuple[int, int]) -> int:
    """A head's FLOPs on an exit's inputs (features, and the skip where the head is fused), logits resized to ``size``."""
    return int(count_flops(head, inputs[0], size, inputs[1] if head.fused else None))


def _auto_width(cfg: HeadConfig, in_channels: int, skip_channels: int, num_classes: int, inputs: Sequence[torch.Tensor],
                size: Tuple[int, int], total: int) -> HeadConfig:
    """The widest ``mess`` head whose FLOPs stay within ``HEAD_BUDGET`` of the model's."""
    for width in AUTO_WIDTHS:
        candidate = dataclasses.replace(cfg, width=width)
        if _head_flops(build_head(candidate, in_channels, num_classes, skip_channels), inputs, size) <= HEAD_BUDGET * total:
            return candidate
    return dataclasses.replace(cfg, width=AUTO_WIDTHS[-1])


def inspect(
    spec: Union[str, ModelSpec, nn.Module],
    *,
    trace: TraceConfig = TraceConfig(),
    args: Optional[Mapping[str, Any]] = None,
    weights: Optional[str] = None,
    trust: Trust = Trust(),
) -> TracedModel:
    """Trace and profile a model and list its candidate exit points (no conversion)."""
    trace_cfg = _with_registered(trace)
    if isinstance(spec, nn.Module):
        model = adapt_module(spec)
    else:
        model = build_model(_as_spec(spec, args, weights), trust)
    return trace_for_exits(model, trace_cfg)


def rebuild(config: BundleConfig, trust: Trust = Trust(), where: str = "the bundle's spec") -> MultiExitModel:
    """Rebuild a converted model from its config by re-tracing the spec (no profiling run).

    The config may come from anyone: its factory and autowrap functions are checked against
    ``trust`` (:mod:`mexify.trust`) before anything is imported.

    Raises:
        BundleError: refused by the trust policy, or the spec can no longer be rebuilt or no longer
            has the recorded exit nodes.
    """
    spec = ModelSpec.from_dict(config.spec)
    if spec.kind == "module":
        raise BundleError(
            f"this bundle was converted from an in-memory module ({spec.target}) and cannot be rebuilt",
            "convert from a spec (package.module:factory, file.py:factory or .pt2) to get a loadable bundle",
        )
    spec = dataclasses.replace(spec, weights=None)  # the bundle's own weights are loaded afterwards
    trace_cfg = config.trace
    try:
        for name in trace_cfg.autowrap_functions:  # importing a function's module runs it: decide first
            if name not in registered_autowrap_functions():
                check_import(name, trust, where="the bundle's autowrap function")
        model = build_model(spec, trust, named_by=where)
    except MexifyError as e:
        raise BundleError(f"cannot rebuild the bundle's model: {e.message}", e.hint) from e
    h, w = trace_cfg.input_size
    example = torch.zeros(1, 3, h, w)
    for m in model.modules():  # mexify's own model, left in eval mode: the graph shares its modules
        m.training = False
    gm = prepare_graph(trace_model(model, trace_cfg, example))
    if config.train_issue:  # found at conversion (e.g. a train graph that cannot be differentiated)
        train_gm, train_issue = None, config.train_issue
    else:
        train_gm, train_issue = _train_graph(model, trace_cfg, example, gm)
    for g in (gm, train_gm):
        if config.upsample_logits and g is not None:
            upsample_to_input(g)
    names = [e.name for e in config.exits]
    try:
        stages, train_issue, train_skips = _stages(gm, train_gm, names, train_issue, [e.skip for e in config.exits])
    except MexifyError as e:
        raise BundleError(
            f"the model no longer has the bundle's exit points: {e.message}",
            "the spec's code changed since conversion; convert again",
        ) from e
    heads, candidates = build_exit_heads(config)
    stage_flops = [e.stage_flops for e in config.exits] + [config.final_flops]
    model = MultiExitModel(
        stages, heads, config.num_classes, tuple(h_w for h_w in trace_cfg.input_size), stage_flops,
        [e.head_flops for e in config.exits], config.original_flops, [e.batch_dims for e in config.exits],
        candidates=candidates or None, skips=[e.skip for e in config.exits], train_skips=train_skips,
    )
    model.train_issue = train_issue
    model.static_size = _static_size(trace_cfg)
    model.config = config
    return model


def build_exit_heads(config: BundleConfig) -> Tuple[dict, dict]:
    """Each exit's head and, where the config lists candidates, all of them (the head is candidate ``chosen``)."""
    heads, candidates = {}, {}
    for e in config.exits:
        if e.candidates:
            modules = [build_head(c, e.in_channels, config.num_classes, e.skip_channels) for c in e.candidates]
            candidates[e.name] = modules
            heads[e.name] = modules[e.chosen]
        else:
            heads[e.name] = build_head(e.head, e.in_channels, config.num_classes, e.skip_channels)
    return heads, candidates
