"""mexify: turn any PyTorch semantic-segmentation model into a multi-exit model.

The Python API mirrors the CLI: ``mexify.convert``, ``mexify.inspect`` and ``mexify.load`` here,
and every verb (``train``, ``calibrate``, ``evaluate``, ``predict``, ``bench``) in :mod:`mexify.api`.
"""
__version__ = "0.1.0"

from mexify.errors import MexifyError  # noqa: E402
from mexify.converter import ConvertResult, convert, inspect  # noqa: E402
from mexify.bundle import load  # noqa: E402
from mexify.model import MultiExitModel  # noqa: E402

__all__ = ["__version__", "MexifyError", "ConvertResult", "convert", "inspect", "load", "MultiExitModel"]
