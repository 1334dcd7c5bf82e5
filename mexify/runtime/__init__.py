"""The deployable early-exit runtime: imports the model (:mod:`mexify.nn`) and policies only.

Evaluation against labels, timing and benchmarks live in :mod:`mexify.tools`.
"""
from mexify.runtime.costs import exit_ms_per_image, original_ms_per_image
from mexify.runtime.engine import DTYPES, EarlyExitRuntime, labels_of, masks_of, parse_dtype, predict, resize_masks
from mexify.runtime.graphs import GraphedCall, capture
from mexify.runtime.latency import LatencyProfile, profile_key, select_profile
from mexify.runtime.monitor import DriftReport, DriftTest, StreamMonitor, StreamStats, drift_report, expected_stream
from mexify.runtime.policy import FixedExit, active_exits, resolve_policy
from mexify.runtime.results import BatchPrediction, Prediction

__all__ = [
    "EarlyExitRuntime",
    "predict",
    "Prediction",
    "BatchPrediction",
    "FixedExit",
    "resolve_policy",
    "active_exits",
    "labels_of",
    "masks_of",
    "resize_masks",
    "parse_dtype",
    "DTYPES",
    "exit_ms_per_image",
    "original_ms_per_image",
    "LatencyProfile",
    "profile_key",
    "select_profile",
    "GraphedCall",
    "capture",
    "StreamMonitor",
    "StreamStats",
    "expected_stream",
    "drift_report",
    "DriftReport",
    "DriftTest",
]
