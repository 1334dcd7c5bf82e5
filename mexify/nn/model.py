"""The multi-exit model: stages of the original graph plus one head per early exit."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from mexify.errors import DataError
from mexify.graph.batching import BatchDim, join_values, shrink_value
from mexify.graph.split import Stage
from mexify.nn.heads import ExitHead, resize_logits

__all__ = ["MultiExitModel", "StageState", "ExitOutput", "exit_flops", "run_head"]


def run_head(head: nn.Module, inputs: Sequence[torch.Tensor], size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """``head`` on an exit's :meth:`MultiExitModel.head_inputs`: a fused head reads the skip feature, a plain one
    the features alone (:class:`~mexify.nn.ExitHead` and the exported :class:`~mexify.nn.programs.ProgramHead`)."""
    return head(inputs[0], size, skip=inputs[1]) if head.fused else head(inputs[0], size)


def exit_flops(stage_flops: Sequence[Any], head_flops: Sequence[Any], active: Optional[Iterable[int]] = None) -> List[Any]:
    """FLOPs to leave at each exit: the one definition, which the model, the runtime, calibration and
    the configuration search call.

    Exit ``i`` costs stages ``0..i`` plus the heads of the early exits ``0..i`` that run: the
    ``active`` ones (the runtime never evaluates a switched-off exit's head), every one when
    ``active`` is None. The final exit has no head of its own. Unit: FLOPs at the bundle's input
    size, 1 multiply-add = 1 FLOP (:mod:`mexify.graph.flops`); integers in, integers out (floats
    in, floats out, exact while the sums stay below 2**53).

    Args:
        stage_flops: FLOPs of each stage, ``(E,)``.
        head_flops: FLOPs of each early head, ``(E-1,)``.
        active: indices of the early exits whose heads run (None: all).
    """
    on = None if active is None else {int(j) for j in active}
    heads = [f if on is None or j in on else 0 for j, f in enumerate(head_flops)] + [0]
    return [sum(stage_flops[: i + 1]) + sum(heads[: i + 1]) for i in range(len(stage_flops))]


@dataclasses.dataclass
class StageState:
    """The values alive at a cut, by node name, plus the input's spatial size.

    ``dims`` says how each value follows the batch (:mod:`mexify.graph.batching`); without it
    (bundles written before it was recorded) tensors whose first dimension equals the batch
    size are taken as batch-first.
    """

    values: Dict[str, Any]
    input_size: Tuple[int, int]
    batch_size: int
    dims: Optional[Dict[str, BatchDim]] = None

    def select(self, index: torch.Tensor) -> "StageState":
        """Keep batch rows ``index`` of every value that depends on the batch (the rest is shared)."""
        out = {}
        for k, v in self.values.items():
            dim = self.dims.get(k) if self.dims is not None else None
            if dim is not None:
                out[k] = shrink_value(v, dim, index)
            elif isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == self.batch_size:
                out[k] = v.index_select(0, index.to(v.device))
            else:
                out[k] = v
        return StageState(out, self.input_size, int(index.numel()), self.dims)

    @staticmethod
    def join(states: Sequence["StageState"]) -> "StageState":
        """The rows of several states at the same cut, in order, as one batch (the inverse of :meth:`select`).

        Raises:
            ValueError: no state, or states of different input sizes (values shared by the rows differ).
        """
        if not states:
            raise ValueError("nothing to join")
        first = states[0]
        if len(states) == 1:
            return first
        if any(s.input_size != first.input_size for s in states):
            raise ValueError(f"cannot join states of input sizes {sorted({s.input_size for s in states})}")
        sizes = [int(s.batch_size) for s in states]
        out = {}
        for k, v in first.values.items():
            parts = [s.values[k] for s in states]
            dim = first.dims.get(k) if first.dims is not None else None
            if dim is None:  # not recorded: batch-first tensors as in select
                dim = BatchDim("dim") if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == first.batch_size else BatchDim("none")
            out[k] = join_values(parts, dim, sizes)
        return StageState(out, first.input_size, sum(sizes), first.dims)


@dataclasses.dataclass
class ExitOutput:
    """What :meth:`MultiExitModel.iter_exits` yields after each stage."""

    index: int
    name: str
    logits: torch.Tensor
    features: Optional[torch.Tensor]
    state: StageState


class MultiExitModel(nn.Module):
    """Stages of a traced segmentation model with an exit head after each early stage.

    The last stage ends with the original model's output (the *final exit*), which
    conversion leaves unchanged. See ``docs/internals.md`` for the contract.
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        heads: Dict[str, ExitHead],
        num_classes: int,
        input_size: Tuple[int, int],
        stage_flops: Sequence[int],
        head_flops: Sequence[int],
        original_flops: int,
        batch_dims: Optional[Sequence[Optional[Dict[str, str]]]] = None,
        candidates: Optional[Dict[str, Sequence[nn.Module]]] = None,
        skips: Optional[Sequence[str]] = None,
        train_skips: Optional[Sequence[str]] = None,
    ):
        super().__init__()
        if len(heads) != len(stages) - 1:
            raise ValueError(f"{len(stages)} stages need {len(stages) - 1} heads, got {len(heads)}")
        self.stages = nn.ModuleList([s.module for s in stages])
        self.heads = nn.ModuleDict(heads)
        # head candidates per exit (convert --heads): each exit's head is one of its candidates (the
        # same module), stage 2 trains them all, calibrate --search keeps one
        self.candidates: Optional[nn.ModuleDict] = (
            nn.ModuleDict({k: nn.ModuleList(v) for k, v in candidates.items()}) if candidates else None
        )
        self._io = [(list(s.inputs), list(s.outputs), s.exit_value) for s in stages]
        # train-mode (inputs, outputs) of stages that carry a train-mode graph (see DualGraphModule)
        self._train_io = [s.train_io for s in stages]
        self.exit_names: List[str] = [s.exit_value for s in stages[:-1]] + ["final"]
        # per early exit, the value its fused heads read beside the exit's features ("" for none)
        self.skips: List[str] = list(skips) if skips else [""] * (len(stages) - 1)
        if len(self.skips) != len(stages) - 1:
            raise ValueError(f"{len(stages) - 1} early exits need {len(stages) - 1} skip names, got {len(self.skips)}")
        # their names in the train-mode graphs (train-only nodes shift fx's name counters)
        self._train_skips: List[str] = list(train_skips) if train_skips else list(self.skips)
        self.num_classes = int(num_classes)
        self.input_size = tuple(input_size)
        self.stage_flops = [int(f) for f in stage_flops]
        self.head_flops = [int(f) for f in head_flops]
        self.original_flops = int(original_flops)
        self.config = None
        self._backbone_frozen = False
        # why end-to-end training cannot run this model's own train mode ("" when it can): set by
        # conversion and loading, checked by the trainer before stage 1
        self.train_issue = ""
        # (H, W) when the graph was traced for that input size only (torch.export with a dynamic batch alone)
        self.static_size: Optional[Tuple[int, int]] = None
        if batch_dims is None:
            batch_dims = [s.batch_dims or None for s in stages[:-1]]
        self._batch_dims = [
            {k: BatchDim.parse(v) for k, v in d.items()} if d else None for d in list(batch_dims)[: len(stages) - 1]
        ] + [None]

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    # -- running one stage at a time -------------------------------------------------
    def start(self, x: torch.Tensor) -> StageState:
        """The state before stage 0.

        Raises:
            DataError: an input size the traced graph does not accept (see ``static_size``).
        """
        if self.static_size is not None and tuple(x.shape[-2:]) != tuple(self.static_size):
            h, w = self.static_size
            raise DataError(
                f"this bundle's graph accepts {h}x{w} inputs only (torch.export fixed its spatial sizes), got "
                f"{int(x.shape[-2])}x{int(x.shape[-1])}",
                f"resize the images to {h}x{w} (e.g. mexify predict --size {h}x{w}, or base_size={h}x{w} in the dataset spec)",
            )
        return StageState({self._io[0][0][0]: x}, (int(x.shape[-2]), int(x.shape[-1])), int(x.shape[0]))

    def stage_io(self, i: int) -> Tuple[List[str], List[str], Optional[str]]:
        """Stage ``i``'s eval-mode graph interface: the names of its input and output values, and the value
        its exit point is (the early exits' features)."""
        inputs, outputs, exit_value = self._io[i]
        return list(inputs), list(outputs), exit_value

    def stage_batch_dims(self, i: int) -> Dict[str, BatchDim]:
        """How each value alive after stage ``i`` follows the batch (empty: not recorded, tensors sliced along dim 0)."""
        return dict(self._batch_dims[i] or {})

    def _in_train_graph(self, i: int) -> bool:
        """Whether stage ``i`` runs its train-mode graph (whose values may carry other names)."""
        return self._train_io[i] is not None and self.stages[i].training

    def _stage_io(self, i: int) -> Tuple[List[str], List[str]]:
        """Stage ``i``'s (inputs, outputs) in the mode its graph is in."""
        if self._in_train_graph(i):
            return self._train_io[i]
        return self._io[i][0], self._io[i][1]

    def run_stage(self, i: int, state: StageState) -> StageState:
        """Run stage ``i`` on ``state``; returns the state after it."""
        inputs, outputs = self._stage_io(i)
        result = self.stages[i](*[state.values[n] for n in inputs])
        if i == len(self.stages) - 1:
            return StageState({outputs[0]: result}, state.input_size, state.batch_size)
        return StageState(dict(zip(outputs, result)), state.input_size, state.batch_size, self._batch_dims[i])

    def exit_features(self, i: int, state: StageState) -> torch.Tensor:
        """The feature map at exit point ``i`` (after :meth:`run_stage` ``i``)."""
        return state.values[self._io[i][2]] if i < len(self.stages) - 1 else state.values[self._stage_io(i)[1][0]]

    def head_inputs(self, i: int, state: StageState) -> Tuple[torch.Tensor, ...]:
        """What early exit ``i``'s heads read from ``state``: ``(features,)``, or ``(features, skip)`` where the
        exit has a skip feature (a plain head among the candidates ignores it)."""
        skip = (self._train_skips if self._in_train_graph(i) else self.skips)[i]
        values = [self.exit_features(i, state)] + ([state.values[skip]] if skip else [])
        # the next stage may change these values in place (an in-place activation); when gradients are on the
        # head keeps its own copy so that its backward (even with a frozen backbone: its weights' gradients
        # read its input) still finds the values it saw
        grad = torch.is_grad_enabled()
        return tuple(v.clone() if grad else v for v in values)

    def exit_logits(self, i: int, state: StageState, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Logits of exit ``i``: the head's at its resolution (its finest input's), or the model output for the final exit.

        With ``size``, resized to it (bilinear; training takes its losses at the input size).
        """
        if i == len(self.stages) - 1:
            out = state.values[self._stage_io(i)[1][0]]
            return out if size is None else resize_logits(out, size)
        return run_head(self.heads[self.exit_names[i]], self.head_inputs(i, state), size)

    def iter_exits(self, x: torch.Tensor, with_logits: bool = True) -> Iterator[ExitOutput]:
        """Yield each exit lazily (logits at each exit's own resolution): the next stage runs only when asked."""
        state = self.start(x)
        for i in range(len(self.stages)):
            state = self.run_stage(i, state)
            features = self.exit_features(i, state) if i < len(self.stages) - 1 else None
            logits = self.exit_logits(i, state) if with_logits or i == len(self.stages) - 1 else None
            yield ExitOutput(i, self.exit_names[i], logits, features, state)

    # -- whole-model views -------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Final exit logits: the original model's output."""
        state = self.start(x)
        for i in range(len(self.stages)):
            state = self.run_stage(i, state)
        return self.exit_logits(len(self.stages) - 1, state)

    def forward_all(self, x: torch.Tensor, upsample: bool = True) -> List[torch.Tensor]:
        """Logits of every exit, final last: early exits at the input resolution (training and
        evaluation), or with ``upsample=False`` at their own (what policies score)."""
        state, outs = self.start(x), []
        last = len(self.stages) - 1
        for i in range(len(self.stages)):
            state = self.run_stage(i, state)
            # the final exit is the original output, left as the model made it
            outs.append(self.exit_logits(i, state, state.input_size if upsample and i < last else None))
        return outs

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Feature maps at every early exit point (the final stage is not run)."""
        state, feats = self.start(x), []
        for i in range(len(self.stages) - 1):
            state = self.run_stage(i, state)
            feats.append(self.exit_features(i, state))
        return feats

    # -- costs -------------------------------------------------------------------------
    def cost_to_exit(self, i: int) -> int:
        """FLOPs to reach exit ``i``: stages 0..i plus every early head evaluated on the way (:func:`exit_flops`)."""
        return exit_flops(self.stage_flops, self.head_flops)[i]

    # -- training helpers --------------------------------------------------------------
    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.stages.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The early heads' parameters, every head candidate's included (each once)."""
        seen = set()
        for module in (self.heads, self.candidates):
            for p in module.parameters() if module is not None else ():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def freeze_backbone(self, frozen: bool = True) -> "MultiExitModel":
        """Freeze (or unfreeze) the stages: no gradients, BatchNorm statistics kept in eval mode."""
        self._backbone_frozen = frozen
        for p in self.stages.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> "MultiExitModel":
        super().train(mode)
        if self._backbone_frozen:
            self.stages.eval()
        return self

    def extra_repr(self) -> str:
        return f"exits={self.exit_names}, num_classes={self.num_classes}"
