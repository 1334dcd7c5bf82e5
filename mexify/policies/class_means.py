"""Training-free exits from class means (E2CM, Gormez & Koyuncu), per pixel.

One pass over labelled data stores, at every early exit point ``j``, the mean feature
``c_j^k`` of each class (labels resized to the feature map, nearest). At run time, for
each pixel feature ``f``::

    d_k   = ||f - c_j^k||_2 / s_j^k            s_j^k = RMS distance of all fit pixels to c_j^k (Eq. 4)
    P     = softmax(-sharpness * d)             kernel "neg" (default)
          | softmax(1 / d)                      kernel "inv" (the paper's softmax(-1/d) with the
                                                sign that makes near means likely)

The class scores are upsampled bilinearly to the input size; the image confidence is
the mean top-1 probability and the image exits when it reaches ``t_j``. The exit heads
are never used, so this works on a converted bundle whose heads were never trained.
The final exit is the model's own output.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from mexify.errors import ConfigError, DataError
from mexify.policies.base import Policy, decode_array, encode_array, register_policy

log = logging.getLogger(__name__)



@register_policy("class-means")
class ClassMeansPolicy(Policy):
    """Nearest-class-mean probabilities from exit-point features; mean top-1 vs the exit threshold."""

    needs_features = True
    _params = ("kernel", "sharpness")

    def __init__(self, kernel: str = "neg", sharpness: float = 10.0, means=None, scales=None, **kw: Any):
        super().__init__(**kw)
        if kernel not in ("neg", "inv"):
            raise ConfigError(f"class-means kernel must be 'neg' or 'inv', got {kernel!r}", "use kernel=neg")
        self.kernel = kernel
        self.sharpness = float(sharpness)
        self.means: Optional[List[np.ndarray]] = None if means is None else [np.asarray(m, np.float32) for m in means]
        self.scales: Optional[List[np.ndarray]] = None if scales is None else [np.asarray(s, np.float32) for s in scales]

    # ----------------------------------------------------------------- fitting
    @torch.no_grad()
    def collect_means(
        self, model: Any, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], num_classes: int, device: Any = None
    ) -> "ClassMeansPolicy":
        """One pass of ``model.forward_features`` over labelled batches; returns a copy with class means.

        Raises:
            DataError: when no labelled pixel was seen.
        """
        sums: List[torch.Tensor] = []
        counts: List[torch.Tensor] = []
        sq: List[float] = []
        tot: List[torch.Tensor] = []
        npix: List[int] = []
        k = int(num_classes)
        for x, y in batches:
            if device is not None:
                x, y = x.to(device), y.to(device)
            feats = model.forward_features(x)
            for j, f in enumerate(feats):
                f = f.float()
                yl = F.interpolate(y[:, None].float(), size=f.shape[-2:], mode="nearest")[:, 0].long()
                valid = (yl >= 0) & (yl < k)
                fv = f.permute(0, 2, 3, 1)[valid].double()  # (P, C)
                lv = yl[valid]
                if len(sums) <= j:
                    c = f.shape[1]
                    sums.append(torch.zeros(k, c, dtype=torch.float64, device=f.device))
                    counts.append(torch.zeros(k, dtype=torch.float64, device=f.device))
                    tot.append(torch.zeros(c, dtype=torch.float64, device=f.device))
                    sq.append(0.0)
                    npix.append(0)
                sums[j].index_add_(0, lv, fv)
                counts[j] += torch.bincount(lv, minlength=k).double()
                tot[j] += fv.sum(0)
                sq[j] += float((fv * fv).sum())
                npix[j] += int(fv.shape[0])
        if not sums or sum(npix) == 0:
            raise DataError("class-means saw no labelled pixel", "pass a labelled split (e.g. --means-split train)")
        p = self._copy()
        p.means, p.scales = [], []
        for j in range(len(sums)):
            cnt = counts[j]
            mean = sums[j] / cnt.clamp_min(1)[:, None]
            n = max(npix[j], 1)
            ef2 = sq[j] / n
            ef = tot[j] / n
            ms = (ef2 - 2 * (mean @ ef) + (mean * mean).sum(1)).clamp_min(1e-12)
            # classes never seen get an infinitely far mean
            mean[cnt == 0] = float("nan")
            p.means.append(mean.float().cpu().numpy())
            p.scales.append(ms.sqrt().float().cpu().numpy())
            missing = int((cnt == 0).sum())
            if missing:
                log.info("class-means: exit %d has no pixel of %d classes; they are never predicted there", j, missing)
        return p

    def _copy(self) -> "ClassMeansPolicy":
        import copy

        return copy.deepcopy(self)

    def _fit_params(self, cache: Any) -> "ClassMeansPolicy":
        if self.means is None:
            raise ConfigError("class-means has no class means", "calibrate collects them; call collect_means(model, batches, K) first")
        if getattr(cache, "source", None) != "class-means":
            raise ConfigError("class-means needs an exit cache collected with its own probabilities", "collect the cache with source=this policy")
        return super()._fit_params(cache)

    # ---------------------------------------------------------------- run time
    def class_scores(self, exit_index: int, features: torch.Tensor) -> torch.Tensor:
        """Unnormalised class scores ``(N, K, h, w)`` at feature resolution."""
        if self.means is None:
            raise ConfigError("class-means has no class means", "fit it with `mexify calibrate --policy class-means`")
        mean = self._on_device(("means", exit_index), features.device)
        scale = self._on_device(("scales", exit_index), features.device)
        f = features.float()
        n, c, h, w = f.shape
        fl = f.permute(0, 2, 3, 1).reshape(-1, c)
        seen = ~torch.isnan(mean[:, 0])
        m = torch.where(seen[:, None], mean, torch.zeros_like(mean))
        d2 = (fl * fl).sum(1, keepdim=True) - 2 * fl @ m.t() + (m * m).sum(1)[None]
        d = d2.clamp_min(0).sqrt() / scale[None]
        if self.kernel == "neg":
            z = -self.sharpness * d
        else:
            z = 1.0 / d.clamp_min(1e-6)
        z = torch.where(seen[None], z, torch.full_like(z, -1e9))
        return z.reshape(n, h, w, -1).permute(0, 3, 1, 2)

    def probabilities(self, exit_index: int, logits: torch.Tensor, features: Optional[torch.Tensor] = None) -> torch.Tensor:
        n_early = len(self.means) if self.means is not None else 0
        if exit_index >= n_early:
            return super().probabilities(exit_index, logits, features)
        if features is None:
            raise ConfigError("class-means needs the exit-point features", "call decide(i, logits, features)")
        z = self.class_scores(exit_index, features)
        z = F.interpolate(z, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return torch.softmax(z, dim=1)

    def mask_scores(self, exit_index: int, logits: torch.Tensor, features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Early exits: the class scores (their argmax after resizing is the mask); the final exit: its logits."""
        n_early = len(self.means) if self.means is not None else 0
        if exit_index >= n_early or features is None:
            return logits
        return self.class_scores(exit_index, features)

    def _scores_from_probs(self, exit_index: int, probs: torch.Tensor) -> torch.Tensor:
        return probs.max(dim=1).values.flatten(1).double().mean(1).float()

    def cache_scores(self, cache: Any) -> np.ndarray:
        return cache.mean_maxprob[:, :-1].astype(np.float32).astype(np.float64)

    # -------------------------------------------------------------- (de)serialise
    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        if self.means is not None:
            d["means"] = [encode_array(m) for m in self.means]
            d["scales"] = [encode_array(s) for s in self.scales]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ClassMeansPolicy":
        p = super().from_dict(d)
        if d.get("means") is not None:
            p.means = [decode_array(m) for m in d["means"]]
            p.scales = [decode_array(s) for s in d["scales"]]
        return p
