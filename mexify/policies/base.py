"""The policy interface, the registry and the pixel arithmetic policies share.

A policy reduces an exit's output to one confidence per image and exits when it
reaches the exit's threshold. Thresholds are searched on an exit cache (see
:mod:`mexify.calibrate`), so every score a policy computes at run time must be
reproducible from the cache's statistics; the shared pieces below (probability
bins, boundary mask) are what keeps the two in step.
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import math
import typing
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
import torch.nn.functional as F

from mexify.config import coerce, parse_assignment
from mexify.errors import ConfigError, nearest

__all__ = [
    "Policy",
    "PolicyFit",
    "register_policy",
    "build_policy",
    "policy_class",
    "policy_options",
    "available_policies",
    "policy_from_dict",
    "PROB_EDGES",
    "prob_bins",
    "snap_to_edge",
    "boundary_mask",
    "encode_array",
    "decode_array",
]

_REGISTRY: Dict[str, Type["Policy"]] = {}


def _make_edges() -> np.ndarray:
    """Lower bin edges for top-1 probabilities: coarse below 0.9, log-spaced in 1-p above.

    Confident pixels matter most (ADP-C freezes pixels at 0.998), so the bins get
    finer as p approaches 1: 12 bins on [0, 0.6), 30 on [0.6, 0.9) and 48 log-spaced
    from 0.9 to 0.99999, then one bin for [0.99999, 1].
    """
    low = np.linspace(0.0, 0.6, 13)[:-1]
    mid = np.linspace(0.6, 0.9, 31)[:-1]
    high = 1.0 - np.logspace(-1, -5, 49)
    return np.concatenate([low, mid, high]).astype(np.float32)


#: Lower edges of the probability bins the exit cache counts pixels in (float32, ascending).
PROB_EDGES: np.ndarray = _make_edges()
NUM_BINS: int = len(PROB_EDGES)
_EDGES_T = torch.from_numpy(PROB_EDGES)


def prob_bins(p: torch.Tensor) -> torch.Tensor:
    """Bin index of each probability: the largest ``b`` with ``PROB_EDGES[b] <= p``."""
    edges = _EDGES_T.to(p.device)
    return (torch.bucketize(p.float().contiguous(), edges, right=True) - 1).clamp_(0, NUM_BINS - 1)


def snap_to_edge(value: float) -> Tuple[float, int]:
    """Round a pixel threshold down to a bin edge so cache and run time count the same pixels.

    Returns:
        (snapped threshold as a Python float equal to the float32 edge, bin index).
    """
    idx = int(np.searchsorted(PROB_EDGES, np.float32(value), side="right") - 1)
    idx = min(max(idx, 0), NUM_BINS - 1)
    return float(PROB_EDGES[idx]), idx


def boundary_mask(pred: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels within ``radius`` px (Chebyshev) of a change of predicted class.

    Args:
        pred: predicted labels ``(N, H, W)``.
        radius: half-width of the neighbourhood; 0 gives no boundary pixels.

    Returns:
        bool ``(N, H, W)``; image borders are not boundaries.
    """
    if radius <= 0:
        return torch.zeros(pred.shape, dtype=torch.bool, device=pred.device)
    p = pred.unsqueeze(1).float()
    k = 2 * radius + 1
    hi = F.max_pool2d(p, k, stride=1, padding=radius)
    lo = -F.max_pool2d(-p, k, stride=1, padding=radius)
    return (hi != lo).squeeze(1)


