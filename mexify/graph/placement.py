"""Exit placement: which graph nodes can carry an exit head, and which N of them to use.

A candidate is a node whose output is a 4-D floating NCHW feature map with a spatial size
between the input's and 1/32 of it, computed before the model's final classifier. The
default strategy aims at evenly spaced fractions of cumulative FLOPs (k / (N + 1), or
evenly up to the last candidate when the classifier is heavy) and prefers block outputs
and cuts where few tensors are alive.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch.fx as fx

from mexify.errors import PlacementError, nearest
from mexify.graph.batching import BATCH_KEY
from mexify.graph.liveness import compute_nodes, last_uses
from mexify.graph.flops import META_KEY as PROFILE_KEY
from mexify.graph.trace import module_path

__all__ = ["ExitPoint", "PlacementConfig", "find_candidates", "select_exit_points", "output_stride", "fuse_stride", "fuse_sources",
           "MIN_FUSE_STRIDE"]


@dataclasses.dataclass(frozen=True)
class ExitPoint:
    """A node where an exit head may attach, with what it costs to get there."""

    name: str
    position: int
    channels: int
    height: int
    width: int
    stride: float
    cum_flops: int
    fraction: float
    block: str
    live_tensors: int
    shrink_issue: str = ""  # why the batch cannot shrink at this cut ("" when it can)
    last_use: int = -1  # position of the node's last user (past ``position``: the graph keeps it alive there)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PlacementConfig:
    """Placement strategy as data: how much a non-block cut or an extra live tensor costs.

    Scores are ``|fraction - target| + block_penalty * (not a block output)
    + live_penalty * (live tensors - 1)``; the lowest wins.
    """

    block_penalty: float = 0.03
    live_penalty: float = 0.01
    min_stride: int = 32


def _is_tensor_value(node: fx.Node) -> bool:
    prof = node.meta.get(PROFILE_KEY)
    return bool(prof is not None and prof.is_tensor)


def _block_outputs(nodes: List[fx.Node]) -> Dict[fx.Node, str]:
    """Nodes that are the last node of a module spanning at least two nodes -> that module's path."""
    stacks = [module_path(n) for n in nodes]
    span: Dict[str, int] = {}
    for stack in stacks:
        for p in stack:
            span[p] = span.get(p, 0) + 1
    out = {}
    for i, n in enumerate(nodes):
        nxt = set(stacks[i + 1]) if i + 1 < len(nodes) else set()
        closed = [p for p in stacks[i] if p not in nxt and span.get(p, 0) >= 2]
        if closed:
            out[n] = closed[0]  # the outermost block this node closes
    return out


def _classifier_position(nodes: List[fx.Node], logits: fx.Node, num_classes: int, flops_before: List[int]) -> int:
    """Position where the model's final classifier starts.

    That is the first node of the outermost module around the classifier layer (e.g.
    torchvision's ``classifier``, smp's ``segmentation_head``) if that module starts past half
    of the model's FLOPs; otherwise the first layer with FLOPs in the tail of
    ``num_classes``-channel maps that ends at the logits.
    """
    pos = {n: i for i, n in enumerate(nodes)}

    def k_channels(n: fx.Node) -> bool:
        prof = n.meta.get(PROFILE_KEY)
        return bool(prof is not None and prof.is_tensor and prof.shape is not None
                    and len(prof.shape) == 4 and prof.shape[1] == num_classes)

    # walk back from the logits through the tail of num_classes-channel maps only
    first, seen, todo = pos[logits], set(), [logits]
    while todo:
        n = todo.pop()
        if n in seen or n not in pos:
            continue
        seen.add(n)
        prof = n.meta.get(PROFILE_KEY)
        if prof is not None and prof.flops > 0:
            first = min(first, pos[n])
        todo.extend(a for a in n.all_input_nodes if k_channels(a))
    total = flops_before[-1] if flops_before else 0
    for path in module_path(nodes[first]):
        members = [i for i, n in enumerate(nodes) if path in module_path(n)]
        if members and total and flops_before[members[0]] >= 0.5 * total:
            return min(members[0], first)
    return first


