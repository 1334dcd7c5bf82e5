"""Watching for drift: does the stream of images still look like the calibration images?

A calibrated policy meets its budget on images like its calibration images: its thresholds were
fitted for the exit mix those images produce. What calibration saw is kept with the policy
(``policy.monitor``, made by :func:`expected_stream`): the share of images that left at each exit,
and the mean and spread of the policy's confidence at each early exit over the images that
reached it. The runtime keeps the same statistics of the images it runs (:class:`StreamMonitor`,
``EarlyExitRuntime.stream``), and :func:`drift_report` tests one against the other: a
two-proportion z-test per early exit on the exit rate, a Welch z-test per early exit on the mean
confidence, Bonferroni-corrected over the tests made. A finding means the new images are not like
the calibration images, so the budget the policy was fitted for may not hold.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from statistics import NormalDist
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mexify.errors import ConfigError

__all__ = ["expected_stream", "StreamMonitor", "StreamStats", "drift_report", "DriftReport", "DriftTest", "MIN_IMAGES"]

#: Fewest images (in the stream, and reaching an exit for its confidence test) before anything is tested.
MIN_IMAGES = 30

_ADVICE = "new images may not look like the calibration images, and the budget may not hold; recalibrate on recent images"


def _exit_counts(exit_index: Any, num_exits: int) -> np.ndarray:
    """Images per exit from the exit index of each image (a tensor, array or list)."""
    if isinstance(exit_index, torch.Tensor):
        exit_index = exit_index.detach().cpu().numpy()
    idx = np.asarray(exit_index, dtype=np.int64).reshape(-1)
    counts = np.bincount(idx, minlength=num_exits) if not idx.size or idx.min() >= 0 else None
    if counts is None or len(counts) > num_exits:
        raise ConfigError(f"exit indices must be 0..{num_exits - 1}, got {int(idx.min())}..{int(idx.max())}",
                          "pass the exit each image took (0 = shallowest, the final exit last)")
    return counts


def expected_stream(exit_names: Sequence[str], scores: np.ndarray, assignment: np.ndarray,
                    thresholds: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """What calibration saw, as the plain-YAML record a policy keeps in ``policy.monitor``.

    Args:
        exit_names: every exit's name, the final exit last (``E`` names).
        scores: ``(N, E-1)`` the policy's confidence of each calibration image at each early exit.
        assignment: ``(N,)`` the exit each image took with the fitted thresholds (``E-1`` = final).
        thresholds: the fitted thresholds; an early exit whose threshold is not finite is switched
            off (the runtime does not score there), so it gets no confidence entry.

    Returns:
        ``{"images": N, "exit_rates": {name: share of images that left there},
        "confidence": {name: {"mean", "std", "reached"}}}``: for each early exit that images
        reach, the mean and sample standard deviation of the confidence over the images whose
        exit index is at least that exit's (the images the runtime scores there) and how many they are.

    Raises:
        ConfigError: shapes that do not agree, or no image.
    """
    names = [str(n) for n in exit_names]
    e = len(names)
    assignment = np.asarray(assignment).reshape(-1)
    n = int(assignment.size)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1 and e == 2:  # one early exit: a plain vector is fine
        scores = scores[:, None]
    if n == 0 or scores.shape != (n, e - 1):
        raise ConfigError(f"expected_stream needs scores (N, {e - 1}) and an assignment (N,) with N > 0, got "
                          f"{tuple(scores.shape)} and ({n},)", "pass the calibration images' scores and exits")
    counts = _exit_counts(assignment, e)
    confidence: Dict[str, Dict[str, float]] = {}
    for i in range(e - 1):
        if thresholds is not None and not math.isfinite(float(thresholds[i])):
            continue
        s = scores[assignment >= i, i]
        s = s[np.isfinite(s)]
        if s.size:
            confidence[names[i]] = {"mean": float(s.mean()), "std": float(s.std(ddof=1)) if s.size > 1 else 0.0,
                                    "reached": int(s.size)}
    return {"images": n, "exit_rates": {name: float(c) / n for name, c in zip(names, counts)}, "confidence": confidence}


@dataclasses.dataclass(frozen=True)
class StreamStats:
    """A snapshot of the stream (:meth:`StreamMonitor.snapshot`).

    Attributes:
        images: images seen.
        exit_names: every exit's name, the final exit last.
        exit_counts: images per exit, by name.
        exit_rates: share of the images (0-1) that left at each exit, by name (0 without an image).
        confidence: per early exit the runtime scored, over the images that reached it: ``mean`` and
            ``std`` (sample standard deviation) of the policy's confidence and ``reached`` (how many).
    """

    images: int
    exit_names: List[str]
    exit_counts: Dict[str, int]
    exit_rates: Dict[str, float]
    confidence: Dict[str, Dict[str, float]]

    @property
    def mean_confidence(self) -> Dict[str, float]:
        """Mean confidence per scored early exit, by name."""
        return {k: v["mean"] for k, v in self.confidence.items()}

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON/YAML, in the form of :func:`expected_stream`'s record (plus ``exit_counts``)."""
        return {"images": self.images, "exit_counts": dict(self.exit_counts), "exit_rates": dict(self.exit_rates),
                "confidence": {k: dict(v) for k, v in self.confidence.items()}}