def encode_array(a: np.ndarray) -> Dict[str, Any]:
    """A float32 array as plain YAML (shape and base64 bytes): how policies store fitted arrays."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"shape": list(a.shape), "dtype": "float32", "data": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(d: Any) -> np.ndarray:
    """Inverse of :func:`encode_array` (a plain list is accepted too)."""
    if isinstance(d, dict):
        return np.frombuffer(base64.b64decode(d["data"]), dtype="<f4").reshape(d["shape"]).copy()
    return np.asarray(d, dtype=np.float32)


def register_policy(name: str) -> Callable[[Type["Policy"]], Type["Policy"]]:
    """Class decorator that adds a policy to the registry under ``name``."""

    def deco(cls: Type["Policy"]) -> Type["Policy"]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"policy {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_policies() -> List[str]:
    """Names of the registered policies, sorted."""
    return sorted(_REGISTRY)


def policy_class(name: str) -> Type["Policy"]:
    """The registered policy class of ``name`` (``_`` reads as ``-``).

    Raises:
        ConfigError: unknown name (the nearest names are suggested).
    """
    key = str(name).replace("_", "-")
    if key not in _REGISTRY:
        near = nearest(key, _REGISTRY)
        raise ConfigError(
            f"unknown policy {name!r}",
            f"choose one of {', '.join(available_policies())}" + (f"; did you mean {near[0]!r}?" if near else ""),
        )
    return _REGISTRY[key]


def policy_options(name: str, options: Union[Mapping[str, Any], Sequence[str], None]) -> Dict[str, Any]:
    """A policy's options (``--option k=v``), typed by its constructor and checked by building it.

    Args:
        name: the policy's registry name.
        options: ``{"pixel_threshold": 0.95}`` or ``["pixel_threshold=0.95", ...]``.

    Returns:
        option -> value of the option's type.

    Raises:
        ConfigError: an option the policy does not have (the nearest is named), a value of the
            wrong type or out of range.
    """
    cls = policy_class(name)
    if options is None:
        return {}
    pairs = list(options.items()) if isinstance(options, Mapping) else [parse_assignment(o, "--option") for o in options]
    types = cls.option_types()
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key not in types:
            close = nearest(str(key), types, n=1) if types else []
            raise ConfigError(
                f"policy {cls.name!r} has no option {key!r}",
                (f"did you mean {close[0]!r}? its options: {', '.join(types)}" if close else f"its options: {', '.join(types)}")
                if types else f"{cls.name} takes no options",
            )
        try:
            out[key] = coerce(value, types[key], f"policy option {key}")
        except ConfigError as e:
            raise ConfigError(e.message, f"e.g. --option {key}={_example(types[key])}") from None
    cls(**out)  # range checks
    return out


def _example(tp: Any) -> str:
    for kind, text in ((float, "0.9"), (int, "1"), (bool, "true")):
        if tp is kind or kind in typing.get_args(tp):
            return text
    return "VALUE"


def build_policy(name: str, **kwargs: Any) -> "Policy":
    """Build an unfitted policy by registry name; its options (:meth:`Policy.option_types`) are typed first.

    Raises:
        ConfigError: unknown name (the nearest names are suggested) or bad options.
    """
    cls = policy_class(name)
    types = cls.option_types()
    try:
        kwargs = {k: coerce(v, types[k], f"policy option {k}") if k in types else v for k, v in kwargs.items()}
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad options for policy {cls.name!r}: {e}", "see docs/calibrate.md for each policy's options") from e


def policy_from_dict(d: Dict[str, Any]) -> "Policy":
    """Rebuild any registered policy from its ``to_dict()`` form (e.g. a bundle's ``policy:``)."""
    if not isinstance(d, dict) or "name" not in d:
        raise ConfigError("policy entry has no 'name'", "write the policy as produced by `mexify calibrate`")
    name = str(d["name"]).replace("_", "-")
    if name not in _REGISTRY:
        build_policy(name)  # raises with suggestions
    return _REGISTRY[name].from_dict(d)


def _threshold_out(v: float) -> Optional[float]:
    return None if not math.isfinite(v) else float(v)


def _threshold_in(v: Any) -> float:
    return math.inf if v is None else float(v)


class Policy:
    """Base class: per-exit image thresholds on a confidence that grows with certainty.

    ``thresholds[i]`` belongs to early exit ``i``; an image exits at the first exit
    whose confidence is ``>=`` its threshold (``inf`` disables an exit). The final
    exit always exits. ``temperatures`` (one per exit, final included) divide the
    logits before the softmax when set.

    Subclasses define :meth:`_scores_from_probs` (run time) and :meth:`cache_scores`
    (the same numbers from an exit cache), and list their own options in ``_params``.
    """

    name: str = "base"
    needs_labels: bool = False
    needs_features: bool = False
    #: the scores come from parameters fitted on the calibration images (a trained model): a certified fit
    #: then bounds the drop on out-of-fold scores (:meth:`fit_search`), which those images did not train
    learns_scores: bool = False
    #: folds of that cross-fitting
    score_folds: int = 5
    #: constructor options written to / read from ``to_dict``
    _params: Tuple[str, ...] = ()
    #: the options a user sets (``--option k=v``); None: every ``_params`` entry
    options: Optional[Tuple[str, ...]] = None

    @classmethod
    def option_types(cls) -> Dict[str, Any]:
        """Option -> type (from the constructor's annotations; untyped options take any value)."""
        hints: Dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is not None:
                try:
                    hints.update(typing.get_type_hints(init))
                except Exception:  # an annotation that does not resolve: that option is untyped
                    pass
        names = cls.options if cls.options is not None else cls._params
        return {n: hints.get(n, Any) for n in names}

    def __init__(
        self,
        thresholds: Optional[Sequence[float]] = None,
        temperatures: Optional[Sequence[float]] = None,
        exit_names: Optional[Sequence[str]] = None,
    ):
        self.thresholds: Optional[List[float]] = None if thresholds is None else [float(t) for t in thresholds]
        self.temperatures: Optional[List[float]] = None if temperatures is None else [float(t) for t in temperatures]
        self.exit_names: Optional[List[str]] = None if exit_names is None else list(exit_names)
        self.budget: Optional[Dict[str, Any]] = None
        self.figures: Optional[Dict[str, Any]] = None
        #: what calibration saw, for drift checks at run time (:func:`mexify.runtime.expected_stream`'s record)
        self.monitor: Optional[Dict[str, Any]] = None

    # ----------------------------------------------------------------- fitting
    @property
    def fitted(self) -> bool:
        return self.thresholds is not None

    @property
    def num_exits(self) -> int:
        if self.thresholds is None:
            raise ConfigError(f"policy {self.name!r} is not fitted", "run `mexify calibrate` first")
        return len(self.thresholds) + 1

    def fit(self, cache: Any, **search: Any) -> "Policy":
        """Fit on an exit cache: policy parameters first, then per-exit thresholds.

        Args:
            cache: an :class:`mexify.calibrate.ExitCache`.
            **search: forwarded to ``cache.search`` (``max_cost=``, ``max_drop=``, ...).

        Returns:
            a fitted copy; ``self`` is left unchanged. ``.figures`` holds what the
            search reached on the cache (:meth:`fit_search` also returns the search).
        """
        return self.fit_search(cache, **search).policy

    def fit_search(self, cache: Any, **search: Any) -> "PolicyFit":
        """:meth:`fit`, returning the fitted copy with the threshold search that fitted it (its curves)."""
        fitted = self._fit_params(cache)
        fitted.exit_names = list(cache.exit_names)
        fitted.temperatures = None if cache.temperatures is None else list(cache.temperatures)
        certified = bool(search.get("confidence"))
        scores = self._out_of_fold_scores(cache) if certified and self.learns_scores else fitted.cache_scores(cache)
        result = cache.search(scores, **search)
        fitted.thresholds = [float(t) for t in result.thresholds]
        fitted.figures = result.figures()
        return PolicyFit(fitted, result)

    def _out_of_fold_scores(self, cache: Any) -> np.ndarray:
        """Every image's scores from parameters fitted on the other folds (cross-fitting): scores the image did
        not train, so the thresholds and their bound see what new images will get. Folds are a fixed random
        split; the deployed parameters are fitted on every image."""
        n = cache.num_images
        folds = np.array_split(np.random.default_rng(0).permutation(n), min(self.score_folds, n))
        scores = np.zeros((n, cache.num_exits - 1), dtype=np.float64)
        for held in folds:
            train = np.setdiff1d(np.arange(n), held)
            scores[held] = self._fit_params(cache.subset(train)).cache_scores(cache.subset(held))
        return scores

    def _fit_params(self, cache: Any) -> "Policy":
        """Copy of self with data-dependent parameters fitted (default: none)."""
        return copy.deepcopy(self)

    def with_thresholds(self, thresholds: Sequence[float]) -> "Policy":
        """Copy with the given early-exit thresholds."""
        p = copy.deepcopy(self)
        p.thresholds = [float(t) for t in thresholds]
        return p

    def cache_scores(self, cache: Any) -> np.ndarray:
        """Per-image confidence at each early exit from the cache, ``(N, E-1)`` float64."""
        raise NotImplementedError

    # ---------------------------------------------------------------- run time
    def probabilities(self, exit_index: int, logits: torch.Tensor, features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class probabilities ``(N, K, H, W)`` of an exit (temperature applied); argmax is the mask."""
        t = self.temperatures[exit_index] if self.temperatures is not None else 1.0
        return torch.softmax(logits.float() / t, dim=1)

    def _on_device(self, what: Any, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A parameter (attribute name, or ``(name, index)``) as a tensor on ``device``, made once and
        kept: no host-to-device copy per decision (a CUDA graph could not capture one)."""
        cache = self.__dict__.setdefault("_device_tensors", {})
        owner = getattr(self, what[0] if isinstance(what, tuple) else what)
        key = (what, id(owner), str(device), dtype)  # a new parameter object is a new entry
        if key not in cache:
            value = owner[what[1]] if isinstance(what, tuple) else owner
            # the entry holds the owner, so its id cannot be reused by another object while cached
            cache[key] = (owner, torch.as_tensor(np.asarray(value), device=device, dtype=dtype))
        return cache[key][1]

    def mask_scores(self, exit_index: int, logits: torch.Tensor, features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What an exit's mask is the argmax of, once resized to the image (default: the logits)."""
        return logits

    def _scores_from_probs(self, exit_index: int, probs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def scores(self, exit_index: int, logits: torch.Tensor, features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image confidence ``(N,)`` at an exit (higher means more certain)."""
        return self._scores_from_probs(exit_index, self.probabilities(exit_index, logits, features))

    @torch.no_grad()
    def decide(
        self, exit_index: int, logits: torch.Tensor, features: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Whether each image exits now, and its confidence.

        Args:
            exit_index: 0-based exit index; ``num_exits - 1`` is the final exit.
            logits: that exit's logits ``(N, K, H, W)``.
            features: the feature map at the exit point (policies with ``needs_features``).

        Returns:
            (bool ``(N,)``, float ``(N,)``); the final exit always exits.
        """
        conf = self.scores(exit_index, logits, features)
        n_exits = self.num_exits
        if exit_index < 0 or exit_index >= n_exits:
            raise ConfigError(f"exit index {exit_index} out of range for a {n_exits}-exit policy", "check the bundle's exits")
        if exit_index == n_exits - 1:
            return torch.ones_like(conf, dtype=torch.bool), conf
        return conf >= self.thresholds[exit_index], conf

    # -------------------------------------------------------------- (de)serialise
    def _params_to_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self._params}

    def to_dict(self) -> Dict[str, Any]:
        """Plain-YAML form: name, options, thresholds by exit name, temperatures, budget, figures and monitor."""
        names = self.exit_names
        d: Dict[str, Any] = {"name": self.name}
        d.update(self._params_to_dict())
        if self.thresholds is not None:
            if names is not None and len(names) == len(self.thresholds) + 1:
                d["thresholds"] = {n: _threshold_out(t) for n, t in zip(names[:-1], self.thresholds)}
            else:
                d["thresholds"] = [_threshold_out(t) for t in self.thresholds]
        if names is not None:
            d["exit_names"] = list(names)
        if self.temperatures is not None:
            if names is not None and len(names) == len(self.temperatures):
                d["temperatures"] = {n: float(t) for n, t in zip(names, self.temperatures)}
            else:
                d["temperatures"] = [float(t) for t in self.temperatures]
        if self.budget is not None:
            d["budget"] = dict(self.budget)
        if self.figures is not None:
            d["figures"] = dict(self.figures)
        if self.monitor is not None:
            d["monitor"] = copy.deepcopy(dict(self.monitor))
        return d

    @classmethod
    def _params_from_dict(cls, d: Dict[str, Any]) -> Dict[str, Any]:
        return {k: d[k] for k in cls._params if k in d}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Policy":
        """Inverse of :meth:`to_dict`."""
        p = cls(**cls._params_from_dict(d))
        names = d.get("exit_names")
        th = d.get("thresholds")
        if isinstance(th, dict):
            names = names or list(th) + ["final"]
            p.thresholds = [_threshold_in(th[n]) for n in names[:-1]]
        elif th is not None:
            p.thresholds = [_threshold_in(t) for t in th]
        temps = d.get("temperatures")
        if isinstance(temps, dict):
            p.temperatures = [float(temps[n]) for n in (names or list(temps))]
        elif temps is not None:
            p.temperatures = [float(t) for t in temps]
        p.exit_names = list(names) if names is not None else None
        p.budget = d.get("budget")
        p.figures = d.get("figures")
        monitor = d.get("monitor")
        if monitor is not None and not isinstance(monitor, dict):
            raise ConfigError(f"the policy's monitor entry is a {type(monitor).__name__}, not a mapping",
                              "calibrate the bundle again, or remove the policy's monitor entry")
        p.monitor = monitor
        return p

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._params)
        th = "unfitted" if self.thresholds is None else "thresholds=[" + ", ".join(f"{t:.4g}" for t in self.thresholds) + "]"
        return f"{type(self).__name__}({opts}{', ' if opts else ''}{th})"


@dataclasses.dataclass(frozen=True)
class PolicyFit:
    """What :meth:`Policy.fit_search` returns: the fitted policy and the search that fitted it.

    Attributes:
        policy: the fitted copy (thresholds, figures).
        search: the :class:`mexify.calibrate.SearchResult` (thresholds, assignment, Pareto and
            global-threshold curves); None for a policy that searches nothing (the oracle).
    """

    policy: Policy
    search: Any = None
