"""Early-exit inference: run stage by stage, stop as soon as the policy says so.

:class:`EarlyExitRuntime` runs a :class:`~mexify.nn.MultiExitModel` one stage at a time.
After each stage whose exit the policy may take, it evaluates that exit's head on the
samples still in the batch and asks ``policy.decide``; samples that exit leave the batch
(``StageState.select``) and the rest go on, so later stages really run on fewer samples,
and not at all once every sample has exited. Results are scattered back in input order.

Execution is fixed when the runtime is made, never toggled per call: eager stage by stage, or on
CUDA (the default there) each stage with its active exit's head, decision and masks replayed from a
CUDA graph per batch bucket (:mod:`mexify.runtime.graphs`); optional autocast dtype and
channels_last. Heads answer at their features' resolution and policies score there; an exit's
output is resized to the input only for the images that leave there.

Costs are counted in FLOPs at the bundle's profiling input size (1 multiply-add = 1 FLOP):
the stages run plus the heads evaluated on the way. Heads of exits the policy can never
take (a threshold of ``inf``) are not evaluated and not counted, so the figure can be
below ``model.cost_to_exit``.

Every batch is also recorded in a :class:`~mexify.runtime.monitor.StreamMonitor`
(``runtime.stream``): the exit each image left at and the policy's confidence at every early exit
it reached, summed where they were computed; :meth:`EarlyExitRuntime.drift` tests them against what
calibration saw (``policy.monitor``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from mexify.errors import ConfigError, DataError
from mexify.nn import exit_flops, module_device, resize_logits
from mexify.nn.model import StageState
from mexify.runtime.graphs import GraphCaptureError, GraphedExits, bucket_of
from mexify.runtime.monitor import MIN_IMAGES, DriftReport, StreamMonitor, StreamStats, drift_report
from mexify.runtime.policy import active_exits, resolve_policy
from mexify.runtime.results import BatchPrediction, Prediction

log = logging.getLogger(__name__)

__all__ = ["EarlyExitRuntime", "Step", "predict", "labels_of", "masks_of", "resize_masks", "parse_dtype", "DTYPES"]


def labels_of(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(1)``: ``max(1).indices`` gives the same (first) index, but argmax over the
    channel dim of an NCHW tensor takes a slow strided path on CPU (about 15x at 8x128x128)."""
    return scores.max(1).indices


