"""Temperature scaling: one softmax temperature per exit, fitted on labelled pixels."""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mexify.data import unpadded
from mexify.graph.modes import training_mode

log = logging.getLogger(__name__)

__all__ = ["fit_temperatures"]

Progress = Optional[Any]


@torch.no_grad()
def fit_temperatures(
    model: Any,
    batches: Iterable[Any],
    pixels_per_image: int = 4096,
    grid: Optional[Sequence[float]] = None,
    device: Any = None,
    total: Optional[int] = None,
    progress: Progress = None,
) -> Optional[List[float]]:
    """Per-exit temperature minimising pixel NLL on labelled pixels (one pass).

    A random subset of labelled pixels per image is scored on a log-spaced grid of
    temperatures, refined by a parabola through the best grid point and its neighbours.

    Returns:
        one temperature per exit (final included), or None when no pixel is labelled.
    """
    grid_t = torch.tensor(grid if grid is not None else np.logspace(-1.0, 1.0, 41), dtype=torch.float64)
    nll: Optional[torch.Tensor] = None
    gen = torch.Generator().manual_seed(0)
    done = 0
    with training_mode(model, False):
        for x, y in unpadded(batches):
            if y is None:
                continue
            if device is not None:
                x, y = x.to(device), y.to(device)
            logits = list(model.forward_all(x))
            k = logits[0].shape[1]
            valid = ((y >= 0) & (y < k)).flatten(1)
            picks = []
            for n in range(y.shape[0]):
                idx = valid[n].nonzero().flatten()
                if idx.numel() > pixels_per_image:
                    idx = idx[torch.randperm(idx.numel(), generator=gen)[:pixels_per_image].to(idx.device)]
                picks.append((n, idx))
            if nll is None:
                nll = torch.zeros(len(logits), len(grid_t), dtype=torch.float64)
            tgt = torch.cat([y[n].flatten()[idx] for n, idx in picks])
            if tgt.numel() == 0:
                continue
            for i, z in enumerate(logits):
                if z.shape[-2:] != y.shape[-2:]:
                    z = F.interpolate(z.float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
                zz = torch.cat([z[n].flatten(1)[:, idx].t() for n, idx in picks]).double()  # (P, K)
                # all temperatures at once: sum_p logsumexp(z_p / T) - z_p,y / T
                zt = zz[None] / grid_t.to(zz.device)[:, None, None]  # (G, P, K)
                picked = zt.gather(2, tgt.view(1, -1, 1).expand(len(grid_t), -1, 1)).squeeze(2)
                nll[i] += (torch.logsumexp(zt, dim=2) - picked).sum(1).cpu()
            done += 1
            if progress is not None:
                progress("temperature", done, total or done)
    if nll is None or not bool((nll > 0).any()):
        log.warning("temperature scaling skipped: no labelled pixel")
        return None
    temps = []
    lg = torch.log(grid_t)
    for row in nll:
        j = int(row.argmin())
        t = float(lg[j])
        if 0 < j < len(row) - 1:
            y0, y1, y2 = float(row[j - 1]), float(row[j]), float(row[j + 1])
            den = y0 - 2 * y1 + y2
            if den > 0:
                h = float(lg[j + 1] - lg[j])
                t = t + 0.5 * h * (y0 - y2) / den
        temps.append(float(math.exp(t)))
    log.info("temperatures: %s", ", ".join(f"{t:.3f}" for t in temps))
    return temps
