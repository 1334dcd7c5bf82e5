"""A learned exit (the thesis's auxiliary network): a tiny MLP per exit predicts whether leaving is good enough.

Features of an image at an exit, all from its own output map (what the exit cache keeps, so the
cache and the run time compute the same numbers):

* the mean top-1 probability and the mean pixel entropy divided by ``log K``;
* the share of pixels in 8 confidence groups (top-1 probability from 0, .5, .6, .7, .8, .9, .95, .99);
* ``-log`` of the top-1 map's FFT energy in each band of :data:`mexify.policies.fft.BANDS`.

Target (calibration labels; the final exit's predictions when there are none): the image's mIoU
at the final exit exceeds its mIoU at this exit by at most ``tolerance`` points (the calibration's
``max_drop``, else 1 point). Per exit, features are standardised and a 16-unit tanh MLP is trained
full-batch (Adam, class-balanced logistic loss, weight decay, fixed seed). The image's confidence is
the predicted probability that leaving is good enough; thresholds are searched on it like any other
score. Agreement with the previous exit is not a feature: at run time it would need the previous
exit's head even when the policy never takes that exit.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from mexify.errors import ConfigError
from mexify.policies.base import NUM_BINS, PROB_EDGES, Policy, PolicyFit, decode_array, encode_array, prob_bins, register_policy
from mexify.policies.entropy import mean_entropy
from mexify.policies.fft import BANDS, band_energy

__all__ = ["LearnedPolicy", "exit_features", "NUM_FEATURES"]

GROUP_EDGES = np.array([0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99], dtype=np.float32)
NUM_FEATURES = 2 + len(GROUP_EDGES) + len(BANDS)
HIDDEN = 16

# which confidence group each probability bin of PROB_EDGES falls in, as a (bins, groups) 0/1 matrix
_GROUP_OF_BIN = np.searchsorted(GROUP_EDGES, PROB_EDGES, side="right") - 1
_GROUPS = torch.from_numpy(np.eye(len(GROUP_EDGES))[_GROUP_OF_BIN])


def exit_features(counts: torch.Tensor, pixels: torch.Tensor, maxprob: torch.Tensor, entropy: torch.Tensor,
                  energy: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(N, NUM_FEATURES)`` float64 from per-image pixel counts per probability bin ``(N, bins)``, pixels
    ``(N,)``, mean top-1 probability and entropy ``(N,)`` and FFT band energies ``(N, bands)``."""
    groups = counts.to(torch.float64) @ _GROUPS.to(counts.device)  # sums of integers: exact
    share = groups / pixels.to(torch.float64)[:, None]
    ent = entropy.to(torch.float64) / math.log(max(num_classes, 2))
    return torch.cat([maxprob.to(torch.float64)[:, None], ent[:, None], share, -torch.log(energy.to(torch.float64) + 1e-12)], 1)


def _mlp(x: torch.Tensor, w: List[torch.Tensor]) -> torch.Tensor:
    """Logit of "good enough" for standardised features ``x``."""
    w1, b1, w2, b2 = w
    return torch.tanh(x @ w1 + b1) @ w2 + b2


