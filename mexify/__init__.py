"""mexify: turn any PyTorch semantic-segmentation model into a multi-exit model.

The Python API mirrors the CLI: every verb (``convert``, ``inspect``, ``load``, ``train``,
``calibrate``, ``evaluate``, ``predict``, ``bench``) is in :mod:`mexify.api`. ``convert``,
``inspect`` and ``load`` are re-exported here with the extension points for tracing, FLOP
counting and policies (``train`` and ``calibrate`` are not: those names are subpackages).
"""
from mexify._version import __version__
from mexify.api import convert, inspect, load
from mexify.errors import MexifyError
from mexify.graph.profile import register_flop_formula
from mexify.graph.trace import register_autowrap_function, register_leaf_module
from mexify.nn import MultiExitModel
from mexify.policies import register_policy
from mexify.prepare import ConvertResult

__all__ = [
    "__version__",
    "MexifyError",
    "ConvertResult",
    "MultiExitModel",
    "convert",
    "inspect",
    "load",
    "register_leaf_module",
    "register_autowrap_function",
    "register_flop_formula",
    "register_policy",
]