def find_candidates(
    gm: fx.GraphModule,
    input_size: Tuple[int, int],
    num_classes: int,
    config: PlacementConfig = PlacementConfig(),
    stop_modules: Sequence[str] = (),
) -> List[ExitPoint]:
    """All nodes where an exit may attach, in execution order (needs a profiled graph).

    ``stop_modules``: qualified module names; candidates end where the first node traced inside one of them
    runs (a mask classifier's transformer decoder: past it the maps are per query, not per pixel).
    """
    nodes = compute_nodes(gm.graph)
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    logits = out_node.args[0]
    total = sum(n.meta[PROFILE_KEY].flops for n in nodes if PROFILE_KEY in n.meta)
    flops_before, running = [], 0  # cumulative FLOPs before each node, then the total
    for n in nodes:
        flops_before.append(running)
        prof = n.meta.get(PROFILE_KEY)
        running += prof.flops if prof is not None else 0
    flops_before.append(running)
    stop = min(_classifier_position(nodes, logits, num_classes, flops_before), _first_inside(nodes, stop_modules))
    last_use = last_uses(nodes)
    blocks = _block_outputs(nodes)
    h_in, w_in = input_size
    deaths = [0] * (len(nodes) + 1)
    for j, v in enumerate(nodes):
        if _is_tensor_value(v) and j < last_use[v] < len(nodes):
            deaths[last_use[v]] += 1
    issues = _shrink_issues(nodes, last_use)
    cum, live, out = 0, 0, []
    for i, n in enumerate(nodes):
        prof = n.meta.get(PROFILE_KEY)
        cum += prof.flops if prof is not None else 0
        # tensors alive after node i: those defined so far whose last use comes later
        live += (1 if _is_tensor_value(n) and last_use[n] > i else 0) - deaths[i]
        if i >= stop or prof is None or n.op == "placeholder" or cum <= 0:
            continue
        batch = n.meta.get(BATCH_KEY)
        if batch is not None and batch.kind == "none":
            continue  # the same map for every image (a resized parameter): a head there cannot tell images apart
        if not prof.is_tensor or prof.shape is None or len(prof.shape) != 4 or not prof.dtype.is_floating_point:
            continue
        _, c, h, w = prof.shape
        if h <= 0 or w <= 0 or h > h_in or w > w_in or h * config.min_stride < h_in or w * config.min_stride < w_in:
            continue
        sh, sw = h_in / h, w_in / w
        if abs(sh / sw - 1.0) > 0.25 or c < 1:
            continue  # not an NCHW map of this image, e.g. a (B, H, W, C) view in a transformer
        out.append(
            ExitPoint(
                name=n.name, position=i, channels=int(c), height=int(h), width=int(w), stride=round(sh, 3),
                cum_flops=int(cum), fraction=cum / total if total else 0.0, block=blocks.get(n, ""),
                live_tensors=max(live, 1), shrink_issue=issues.get(i, ""), last_use=int(last_use[n]),
            )
        )
    return out


def _first_inside(nodes: List[fx.Node], modules: Sequence[str]) -> int:
    """Position of the first node traced inside one of ``modules`` (or a call of one of them), else past the end."""
    def inside(path: str) -> bool:
        return any(path == m or path.startswith(m + ".") for m in modules)

    for i, n in enumerate(nodes):
        if modules and any(inside(p) for p in module_path(n) + ([str(n.target)] if n.op == "call_module" else [])):
            return i
    return len(nodes)


def _shrink_issues(nodes: List[fx.Node], last_use: Dict[fx.Node, int]) -> Dict[int, str]:
    """Positions where a value alive across the cut cannot follow a shrinking batch, with the reason."""
    issues: Dict[int, str] = {}
    for j, v in enumerate(nodes):
        dim = v.meta.get(BATCH_KEY)
        if dim is None or dim.safe:
            continue
        for i in range(j, min(last_use[v], len(nodes))):
            issues.setdefault(i, f"value {v.name!r} ({dim.why}) is alive here and cannot follow a shrinking batch")
    return issues


def select_exit_points(
    candidates: Sequence[ExitPoint],
    num_exits: int = 6,
    at: Optional[Sequence[str]] = None,
    config: PlacementConfig = PlacementConfig(),
) -> List[ExitPoint]:
    """Pick the exit points: the named ones (``at``), or ``num_exits`` spread by FLOPs.

    Raises:
        PlacementError: unknown names, ``num_exits`` < 1, or more exits than candidates.
    """
    by_name = {c.name: c for c in candidates}
    if at:
        chosen = []
        for name in at:
            if name not in by_name:
                close = nearest(name, by_name, n=5)
                raise PlacementError(
                    f"{name!r} is not a valid exit point",
                    f"nearest valid: {', '.join(close)}; see `mexify inspect` for all" if close else "see `mexify inspect`",
                )
            chosen.append(by_name[name])
            if by_name[name].shrink_issue:
                raise PlacementError(f"exit point {name!r} cannot be used: {by_name[name].shrink_issue}",
                                     "pick another node (`mexify inspect` shows where the batch can shrink)")
        if len({c.name for c in chosen}) != len(chosen):
            raise PlacementError("the same exit point is named twice in --at")
        return sorted(chosen, key=lambda c: c.position)
    if num_exits < 1:
        raise PlacementError(f"--exits must be at least 1, got {num_exits}", "use --exits 6 (the default) or fewer")
    unsafe = [c for c in candidates if c.shrink_issue]
    candidates = [c for c in candidates if not c.shrink_issue]  # the batch must be able to shrink at a cut
    if num_exits > len(candidates):
        raise PlacementError(
            f"asked for {num_exits} exits but the model has only {len(candidates)} candidate exit points"
            + (f" where the batch can shrink ({len(unsafe)} more cannot: {unsafe[0].shrink_issue})" if unsafe else ""),
            f"use --exits {len(candidates)} or fewer",
        )
    # Targets k/(N+1) of the FLOPs; when the last candidate comes earlier (a heavy classifier
    # after it), spread the exits evenly up to that candidate instead of bunching them.
    step = min(1.0 / (num_exits + 1), candidates[-1].fraction / num_exits)
    chosen: List[ExitPoint] = []
    start = 0
    for k in range(1, num_exits + 1):
        target = k * step
        remaining = num_exits - k  # picks still needed after this one
        pool = candidates[start: len(candidates) - remaining]
        best = min(
            pool,
            key=lambda c: abs(c.fraction - target)
            + (0.0 if c.block else config.block_penalty)
            + config.live_penalty * (c.live_tensors - 1),
        )
        chosen.append(best)
        start = candidates.index(best) + 1
    return chosen


