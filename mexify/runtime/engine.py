"""Early-exit inference: run stage by stage, stop as soon as the policy says so.

:class:`EarlyExitRuntime` runs a :class:`~mexify.nn.MultiExitModel` one stage at a time.
After each stage whose exit the policy may take, it evaluates that exit's head on the
samples still in the batch and asks ``policy.decide``; samples that exit leave the batch
(``StageState.select``) and the rest go on, so later stages really run on fewer samples,
and not at all once every sample has exited. Results are scattered back in input order.

Costs are counted in FLOPs at the bundle's profiling input size (1 multiply-add = 1 FLOP):
the stages run plus the heads evaluated on the way. Heads of exits the policy can never
take (a threshold of ``inf``) are not evaluated and not counted, so the figure can be
below ``model.cost_to_exit``.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch

from mexify.errors import DataError
from mexify.nn import module_device, resize_logits
from mexify.runtime.policy import FixedExit, active_exits, resolve_policy
from mexify.runtime.results import BatchPrediction, Prediction

__all__ = ["EarlyExitRuntime", "predict", "labels_of"]


def labels_of(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(1)``: ``max(1).indices`` gives the same (first) index, but argmax over the
    channel dim of an NCHW tensor takes a slow strided path on CPU (about 15x at 8x128x128)."""
    return scores.max(1).indices


class EarlyExitRuntime:
    """Early-exit inference with batch shrinking.

    Args:
        model: a :class:`~mexify.model.MultiExitModel`.
        policy: see :func:`resolve_policy` (default: the bundle's policy).
        exit: force every image to one exit instead (index or name).

    Example::

        rt = EarlyExitRuntime(mexify.load("model.mex"))
        for p in rt.predict(images):      # images (N, 3, H, W), normalised
            print(p.exit_name, p.confidence, p.mask.shape)
    """

    def __init__(self, model: Any, policy: Any = None, exit: Union[int, str, None] = None):
        self.model = model
        self.policy = resolve_policy(model, policy, exit)
        e = model.num_exits
        self.active = active_exits(self.policy, e)
        self.needs_features = bool(getattr(self.policy, "needs_features", False))
        # FLOPs to leave at exit i: stages 0..i plus the heads evaluated on the way
        heads = [model.head_flops[j] if j in self.active else 0 for j in range(e - 1)] + [0]
        self.exit_flops = [int(sum(model.stage_flops[: i + 1]) + sum(heads[: i + 1])) for i in range(e)]

    @property
    def exit_names(self) -> List[str]:
        return list(self.model.exit_names)

    def _masks(self, i: int, logits: torch.Tensor, feats: Optional[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        """Masks of the images that leave at exit ``i``: the only place an exit's output is resized."""
        mask_scores = getattr(self.policy, "mask_scores", None)
        scores = mask_scores(i, logits, feats) if mask_scores is not None else logits
        return labels_of(resize_logits(scores, size))

    @torch.no_grad()
    def predict_batch(self, x: torch.Tensor) -> BatchPrediction:
        """Run a batch ``(N, 3, H, W)`` with early exits; results in input order.

        Raises:
            DataError: ``x`` is not a 4-D batch.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"predict expects images (N, 3, H, W), got {shape}", "add a batch dimension with x.unsqueeze(0)")
        model = self.model
        if not model.training:  # toggling every submodule's mode costs more than a small stage
            return self._run(x.to(self._device(), non_blocking=True))
        model.eval()
        try:
            return self._run(x.to(self._device(), non_blocking=True))
        finally:
            model.train(True)

    def _device(self) -> torch.device:
        return module_device(self.model)

    def _run(self, x: torch.Tensor) -> BatchPrediction:
        model, policy = self.model, self.policy
        n, e = int(x.shape[0]), model.num_exits
        size = (int(x.shape[-2]), int(x.shape[-1]))
        dev = x.device
        masks = torch.zeros((n, *size), dtype=torch.long, device=dev)
        exit_index = torch.full((n,), e - 1, dtype=torch.long, device=dev)
        confidence = torch.full((n,), float("nan"), dtype=torch.float32, device=dev)
        alive = torch.arange(n, device=dev)  # input rows still in the batch
        active = set(self.active)
        state = model.start(x)
        for i in range(e):
            if alive.numel() == 0:
                break
            state = model.run_stage(i, state)
            if i not in active:
                continue
            last = i == e - 1
            feats = model.exit_features(i, state) if self.needs_features and not last else None
            logits = model.exit_logits(i, state)
            go, conf = policy.decide(i, logits, feats)
            go = go.to(device=dev, dtype=torch.bool).reshape(-1)
            if last:
                go = torch.ones_like(go)
            leave = go.nonzero().squeeze(1)
            n_leave = int(leave.numel())  # one device sync per exit
            if n_leave:
                rows = alive.index_select(0, leave)
                sub_feats = feats.index_select(0, leave) if feats is not None else None
                masks.index_copy_(0, rows, self._masks(i, logits.index_select(0, leave), sub_feats, size))
                exit_index.index_fill_(0, rows, i)
                confidence.index_copy_(0, rows, conf.reshape(-1).to(dev, torch.float32).index_select(0, leave))
            if n_leave == alive.numel():
                break
            if n_leave:
                stay = (~go).nonzero().squeeze(1)
                state = state.select(stay)
                alive = alive.index_select(0, stay)
        idx = exit_index.cpu()
        flops = torch.tensor(self.exit_flops, dtype=torch.long)[idx]
        return BatchPrediction(masks, idx, confidence.cpu(), flops, self.exit_names)

    def predict(self, x: torch.Tensor) -> List[Prediction]:
        """Run a batch ``(N, 3, H, W)``; one :class:`Prediction` per image, in input order."""
        return self.predict_batch(x).to_list()

    __call__ = predict


def predict(model: Any, x: torch.Tensor, policy: Any = None, exit: Union[int, str, None] = None) -> List[Prediction]:
    """Early-exit predictions for a batch ``(N, 3, H, W)`` (see :class:`EarlyExitRuntime`).

    Args:
        model: a :class:`~mexify.model.MultiExitModel`.
        x: normalised images.
        policy: a policy object or dict; default the bundle's policy.
        exit: force every image to one exit (index or name) instead.

    Raises:
        ConfigError: no policy (and no ``exit``), or a policy fitted for other exits.
    """
    return EarlyExitRuntime(model, policy, exit).predict(x)
