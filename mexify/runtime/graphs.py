"""CUDA graphs for the early-exit runtime: every stage, with its exit's head and decision, replayed.

Eager PyTorch pays a kernel launch and some Python per operator; at batch 1 on a GPU that is
most of a segmentation network's time, and the early exits (short stages, small heads) pay it in
full. Here each stage ``i`` together with, when its exit is active, the head and the policy's
``decide`` is captured once per *bucket* as one ``torch.cuda.CUDAGraph``. A bucket is a batch bucket
(every size up to 8, then multiples of 8) at one input shape and dtype (:class:`BucketKey`): static
buffers take only the shape they were captured at, so each input resolution gets its own graphs.

* the graphs of one bucket are captured in stage order, each reading the previous one's static
  outputs, so a batch that does not shrink runs graph after graph with no copy at all;
* when images leave, the rows that stay are gathered (``StageState.select``, padded up to the
  next bucket by repeating the last row) straight into the static outputs of the same stage in
  the smaller bucket, whose next graphs then replay; padded rows are ignored;
* each graph also makes every row's mask at the input size and writes the decision and confidence
  into one small tensor; each active early exit costs one copy of it to the host (the only sync),
  after which the bookkeeping (who leaves, where each image's results go) is done on the host;
  the final exit costs no sync at all.

Capture happens on first use of a bucket (after two eager warm-up passes on a side stream); a
model whose stages cannot be captured (a host sync inside, a CPU tensor, ...) raises
:class:`GraphCaptureError`, on which the runtime falls back to eager with one warning; any other
error (the model failing on this input in the warm-up, out of memory) is raised as it is. Autocast
runs inside the graphs with its weight cache off, as CUDA graphs require.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from mexify.nn.model import StageState

log = logging.getLogger(__name__)

__all__ = ["GraphedExits", "GraphedCall", "GraphCaptureError", "BucketKey", "BucketTable", "bucket_of", "capture"]


def bucket_of(n: int) -> int:
    """The batch bucket of ``n`` images: ``n`` itself up to 8, then the next multiple of 8.

    Small batches are where padding would cost most (5 images in a bucket of 8 pay for 8), and a
    bucket's graphs hold little memory at those sizes.
    """
    n = max(int(n), 1)
    return n if n <= 8 else -(-n // 8) * 8


class GraphCaptureError(RuntimeError):
    """A stage could not be captured as a CUDA graph: the runtime runs eagerly from then on."""


class BucketKey(NamedTuple):
    """What one set of captured graphs serves: a batch bucket at one input shape and dtype."""

    size: int  # the batch bucket (:func:`bucket_of`)
    image: Tuple[int, ...]  # one input's shape, (C, H, W)
    dtype: torch.dtype


class BucketTable:
    """The captured buckets, by :class:`BucketKey`: which bucket a batch runs in, and whether it must
    be captured first.

    ``make(key, like)`` captures a bucket; it is called once per key, on first use. Whatever it
    raises propagates and nothing is recorded, so a later call tries again.
    """

    def __init__(self, make: Callable[[BucketKey, torch.Tensor], Any]):
        self._make = make
        self._buckets: Dict[BucketKey, Any] = {}

    @staticmethod
    def key(n: int, like: torch.Tensor) -> BucketKey:
        """The bucket of ``n`` rows shaped and typed like the rows of ``like``."""
        return BucketKey(bucket_of(n), tuple(int(s) for s in like.shape[1:]), like.dtype)

    def get(self, n: int, like: torch.Tensor) -> Any:
        """The bucket for ``n`` rows like ``like``'s, made now if this is its first use."""
        key = self.key(n, like)
        if key not in self._buckets:
            self._buckets[key] = self._make(key, like)
        return self._buckets[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def __iter__(self) -> Iterator[BucketKey]:
        return iter(self._buckets)

    def __len__(self) -> int:
        return len(self._buckets)


class _Bucket:
    """Static buffers and graphs of every stage at one batch size and input shape."""

    def __init__(self, size: int):
        self.size = size
        self.x: Optional[torch.Tensor] = None
        self.graphs: List[torch.cuda.CUDAGraph] = []
        self.states: List[StageState] = []  # static state after each stage
        self.masks: List[Optional[torch.Tensor]] = []  # (size, H, W) labels of every row
        self.decision: List[Optional[torch.Tensor]] = []  # (2, size): go (0/1) and confidence
        self.pool: Any = None


class GraphedExits:
    """Runs a multi-exit model's stages as CUDA graphs, one set per batch bucket.

    Args:
        model: the :class:`~mexify.nn.MultiExitModel` (eval mode, on a CUDA device).
        policy: the runtime's policy (``decide`` must not sync with the host).
        active: exits whose head and decision run.
        needs_features: the policy also reads the exit-point features.
        autocast: a callable giving the autocast context (or a null context).
        memory_format: ``torch.channels_last`` or ``torch.contiguous_format`` for the inputs.
        final_confidence: also score the final exit (inside its graph).
        masks: ``masks(i, logits, features, size)``: the labels of every row at exit ``i`` (the
            runtime's, so that both paths make the same masks).
    """

    def __init__(self, model: Any, policy: Any, active: List[int], needs_features: bool,
                 autocast: Callable[[], Any], memory_format: torch.memory_format, final_confidence: bool = False,
                 masks: Optional[Callable[..., torch.Tensor]] = None):
        self.model = model
        self.policy = policy
        self.active = set(active)
        self.needs_features = needs_features
        self.autocast = autocast
        self.memory_format = memory_format
        self.final_confidence = final_confidence
        self.masks = masks
        self.buckets = BucketTable(self._capture_bucket)  # BucketKey -> _Bucket

    # ------------------------------------------------------------------ capture
    def _step(self, i: int, state: StageState) -> Tuple[StageState, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Stage ``i`` and, when its exit is active, the head, the decision and every row's mask
        at the input size (what one graph holds: a mask costs less than the launches it saves)."""
        model = self.model
        out = model.run_stage(i, state)
        if i not in self.active:
            return out, None, None
        last = i == model.num_exits - 1
        feats = model.exit_features(i, out) if self.needs_features and not last else None
        logits = model.exit_logits(i, out)
        mask = self.masks(i, logits, feats, out.input_size)
        if last and not self.final_confidence:
            return out, mask, None
        go, conf = self.policy.decide(i, logits, feats)
        # one (2, N) float tensor: the host reads both with a single copy
        return out, mask, torch.stack([go.reshape(-1).float(), conf.reshape(-1).float()])

    def _eager_pass(self, x: torch.Tensor) -> None:
        state = self.model.start(x)
        for i in range(self.model.num_exits):
            state = self._step(i, state)[0]

    def bucket(self, size: int, like: torch.Tensor) -> _Bucket:
        """The graphs for ``size`` rows shaped like ``like``'s (captured now if this is the bucket's first use).

        Raises:
            GraphCaptureError: a stage cannot be captured. Errors of the warm-up passes (the model
                on this input) are raised as they are.
        """
        return self.buckets.get(size, like)

    def _capture_bucket(self, key: BucketKey, like: torch.Tensor) -> _Bucket:
        b = _Bucket(key.size)
        b.x = torch.zeros((key.size, *key.image), dtype=key.dtype, device=like.device).contiguous(memory_format=self.memory_format)
        b.x.copy_(like[:1].expand_as(b.x))
        side = torch.cuda.Stream(device=like.device)
        side.wait_stream(torch.cuda.current_stream(like.device))
        with torch.cuda.stream(side), self.autocast():
            for _ in range(2):  # warm-up: lazy initialisation, cuDNN algorithm choice, policy tensors
                self._eager_pass(b.x)
        torch.cuda.current_stream(like.device).wait_stream(side)
        b.pool = torch.cuda.graph_pool_handle()
        state = self.model.start(b.x)
        for i in range(self.model.num_exits):
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g, pool=b.pool), self.autocast():
                    state, mask, decision = self._step(i, state)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as e:  # a host sync, a CPU tensor, a data-dependent shape inside the stage
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise GraphCaptureError(f"stage {i} cannot be captured: {first}") from e
            b.graphs.append(g)
            b.states.append(state)
            b.masks.append(mask)
            b.decision.append(decision)
        return b

    # ------------------------------------------------------------------ run
    @staticmethod
    def move(src: StageState, index: torch.Tensor, dst: StageState) -> None:
        """Rows ``index`` of ``src`` into ``dst``'s static tensors (same stage, another bucket)."""
        picked = src.select(index)
        for name, value in picked.values.items():
            target = dst.values[name]
            if isinstance(value, torch.Tensor) and isinstance(target, torch.Tensor) and value.data_ptr() != target.data_ptr():
                target.copy_(value)



def capture(fn: Callable[[], Any], device: torch.device, autocast: Optional[Callable[[], Any]] = None,
            warmup: int = 2) -> Tuple[Callable[[], None], Any]:
    """``fn`` (no arguments, reading fixed tensors) captured as a CUDA graph.

    Returns:
        (replay, outputs): ``replay()`` reruns the captured work; ``outputs`` are its static results.
    """
    ctx = autocast or (lambda: torch.autocast(device.type, enabled=False))
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), ctx():
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), ctx():
        out = fn()
    return g.replay, out


class GraphedCall:
    """``fn(x)`` replayed from a CUDA graph per input shape (the original model in ``bench``)."""

    def __init__(self, fn: Callable[[torch.Tensor], Any], autocast: Optional[Callable[[], Any]] = None):
        self.fn = fn
        self.autocast = autocast
        self.graphs: Dict[Tuple[int, ...], Tuple[Callable[[], None], torch.Tensor, Any]] = {}

    def __call__(self, x: torch.Tensor) -> Any:
        key = tuple(x.shape)
        if key not in self.graphs:
            static = x.clone()
            replay, out = capture(lambda: self.fn(static), x.device, self.autocast)
            self.graphs[key] = (replay, static, out)
        replay, static, out = self.graphs[key]
        static.copy_(x)
        replay()
        return out