def _train(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 300) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(x.shape[1], HIDDEN, generator=g, dtype=torch.float64) / math.sqrt(x.shape[1]),
         torch.zeros(HIDDEN, dtype=torch.float64), torch.randn(HIDDEN, generator=g, dtype=torch.float64) / math.sqrt(HIDDEN),
         torch.zeros((), dtype=torch.float64)]
    for t in w:
        t.requires_grad_(True)
    pos = float(y.sum())
    weight = torch.where(y > 0, (len(y) - pos) / max(pos, 1.0), 1.0)  # balance good and bad images
    opt = torch.optim.Adam(w, lr=0.03, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(_mlp(x, w), y, weight=weight)
            loss.backward()
            opt.step()
    return [t.detach().to(torch.float32) for t in w]  # stored as float32, used as float64


@register_policy("learned")
class LearnedPolicy(Policy):
    """Per-exit MLP over confidence, entropy, confidence-histogram and FFT features."""

    _params = ("tolerance",)
    learns_scores = True

    def __init__(self, tolerance: Optional[float] = None, nets: Optional[List[Dict[str, Any]]] = None, **kw: Any):
        super().__init__(**kw)
        self.tolerance = None if tolerance is None else float(tolerance)
        self.nets: Optional[List[Dict[str, np.ndarray]]] = None
        if nets is not None:
            self.nets = [{k: decode_array(v) for k, v in n.items()} for n in nets]

    # ------------------------------------------------------------------ fitting
    def fit_search(self, cache: Any, **search: Any) -> PolicyFit:
        if getattr(cache, "fft_energy", None) is None:
            raise ConfigError("this exit cache has no FFT energies (made by an older mexify)", "collect it again (mexify calibrate)")
        trial = copy.deepcopy(self)
        if trial.tolerance is None:
            trial.tolerance = float(search["max_drop"]) if search.get("max_drop") is not None else 1.0
        return Policy.fit_search(trial, cache, **search)

    def _fit_params(self, cache: Any) -> "LearnedPolicy":
        p = super()._fit_params(cache)
        feats = self._cache_features(cache)  # (N, E-1, F)
        per_image = cache.per_image_miou()  # (N, E), on labels (or agreement with the final exit)
        keep = torch.from_numpy(~np.isnan(per_image[:, -1]))  # an image without a labelled pixel (NaN) teaches nothing
        nets = []
        for i in range(cache.num_exits - 1):
            x = feats[keep, i]
            mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
            good = torch.from_numpy(per_image[:, -1] - per_image[:, i] <= p.tolerance)[keep].to(torch.float64)
            w = _train((x - mean) / std, good, seed=i)
            nets.append({"mean": mean.float().numpy(), "std": std.float().numpy(), "w1": w[0].numpy(), "b1": w[1].numpy(),
                         "w2": w[2].numpy(), "b2": w[3].reshape(1).numpy()})
        p.nets = nets
        return p

    # ---------------------------------------------------------------- features
    @staticmethod
    def _cache_features(cache: Any) -> torch.Tensor:
        counts = torch.from_numpy(cache.class_hist.sum(2, dtype=np.int64))  # (N, E, B)
        pixels = torch.from_numpy(cache.exit_pixels())
        n, e = pixels.shape
        flat = exit_features(counts.reshape(n * e, -1), pixels.reshape(-1), torch.from_numpy(cache.mean_maxprob).reshape(-1),
                             torch.from_numpy(cache.mean_entropy).reshape(-1),
                             torch.from_numpy(cache.fft_energy).reshape(n * e, -1), cache.num_classes)
        return flat.reshape(n, e, -1)[:, :-1]

    def _score(self, exit_index: int, feats: torch.Tensor) -> torch.Tensor:
        if self.nets is None:
            raise ConfigError("the learned policy is not fitted", "fit it with `mexify calibrate --policy learned`")
        net = {k: torch.from_numpy(np.asarray(v)).to(feats.device, torch.float64) for k, v in self.nets[exit_index].items()}
        x = (feats - net["mean"]) / net["std"]
        return torch.sigmoid(_mlp(x, [net["w1"], net["b1"], net["w2"], net["b2"][0]]))

    def _scores_from_probs(self, exit_index: int, probs: torch.Tensor) -> torch.Tensor:
        top1 = probs.max(dim=1).values
        n = top1.shape[0]
        bins = prob_bins(top1).flatten(1)
        # pixels per bin (exact integers; scatter_add rather than bincount, which ONNX lacks)
        counts = torch.zeros(n, NUM_BINS, dtype=torch.float64, device=bins.device).scatter_add_(
            1, bins, torch.ones(bins.shape, dtype=torch.float64, device=bins.device))
        pixels = torch.full((n,), float(top1[0].numel()), dtype=torch.float64, device=top1.device)
        feats = exit_features(counts, pixels, top1.flatten(1).double().mean(1), mean_entropy(probs), band_energy(top1), probs.shape[1])
        return self._score(exit_index, feats).float()

    def cache_scores(self, cache: Any) -> np.ndarray:
        feats = self._cache_features(cache)
        scores = torch.stack([self._score(i, feats[:, i]) for i in range(feats.shape[1])], 1)
        return scores.float().double().numpy()

    # -------------------------------------------------------------- (de)serialise
    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        if self.nets is not None:
            d["nets"] = [{k: encode_array(v) for k, v in n.items()} for n in self.nets]
        return d

    @classmethod
    def _params_from_dict(cls, d: Dict[str, Any]) -> Dict[str, Any]:
        out = super()._params_from_dict(d)
        if d.get("nets") is not None:
            out["nets"] = d["nets"]
        return out
