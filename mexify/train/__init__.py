"""Two-stage multi-exit training (MESS): end-to-end, then frozen backbone with distillation.

The entry point is :func:`train_model` (a model and a dataset in, a trained model handed to a
``save`` callback); :func:`mexify.api.train` wraps it for bundle directories and dataset specs.
Recipes, losses and checkpoints are importable for custom loops.
"""
from mexify.train.checkpoint import load_checkpoint, save_checkpoint
from mexify.train.losses import distillation_loss, early_exit_loss, multi_exit_ce, positive_mask
from mexify.train.recipe import Recipe, available_recipes, load_recipe
from mexify.train.schedule import PolyLR, poly_factor
from mexify.train.trainer import (
    StageReport,
    TrainEvent,
    TrainReport,
    default_run_dir,
    load_backbone_weights,
    train_model,
)

__all__ = [
    "train_model",
    "TrainReport",
    "StageReport",
    "TrainEvent",
    "Recipe",
    "load_recipe",
    "available_recipes",
    "default_run_dir",
    "load_backbone_weights",
    "multi_exit_ce",
    "distillation_loss",
    "early_exit_loss",
    "positive_mask",
    "PolyLR",
    "poly_factor",
    "save_checkpoint",
    "load_checkpoint",
]
