"""Atomic training checkpoints and RNG state capture.

A checkpoint is written to a temporary file in the same directory, flushed to disk and then
moved over the old one with ``os.replace`` (:func:`mexify.files.atomic_file`), so an interrupt
or crash at any moment leaves either the previous checkpoint or the new one, never a torn file. Checkpoints hold only tensors and
plain Python values and load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from mexify.errors import TrainingError
from mexify.files import atomic_file

__all__ = ["CHECKPOINT_NAME", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: Dict[str, Any], path: Union[str, os.PathLike]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"checkpoint_version": CHECKPOINT_VERSION, **state}
    with atomic_file(path, "wb", fsync=True) as fh:
        torch.save(state, fh)
    _fsync_dir(path.parent)
    log.debug("checkpoint written: %s (stage %s, iteration %s)", path, state.get("stage"), state.get("iteration"))
    return path


def load_checkpoint(path: Union[str, os.PathLike], map_location: Optional[Any] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        TrainingError: the file is missing, unreadable or of another version.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path}", "run without --resume to start a new run")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt files
        raise TrainingError(f"cannot read checkpoint {path}: {e}", "delete it and run without --resume") from e
    if not isinstance(state, dict) or state.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise TrainingError(f"{path} is not a mexify training checkpoint (version {CHECKPOINT_VERSION})",
                            "delete it and run without --resume")
    return state


def rng_state() -> Dict[str, Any]:
    """Capture the torch (CPU and CUDA), Python and NumPy RNG states."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state_to_plain(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (missing entries are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        random.setstate(_plain_to_py_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in states])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["gauss"]))


def _py_state_to_plain(st):
    version, internal, gauss = st
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _plain_to_py_state(d):
    return (d["version"], tuple(d["internal"]), d["gauss"])
