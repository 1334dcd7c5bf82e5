"""Tiny stand-ins for a MultiExitModel, for policy and calibration tests."""
from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ExitOutput = namedtuple("ExitOutput", "index name logits features state")


class NoisyExits(nn.Module):
    """Exits see the true label (channel 0 of the input) through less noise the later they are.

    Channel 1 holds per-pixel noise scaled by the image's difficulty, so easy images are
    answered well by early exits and hard ones only by the last: what a policy must learn.
    Costs follow the MultiExitModel contract (stages plus every head on the way).
    """

    def __init__(self, num_classes: int = 4, num_exits: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self.exit_names = [f"layer{i}" for i in range(num_exits - 1)] + ["final"]
        self.noise = nn.Parameter(torch.randn(num_exits, num_classes, generator=g), requires_grad=False)
        self.noise_scale = [3.0 * (num_exits - 1 - i) / max(num_exits - 1, 1) + 0.2 for i in range(num_exits)]
        self.stage_flops = [100 * (i + 1) for i in range(num_exits)]
        self.head_flops = [10] * (num_exits - 1)
        self.original_flops = sum(self.stage_flops)
        self.input_size = (16, 16)
        self.calls = 0

    def cost_to_exit(self, i: int) -> int:
        return sum(self.stage_flops[: i + 1]) + sum(self.head_flops[: min(i + 1, len(self.head_flops))])

    def _logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        y = x[:, 0].long().clamp(0, self.num_classes - 1)
        onehot = F.one_hot(y, self.num_classes).permute(0, 3, 1, 2).float() * 4.0
        noise = x[:, 1:2] * self.noise[i].view(1, -1, 1, 1) * self.noise_scale[i]
        return onehot + noise

    def forward_all(self, x):
        self.calls += 1
        return [self._logits(i, x) for i in range(len(self.exit_names))]

    def forward(self, x):
        return self._logits(len(self.exit_names) - 1, x)

    def forward_features(self, x):
        y = x[:, 0].long().clamp(0, self.num_classes - 1)
        onehot = F.one_hot(y, self.num_classes).permute(0, 3, 1, 2).float()
        feats = []
        for i in range(len(self.exit_names) - 1):
            f = torch.cat([onehot, x[:, 1:2] * self.noise_scale[i]], 1)
            feats.append(F.avg_pool2d(f, 2))
        return feats

    def iter_exits(self, x):
        logits = self.forward_all(x)
        feats = self.forward_features(x) + [None]
        for i, (z, f) in enumerate(zip(logits, feats)):
            yield ExitOutput(i, self.exit_names[i], z, f, None)


def make_scenes(n: int = 24, num_classes: int = 4, size: int = 16, seed: int = 0, labelled: bool = True):
    """(image, mask) pairs: blocky label maps, noise amplitude from easy to hard."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        coarse = torch.randint(0, num_classes, (1, 1, 4, 4), generator=g).float()
        y = F.interpolate(coarse, size=(size, size), mode="nearest")[0, 0].long()
        difficulty = (i % 6) / 5.0
        noise = torch.randn(size, size, generator=g) * difficulty
        x = torch.stack([y.float(), noise, torch.zeros(size, size)])
        mask = y.clone() if labelled else torch.full_like(y, 255)
        out.append((x, mask))
    return out