class StreamMonitor:
    """Running statistics of a stream of images: the exit each left at, and the confidence at each early exit.

    Confidences are summed where they are computed (sum and sum of squares in float64; float32 on
    MPS, which has no float64): on the host in Python floats or numpy, on a GPU with a few small
    device operations and no host synchronisation (the device sums come to the host only in
    :meth:`snapshot`).

    Args:
        exit_names: every exit's name, the final exit last.

    Example::

        mon = StreamMonitor(model.exit_names)
        mon.observe(0, conf0)            # confidences (n,) of the n images that reached early exit 0
        mon.count(exit_index)            # the exit each image of the batch left at
        report = drift_report(mon.snapshot(), policy.monitor)
    """

    def __init__(self, exit_names: Sequence[str]):
        self.exit_names = [str(n) for n in exit_names]
        self.reset()

    def reset(self) -> None:
        """Forget everything seen (start a new window)."""
        e = len(self.exit_names)
        self._counts = np.zeros(e, dtype=np.int64)
        self._reached = np.zeros(max(e - 1, 0), dtype=np.int64)
        self._host = [[0.0, 0.0] for _ in range(len(self._reached))]  # sum and sum of squares, per early exit
        self._sums: Dict[str, torch.Tensor] = {}  # the same on other devices, by device

    @property
    def images(self) -> int:
        """Images counted so far."""
        return int(self._counts.sum())

    def count(self, exit_index: Any) -> None:
        """Count a batch's images by the exit each left at (``(n,)`` tensor, array or list of exit indices)."""
        self._counts += _exit_counts(exit_index, len(self.exit_names))

    def observe(self, exit_index: int, confidence: torch.Tensor) -> None:
        """Record the confidences ``(n,)`` of the ``n`` images that reached early exit ``exit_index``
        (all of them, whether they left there or not), on whatever device they were computed."""
        c = confidence.detach().reshape(-1)
        if c.numel() == 0:
            return
        self._reached[exit_index] += int(c.numel())
        if c.device.type == "cpu":  # Python floats (float64) for a few values, numpy for more: no torch dispatch
            row = self._host[exit_index]
            if c.numel() <= 32:
                v = c.tolist()
                row[0] += sum(v)
                row[1] += sum(map(operator.mul, v, v))
            else:
                a = (c if c.dtype in (torch.float32, torch.float64) else c.float()).numpy().astype(np.float64, copy=False)
                row[0] += float(a.sum())
                row[1] += float(a.dot(a))
            return
        acc = self._sums.get(str(c.device))
        if acc is None:
            dtype = torch.float32 if c.device.type == "mps" else torch.float64
            with torch.inference_mode(False):  # a normal tensor: updated in and out of inference mode alike
                acc = self._sums[str(c.device)] = torch.zeros((len(self._reached), 2), dtype=dtype, device=c.device)
        c = c.to(acc.dtype)
        acc[exit_index].add_(torch.stack((c.sum(), c.dot(c))))

    def update(self, exit_index: Any, confidences: Any = None) -> None:
        """Record a batch at once: the exit each image left at, and optionally its confidences.

        Args:
            exit_index: ``(n,)`` the exit each image took.
            confidences: ``(n, E-1)`` each image's confidence at each early exit, NaN where it was
                not computed (an exit the image did not reach, or one switched off).
        """
        if confidences is None:
            self.count(exit_index)
            return
        if isinstance(confidences, torch.Tensor):
            confidences = confidences.detach().cpu().numpy()
        conf = torch.from_numpy(np.asarray(confidences, dtype=np.float64).reshape(-1, len(self._reached)))
        counts = _exit_counts(exit_index, len(self.exit_names))
        if conf.shape[0] != counts.sum():
            raise ConfigError(f"{int(counts.sum())} exit indices but {conf.shape[0]} rows of confidences",
                              "pass one row of confidences per image")
        self._counts += counts
        for i in range(conf.shape[1]):
            column = conf[:, i]
            self.observe(i, column[torch.isfinite(column)])

    def snapshot(self) -> StreamStats:
        """The statistics so far (the one place the device sums are read)."""
        sums = np.array(self._host, dtype=np.float64).reshape(-1, 2)
        for acc in self._sums.values():
            sums += acc.double().cpu().numpy()
        n = self.images
        confidence: Dict[str, Dict[str, float]] = {}
        for i, k in enumerate(self._reached.tolist()):
            if k == 0:
                continue
            mean = sums[i, 0] / k
            var = (sums[i, 1] - sums[i, 0] * mean) / (k - 1) if k > 1 else 0.0
            confidence[self.exit_names[i]] = {"mean": float(mean), "std": math.sqrt(max(float(var), 0.0)), "reached": int(k)}
        return StreamStats(
            images=n, exit_names=list(self.exit_names),
            exit_counts={name: int(c) for name, c in zip(self.exit_names, self._counts)},
            exit_rates={name: (float(c) / n if n else 0.0) for name, c in zip(self.exit_names, self._counts)},
            confidence=confidence,
        )


