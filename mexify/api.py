"""The verbs the CLI wraps, in one place: ``from mexify import api``.

Each command of ``mexify`` calls exactly one of these functions and only renders its result.
"""
from mexify.bundle import load
from mexify.calibrate import calibrate
from mexify.converter import convert, inspect
from mexify.evaluate import evaluate
from mexify.runtime import bench, evaluate_policy, predict
from mexify.train import train

__all__ = ["convert", "inspect", "load", "train", "calibrate", "evaluate", "evaluate_policy", "predict", "bench"]