def masks_of(scores: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Masks ``(N, H, W)`` from class scores ``(N, K, h, w)``: the scores resized bilinearly to ``size``
    (the input's), then the argmax. The one rule for a mask: the runtime's (what ``predict`` returns),
    evaluation's, the exit cache's, ``bench``'s original model and the latency profile's all call it."""
    return labels_of(resize_logits(scores, size))


def resize_masks(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Masks ``(N, H, W)`` at another size (labels of another resolution), by nearest neighbour at pixel
    centres (``nearest-exact``, as PIL's ``NEAREST`` that ``mexify predict`` uses to give each image its own
    size back); unchanged when already there. A mask is made at the input size (:func:`masks_of`) and only
    then resized, so evaluation scores what a user gets."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0].to(masks.dtype)


_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = tuple(_DTYPES)


def parse_dtype(dtype: Any) -> str:
    """``float32`` (None), ``bfloat16`` or ``float16`` (a ``torch.dtype`` too): the runtime's autocast dtype.

    Raises:
        ConfigError: any other name.
    """
    name = "float32" if dtype is None else str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}", f"use one of {', '.join(_DTYPES)}")
    return name


@dataclasses.dataclass
class Step:
    """What one stage did to a batch (:meth:`EarlyExitRuntime.step`).

    Attributes:
        index: the stage (and exit) index.
        leave: the batch's rows that left at this exit (device, int64, ascending).
        masks: their masks at the input size (``(n_leave, H, W)``), None when none left.
        confidence: their confidence (``(n_leave,)``), None when none left or not scored (the final exit
            unless ``final_confidence``).
        scores: the policy's confidence on every row of the batch (what the stream monitor records), None
            where the policy decided nothing (an inactive exit, the final exit).
        state: the state of the rows that go on (in batch order), None when every row left.
        stay: the batch's rows that go on, when some left and some did not (None otherwise: all or none).
        n_leave: how many rows left (a host int).
    """

    index: int
    leave: torch.Tensor
    masks: Optional[torch.Tensor]
    confidence: Optional[torch.Tensor]
    scores: Optional[torch.Tensor]
    state: Optional[StageState]
    stay: Optional[torch.Tensor]
    n_leave: int


class _Outputs:
    """The batch's results, filled in as images leave (device tensors, input order)."""

    def __init__(self, n: int, e: int, size: Tuple[int, int], dev: torch.device):
        self.masks = torch.empty((n, *size), dtype=torch.long, device=dev)  # every image leaves exactly once
        self.exit_index = torch.full((n,), e - 1, dtype=torch.long, device=dev)
        self.confidence = torch.full((n,), float("nan"), dtype=torch.float32, device=dev)


class EarlyExitRuntime:
    """Early-exit inference with batch shrinking.

    Args:
        model: a :class:`~mexify.nn.MultiExitModel`.
        policy: see :func:`resolve_policy` (default: the bundle's policy).
        exit: force every image to one exit instead (index or name).
        cuda_graphs: replay stages (with their active head and decision) as CUDA graphs per batch
            bucket (:mod:`mexify.runtime.graphs`); default on when the model is on a CUDA device.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``: autocast for stages and heads.
        channels_last: run convolutions in NHWC (converts the model's weights once); default off.
        final_confidence: also score the images that reach the final exit (the policy's score on
            the full-resolution output: it decides nothing there, so by default it is not computed
            and their ``confidence`` is NaN).

    Example::

        rt = EarlyExitRuntime(mexify.load("model.mex", device="cuda"))
        for p in rt.predict(images):      # images (N, 3, H, W), normalised
            print(p.exit_name, p.confidence, p.mask.shape)
        report = rt.drift()               # None without a calibration record in the policy
        for line in report.warnings if report else []:
            print(line)
    """

    def __init__(self, model: Any, policy: Any = None, exit: Union[int, str, None] = None, *,
                 cuda_graphs: Optional[bool] = None, dtype: Optional[str] = None, channels_last: Optional[bool] = None,
                 final_confidence: bool = False):
        self.model = model
        self.final_confidence = bool(final_confidence)
        self.policy = resolve_policy(model, policy, exit)
        e = model.num_exits
        self.active = active_exits(self.policy, e)
        self.needs_features = bool(getattr(self.policy, "needs_features", False))
        self.exit_flops = exit_flops(model.stage_flops, model.head_flops, self.active)
        self._stream = StreamMonitor(model.exit_names)
        self._set_execution(cuda_graphs, dtype, channels_last)

    def _set_execution(self, cuda_graphs: Optional[bool], dtype: Optional[str], channels_last: Optional[bool]) -> None:
        """Device, autocast, memory format and CUDA graphs, fixed once (nothing is toggled per call)."""
        dev = module_device(self.model)
        self.device = dev
        name = parse_dtype(dtype)
        if name == "float16" and dev.type != "cuda":
            raise ConfigError("float16 is for GPUs", "run the CPU with dtype float32 or bfloat16")
        self.dtype = name
        self.channels_last = bool(channels_last)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cuda_graphs and dev.type != "cuda":
            raise ConfigError("CUDA graphs need the model on a CUDA device", "load it with device='cuda' (--device cuda), or leave graphs off")
        self.cuda_graphs = dev.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self._graphs = GraphedExits(self.model, self.policy, self.active, self.needs_features, self.autocast,
                                    self.memory_format, self.final_confidence, self._masks) if self.cuda_graphs else None

    def autocast(self) -> Any:
        """The autocast context the runtime runs under (a null context for float32): what a timing of the
        original model or of single pieces (``mexify bench``) runs under to be comparable."""
        if _DTYPES[self.dtype] is None:
            return contextlib.nullcontext()
        # no weight-cast cache: CUDA graphs cannot capture it, and eager runs stay comparable
        return torch.autocast(self.device.type, dtype=_DTYPES[self.dtype], cache_enabled=False)

    @property
    def exit_names(self) -> List[str]:
        return list(self.model.exit_names)

    @property
    def stream(self) -> StreamMonitor:
        """The running statistics of every image run so far (since the last :meth:`reset_stats`)."""
        return self._stream

    def stats(self) -> StreamStats:
        """A snapshot of :attr:`stream`: images, exit rates, confidence per early exit."""
        return self._stream.snapshot()

    def reset_stats(self) -> None:
        """Start a new window of the stream statistics."""
        self._stream.reset()

    def drift(self, alpha: float = 0.01, min_images: int = MIN_IMAGES) -> Optional[DriftReport]:
        """The images run so far against what calibration saw (:func:`~mexify.runtime.monitor.drift_report`).

        Args:
            alpha: family-wise significance level of the tests.
            min_images: below this many images nothing is tested.

        Returns:
            a :class:`~mexify.runtime.monitor.DriftReport` (``warnings``: one line per finding), or None
            when the policy carries no calibration record (``policy.monitor``).
        """
        record = getattr(self.policy, "monitor", None)
        if not record:
            return None
        return drift_report(self.stats(), record, alpha=alpha, min_images=min_images)

    def _masks(self, i: int, logits: torch.Tensor, feats: Optional[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        """Masks of the images that leave at exit ``i``: the only place an exit's output is resized."""
        mask_scores = getattr(self.policy, "mask_scores", None)
        scores = mask_scores(i, logits, feats) if mask_scores is not None else logits
        return masks_of(scores, size)

    def step(self, i: int, state: StageState, size: Tuple[int, int]) -> Step:
        """Run stage ``i`` on a batch and decide its exit: the one rule of what happens at a stage, used by the
        batch loop and by the stage scheduler (:mod:`mexify.runtime.scheduler`), which runs stages of many
        requests' rows joined together. Call it under ``torch.inference_mode()`` and :meth:`autocast`.

        Args:
            i: the stage (and exit) index.
            state: the rows' state before stage ``i`` (``model.start(x)`` for stage 0).
            size: the input size masks are made at.

        Returns:
            a :class:`Step`: the rows that left here with their masks and confidence, and the state of the rest.
        """
        model, policy = self.model, self.policy
        state = model.run_stage(i, state)
        n, dev = int(state.batch_size), self.device
        if i not in self.active:
            return Step(i, torch.empty(0, dtype=torch.long, device=dev), None, None, None, state, None, 0)
        last = i == model.num_exits - 1
        feats = model.exit_features(i, state) if self.needs_features and not last else None
        logits = model.exit_logits(i, state)
        if last:  # everything leaves; the score decides nothing here
            conf = policy.decide(i, logits, feats)[1].reshape(-1) if self.final_confidence else None
            return Step(i, torch.arange(n, device=dev), self._masks(i, logits, feats, size), conf, None, None, None, n)
        go, conf = policy.decide(i, logits, feats)
        go = go.to(device=dev, dtype=torch.bool).reshape(-1)
        conf = conf.reshape(-1)
        leave = go.nonzero().squeeze(1)
        n_leave = int(leave.numel())  # one device sync per exit
        if n_leave == n:
            return Step(i, leave, self._masks(i, logits, feats, size), conf, conf, None, None, n)
        if n_leave == 0:
            return Step(i, leave, None, None, conf, state, None, 0)
        sub_feats = feats.index_select(0, leave) if feats is not None else None
        masks = self._masks(i, logits.index_select(0, leave), sub_feats, size)
        stay = (~go).nonzero().squeeze(1)
        return Step(i, leave, masks, conf.index_select(0, leave), conf, state.select(stay), stay, n_leave)

    @staticmethod
    def _emit(out: _Outputs, step: Step, alive: torch.Tensor) -> None:
        """Write the results of the rows that left at ``step`` at their input rows (``alive``: the batch's)."""
        if step.n_leave == out.exit_index.numel():  # the whole batch at once, in input order (nothing left before)
            out.masks = step.masks
            out.exit_index.fill_(step.index)
            if step.confidence is not None:
                out.confidence = step.confidence.to(out.confidence.device, torch.float32)
            return
        rows = alive.index_select(0, step.leave)
        out.masks.index_copy_(0, rows, step.masks)
        out.exit_index.index_fill_(0, rows, step.index)
        if step.confidence is not None:
            out.confidence.index_copy_(0, rows, step.confidence.to(rows.device, out.confidence.dtype))

    def predict_batch(self, x: torch.Tensor) -> BatchPrediction:
        """Run a batch ``(N, 3, H, W)`` with early exits; results in input order.

        Raises:
            DataError: ``x`` is not a 4-D batch.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"predict expects images (N, 3, H, W), got {shape}", "add a batch dimension with x.unsqueeze(0)")
        model = self.model
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            if not model.training:  # toggling every submodule's mode costs more than a small stage
                return self._run(x)
            model.eval()
            try:
                return self._run(x, graphs=False)  # graphs are captured in eval mode only
            finally:
                model.train(True)

    def _run(self, x: torch.Tensor, graphs: bool = True) -> BatchPrediction:
        seen: List[Tuple[int, torch.Tensor]] = []  # (early exit, confidences of the images that reached it)
        if graphs and self._graphs is not None and x.shape[0] > 0:
            try:
                return self._watched(self._run_graphed(x, seen), seen)
            except GraphCaptureError as e:  # a stage that cannot be captured: eager from now on (other errors propagate)
                log.warning("CUDA graphs unavailable for this model (%s); running eagerly", str(e).splitlines()[0])
                self._graphs = None
                self.cuda_graphs = False
                seen.clear()
        out = _Outputs(int(x.shape[0]), self.model.num_exits, (int(x.shape[-2]), int(x.shape[-1])), x.device)
        with self.autocast():
            self._run_eager(x, out, seen)
        return self._watched(self._result(out), seen)

    def _watched(self, result: BatchPrediction, seen: List[Tuple[int, torch.Tensor]]) -> BatchPrediction:
        """Record a finished batch in :attr:`stream` (only once finished: a batch rerun eagerly counts once)."""
        for i, conf in seen:
            if isinstance(conf, torch.Tensor):
                self._stream.observe(i, conf)
        self._stream.count(result.exit_index)
        return result

    def _result(self, out: _Outputs) -> BatchPrediction:
        both = torch.stack([out.exit_index.to(torch.float32), out.confidence]).cpu()  # one copy, one sync
        idx = both[0].long()
        flops = torch.tensor(self.exit_flops, dtype=torch.long)[idx]
        return BatchPrediction(out.masks, idx, both[1].contiguous(), flops, self.exit_names)

    def _run_eager(self, x: torch.Tensor, out: _Outputs, seen: List[Tuple[int, torch.Tensor]]) -> None:
        alive = torch.arange(int(x.shape[0]), device=x.device)  # input rows still in the batch
        size = (int(x.shape[-2]), int(x.shape[-1]))
        state: Optional[StageState] = self.model.start(x)
        for i in range(self.model.num_exits):
            step = self.step(i, state, size)
            if step.scores is not None:
                seen.append((i, step.scores))  # summed on its device when the batch is done: no sync
            if step.n_leave:
                self._emit(out, step, alive)
            state = step.state
            if state is None:
                break
            if step.stay is not None:
                alive = alive.index_select(0, step.stay)

    def _run_graphed(self, x: torch.Tensor, seen: List[Tuple[int, torch.Tensor]]) -> BatchPrediction:
        """As :meth:`_run_eager`, every stage replayed from its bucket's CUDA graph; who leaves is
        read on the host once per active early exit (one small copy), and nothing else syncs."""
        model, graphs, dev = self.model, self._graphs, x.device
        e, n = model.num_exits, int(x.shape[0])
        b = graphs.bucket(bucket_of(n), x)
        b.x[:n].copy_(x)
        rows = torch.arange(n)  # input rows of the batch now running (host)
        exit_index = torch.full((n,), e - 1, dtype=torch.long)
        confidence = torch.full((n,), float("nan"), dtype=torch.float32)
        pieces: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (input rows, their masks on the device)
        for i in range(e):
            b.graphs[i].replay()
            if i not in self.active:
                continue
            m = int(rows.numel())
            if i == e - 1:
                if self.final_confidence:
                    confidence[rows] = b.decision[i][1, :m].cpu()
                pieces.append((rows, b.masks[i][:m]))
                break
            decision = b.decision[i][:, :m].cpu()  # the one sync of this exit
            seen.append((i, decision[1]))
            go = decision[0] > 0.5
            leave = go.nonzero().squeeze(1)
            if leave.numel() == 0:
                continue
            exit_index[rows[leave]] = i
            confidence[rows[leave]] = decision[1][leave]
            if leave.numel() == m:
                pieces.append((rows, b.masks[i][:m]))
                break
            pieces.append((rows[leave], b.masks[i].index_select(0, leave.to(dev))))
            stay = (~go).nonzero().squeeze(1)
            rows = rows[stay]
            nb = graphs.bucket(bucket_of(int(stay.numel())), x)
            index = torch.cat([stay, stay[-1:].expand(nb.size - int(stay.numel()))]).to(dev)
            graphs.move(b.states[i], index, nb.states[i])
            b = nb
        flops = torch.tensor(self.exit_flops, dtype=torch.long)[exit_index]
        return BatchPrediction(self._assemble(pieces, n), exit_index, confidence, flops, self.exit_names)

    @staticmethod
    def _assemble(pieces: List[Tuple[torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
        """The batch's masks in input order from the pieces each exit produced (copied out of the graphs' buffers)."""
        first_rows, first = pieces[0]
        if len(pieces) == 1:
            return first.clone()  # every image left at one exit, in input order
        masks = torch.empty((n, *first.shape[1:]), dtype=first.dtype, device=first.device)
        for rows, part in pieces:
            masks.index_copy_(0, rows.to(first.device), part)
        return masks

    def predict(self, x: torch.Tensor) -> List[Prediction]:
        """Run a batch ``(N, 3, H, W)``; one :class:`Prediction` per image, in input order."""
        return self.predict_batch(x).to_list()

    __call__ = predict


def predict(model: Any, x: torch.Tensor, policy: Any = None, exit: Union[int, str, None] = None) -> List[Prediction]:
    """Early-exit predictions for a batch ``(N, 3, H, W)`` (see :class:`EarlyExitRuntime`).

    Args:
        model: a :class:`~mexify.nn.MultiExitModel`.
        x: normalised images.
        policy: a policy object or dict; default the bundle's policy.
        exit: force every image to one exit (index or name) instead.

    Raises:
        ConfigError: no policy (and no ``exit``), or a policy fitted for other exits.
    """
    return EarlyExitRuntime(model, policy, exit).predict(x)
