"""One exception hierarchy for everything mexify reports to users.

Every message says what went wrong, where (node, file or key) and what to try next.
The CLI turns these into one red line and an exit code; library callers catch them.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Optional

__all__ = [
    "MexifyError",
    "SpecError",
    "TraceError",
    "PlacementError",
    "ConfigError",
    "BundleError",
    "DataError",
    "TrainingError",
    "BudgetError",
    "Interrupted",
    "nearest",
]


class MexifyError(Exception):
    """Base class of all user-facing errors. ``exit_code`` is what the CLI returns."""

    exit_code: int = 1

    def __init__(self, message: str, hint: Optional[str] = None):
        message = _unwrap_worker_error(message)
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


def _unwrap_worker_error(message: str) -> str:
    """The original one-line message of an error re-raised by a DataLoader worker.

    ``torch.utils.data`` re-raises a worker's exception as ``type(e)(text)``, where ``text`` is
    "Caught DataError in DataLoader worker process 0. Original Traceback ..." with the whole
    traceback; its last line is ``mexify.errors.DataError: <the message>``.
    """
    if not (isinstance(message, str) and message.startswith("Caught ") and "Original Traceback" in message):
        return message
    last = message.strip().splitlines()[-1]
    name, sep, text = last.partition(": ")
    return text if sep and name.rsplit(".", 1)[-1].endswith("Error") else last


class SpecError(MexifyError):
    """A model spec cannot be resolved, loaded or trusted."""


class TraceError(MexifyError):
    """The model cannot be traced into a graph."""


class PlacementError(MexifyError):
    """Exit points cannot be placed as asked."""


class ConfigError(MexifyError):
    """A config, recipe or override is invalid."""


class BundleError(MexifyError):
    """A bundle directory is missing, incomplete or incompatible."""


class DataError(MexifyError):
    """A dataset spec, file or label is invalid."""


class TrainingError(MexifyError):
    """Training stopped (non-finite loss, bad checkpoint, ...)."""


class BudgetError(MexifyError):
    """Calibration finished but the requested budget cannot be met."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a long command (training); ``checkpoint`` is where ``--resume`` continues
    from, or None when no checkpoint was written yet (nothing to resume)."""

    def __init__(self, checkpoint: Optional[str] = None):
        self.checkpoint = checkpoint
        super().__init__(f"interrupted; checkpoint {checkpoint}" if checkpoint else "interrupted before the first checkpoint")


def nearest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` candidates closest to ``name`` (for "did you mean" hints)."""
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.0)
    return close[:n]
