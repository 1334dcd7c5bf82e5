"""What the runtime returns: one :class:`Prediction` per image, or a :class:`BatchPrediction`."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List

import torch

__all__ = ["Prediction", "BatchPrediction"]


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image's result.

    Attributes:
        mask: predicted labels ``(H, W)`` int64 at the input's resolution.
        exit_index: exit taken (0 = shallowest; ``num_exits - 1`` is the final exit).
        exit_name: that exit's name (fx node name, or ``final``).
        confidence: the policy's image confidence at the exit taken.
        flops: FLOPs spent on the image at the bundle's input size (stages run plus heads evaluated).
    """

    mask: torch.Tensor
    exit_index: int
    exit_name: str
    confidence: float
    flops: int

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready fields (without the mask)."""
        return {
            "exit": self.exit_index,
            "exit_name": self.exit_name,
            "confidence": None if not math.isfinite(self.confidence) else float(self.confidence),
            "flops": int(self.flops),
        }


@dataclasses.dataclass
class BatchPrediction:
    """A batch's results as tensors, in input order.

    Attributes:
        masks: ``(N, H, W)`` int64 on the device the model ran on.
        exit_index: ``(N,)`` int64 (CPU).
        confidence: ``(N,)`` float32 (CPU).
        flops: ``(N,)`` int64 (CPU).
        exit_names: names of all exits of the model.
    """

    masks: torch.Tensor
    exit_index: torch.Tensor
    confidence: torch.Tensor
    flops: torch.Tensor
    exit_names: List[str]

    def __len__(self) -> int:
        return int(self.exit_index.numel())

    def __getitem__(self, i: int) -> Prediction:
        e = int(self.exit_index[i])
        return Prediction(self.masks[i], e, self.exit_names[e], float(self.confidence[i]), int(self.flops[i]))

    def to_list(self) -> List[Prediction]:
        return [self[i] for i in range(len(self))]