@dataclasses.dataclass(frozen=True)
class DriftTest:
    """One test of :func:`drift_report`.

    Attributes:
        exit: the early exit's name.
        kind: ``"exit rate"`` (share of images 0-1 that left there) or ``"confidence"`` (mean
            confidence of the images that reached it).
        stream, expected: the stream's value and calibration's.
        z: the test statistic (positive: the stream's value is higher).
        drifted: ``|z|`` is above the Bonferroni-corrected critical value.
    """

    exit: str
    kind: str
    stream: float
    expected: float
    z: float
    drifted: bool

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DriftReport:
    """What :func:`drift_report` found.

    Attributes:
        images: images in the stream; ``expected_images``: calibration images.
        alpha: the family-wise significance level; ``critical_z``: the two-sided critical ``|z|``
            after the Bonferroni correction over ``len(tests)`` tests (NaN when nothing was tested).
        tests: one row per test made.
        warnings: one readable line per finding (empty: no drift found, or too few images).
        note: why nothing was tested, if so.
    """

    images: int
    expected_images: int
    alpha: float
    critical_z: float
    tests: List[DriftTest]
    warnings: List[str]
    note: Optional[str] = None

    @property
    def drifted(self) -> bool:
        return bool(self.warnings)

    def to_dict(self) -> Dict[str, Any]:
        return {"images": self.images, "expected_images": self.expected_images, "alpha": self.alpha,
                "critical_z": None if math.isnan(self.critical_z) else self.critical_z,
                "tests": [t.to_dict() for t in self.tests], "warnings": list(self.warnings), "note": self.note}


def _bad_record(why: str) -> ConfigError:
    return ConfigError(f"the policy's drift record (monitor:) is malformed: {why}",
                       "calibrate the bundle again, or remove the policy's monitor entry")


def _number(v: Any, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
        raise _bad_record(f"{what} is {v!r}, not a number in [{lo:g}, {hi:g}]")
    return float(v)


def _read(record: Any) -> Tuple[int, Dict[str, float], Dict[str, Tuple[float, float, int]]]:
    """``(images, exit rates, {exit: (mean, std, reached)})`` from a record (a dict or :class:`StreamStats`), checked."""
    if isinstance(record, StreamStats):  # the stream's own: a NaN confidence makes a NaN mean, which tests nothing
        return record.images, dict(record.exit_rates), {k: (v["mean"], v["std"], v["reached"]) for k, v in record.confidence.items()}
    if not isinstance(record, Mapping):
        raise _bad_record(f"a {type(record).__name__}, not a mapping")
    images = int(_number(record.get("images"), "images", 0))
    rates_in, conf_in = record.get("exit_rates") or {}, record.get("confidence") or {}
    if not isinstance(rates_in, Mapping) or not isinstance(conf_in, Mapping):
        raise _bad_record("exit_rates and confidence must be mappings by exit name")
    rates = {str(k): _number(v, f"exit_rates.{k}", 0, 1) for k, v in rates_in.items()}
    conf: Dict[str, Tuple[float, float, int]] = {}
    for k, v in conf_in.items():
        if not isinstance(v, Mapping):
            raise _bad_record(f"confidence.{k} must hold mean, std and reached")
        conf[str(k)] = (_number(v.get("mean"), f"confidence.{k}.mean"), _number(v.get("std"), f"confidence.{k}.std", 0),
                        int(_number(v.get("reached"), f"confidence.{k}.reached", 0)))
    return images, rates, conf


def _pct(p: float) -> str:
    return f"{100 * p:.0f}%" if 100 * p >= 10 or p == 0 else f"{100 * p:.1f}%"


def _rate_z(p1: float, n1: int, p2: float, n2: int) -> Optional[float]:
    """Two-proportion z (pooled) of share ``p1`` of ``n1`` against ``p2`` of ``n2``; None when undefined."""
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return (p1 - p2) / se if se > 0 else None


def _mean_z(a: Tuple[float, float, int], b: Tuple[float, float, int]) -> Optional[float]:
    """Welch z of mean ``a`` against mean ``b`` (each ``(mean, std, count)``); None when undefined."""
    se = math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2])
    return (a[0] - b[0]) / se if se > 0 and math.isfinite(se) and math.isfinite(a[0] - b[0]) else None