MIN_FUSE_STRIDE = 4
"""Fused heads read features no finer than this stride (DeepLabV3+'s skip): finer ones cost more than they add."""


def output_stride(gm: fx.GraphModule, input_size: Tuple[int, int], num_classes: int) -> float:
    """Stride of the finest detail in the model's class map (1.0: at the input).

    Each 4-D map's detail is the finest of its 4-D inputs', no finer than itself: a convolution keeps its
    input's, a strided one coarsens it, an interpolation adds none, a learned upsampling makes its own.
    LR-ASPP's sum of a stride-8 and an upsampled stride-16 classifier: stride 8; a mask classifier's class
    map at 384x384 built from masks at stride 4: stride 4. ``num_classes`` is the class map's channel count
    (kept for the callers; the walk needs no check).
    """
    def height(n: fx.Node) -> int:  # of a 4-D map (0: not one)
        prof = n.meta.get(PROFILE_KEY)
        if prof is None or not prof.is_tensor or prof.shape is None or len(prof.shape) != 4:
            return 0
        return int(prof.shape[2])

    detail: Dict[fx.Node, int] = {}  # the finest height of information in each 4-D map
    for n in gm.graph.nodes:
        h = height(n)
        if not h:
            continue
        maps = [a for a in n.all_input_nodes if a in detail]
        if not maps:
            detail[n] = h  # a first map
        elif _is_resize(gm, n):
            detail[n] = max(detail[a] for a in maps)
        elif h > max(height(a) for a in maps):
            detail[n] = h  # a learned upsampling (a transposed convolution) makes its own detail
        else:
            detail[n] = min(h, max(detail[a] for a in maps))
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    logits = out_node.args[0]
    if not isinstance(logits, fx.Node) or not detail.get(logits):
        return 1.0
    return round(input_size[0] / detail[logits], 3)


def _is_resize(gm: fx.GraphModule, n: fx.Node) -> bool:
    """An interpolation (``F.interpolate``, ``nn.Upsample``, aten's ``upsample_*``): it adds no detail."""
    if n.op == "call_module":
        target = type(gm.get_submodule(str(n.target))).__name__
    else:
        target = getattr(n.target, "__name__", str(n.target))
    return any(word in target.lower() for word in ("interpolate", "upsample", "upsampling"))


def fuse_stride(out_stride: float) -> float:
    """The stride fused heads read: the output stride, but no finer than :data:`MIN_FUSE_STRIDE`."""
    return max(float(out_stride), float(MIN_FUSE_STRIDE))


def fuse_sources(candidates: Sequence[ExitPoint], chosen: Sequence[ExitPoint], out_stride: float) -> List[Optional[ExitPoint]]:
    """For each chosen exit, the finer feature a fused head reads, or None where the exit is fine enough.

    The skip of an exit coarser than :func:`fuse_stride` is a candidate computed before it at the finest
    stride between the two; among those, one the graph keeps alive across the exit's cut (nothing more
    to carry), then a block output, then the last one.
    """
    target = fuse_stride(out_stride)
    usable = [c for c in candidates if not c.shrink_issue]
    out: List[Optional[ExitPoint]] = []
    for exit_point in chosen:
        if exit_point.stride <= target * 1.01:
            out.append(None)
            continue
        before = [c for c in usable if c.position < exit_point.position and target * 0.99 <= c.stride < exit_point.stride * 0.99]
        if not before:
            out.append(None)
            continue
        finest = min(c.stride for c in before)
        pool = [c for c in before if abs(c.stride - finest) < 1e-6]
        out.append(max(pool, key=lambda c: (c.last_use > exit_point.position, bool(c.block), c.position)))
    return out