def _tests(stats: Tuple[int, Dict[str, float], Dict[str, Tuple[float, float, int]]], expected: Tuple[int, Dict[str, float],
           Dict[str, Tuple[float, float, int]]], early: Sequence[str], min_images: int) -> List[Tuple[str, str, float, float, float]]:
    """``(exit, kind, stream, expected, z)`` for every test that can be made."""
    (n1, rates1, conf1), (n2, rates2, conf2) = stats, expected
    out = []
    for name in early:
        if name in rates1 and name in rates2:
            z = _rate_z(rates1[name], n1, rates2[name], n2)
            if z is not None:
                out.append((name, "exit rate", rates1[name], rates2[name], z))
    for name in early:
        if name in conf1 and name in conf2 and conf1[name][2] >= min_images and conf2[name][2] >= 2:
            z = _mean_z(conf1[name], conf2[name])
            if z is not None:
                out.append((name, "confidence", conf1[name][0], conf2[name][0], z))
    return out


def _warning(exit: str, kind: str, stream: float, expected: float, z: float) -> str:
    if kind == "exit rate":
        return f"exit {exit}: {_pct(stream)} of images left here, calibration expects {_pct(expected)} (z={z:.1f}): {_ADVICE}"
    return (f"exit {exit}: mean confidence {stream:.3g} on the images that reached it, calibration expects "
            f"{expected:.3g} (z={z:.1f}): {_ADVICE}")


def drift_report(stats: Union[StreamStats, Mapping[str, Any]], expected: Mapping[str, Any], alpha: float = 0.01,
                 min_images: int = MIN_IMAGES) -> DriftReport:
    """Test a stream against calibration: does it leave at each exit, and score there, as calibration did?

    Per early exit, a two-proportion z-test of the share of images that left there (pooled, with
    both sample sizes) and a Welch z-test of the mean confidence over the images that reached it
    (with both standard deviations and counts). The critical value is two-sided at ``alpha``
    divided by the number of tests made (Bonferroni), so ``alpha`` bounds the chance of any false
    warning on a stream drawn like the calibration images.

    Args:
        stats: the stream (:meth:`StreamMonitor.snapshot`, or a dict of the same form).
        expected: calibration's record (:func:`expected_stream`, ``policy.monitor``).
        alpha: family-wise significance level, in (0, 1).
        min_images: below this many stream images nothing is tested (and a confidence is tested
            only where at least this many stream images reached the exit).

    Returns:
        a :class:`DriftReport`; its ``warnings`` hold one line per finding.

    Raises:
        ConfigError: ``alpha`` outside (0, 1), or a malformed record.
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}", "e.g. alpha=0.01")
    s, e = _read(stats), _read(expected)
    names = list(stats.exit_names) if isinstance(stats, StreamStats) else list(s[1])
    if s[0] < max(min_images, 1) or e[0] < 1:
        note = f"{s[0]} images seen: drift is tested from {min_images}" if e[0] >= 1 else "the calibration record holds no image"
        return DriftReport(s[0], e[0], alpha, math.nan, [], [], note)
    found = _tests(s, e, names[:-1], min_images)
    crit = NormalDist().inv_cdf(1 - alpha / (2 * len(found))) if found else math.nan
    tests = [DriftTest(name, kind, a, b, z, abs(z) > crit) for name, kind, a, b, z in found]
    warnings = [_warning(t.exit, t.kind, t.stream, t.expected, t.z) for t in tests if t.drifted]
    return DriftReport(s[0], e[0], alpha, crit, tests, warnings)
