"""Readers for on-disk dataset layouts (VOC, Cityscapes, ADE20K, generic folder)."""
from __future__ import annotations

from mexify.errors import DataError


def _not_ready(spec, **kw):
    raise DataError(f"the {spec.scheme}: reader is not available yet", "use synthetic:scenes")


BUILDERS = {"voc": _not_ready, "cityscapes": _not_ready, "ade20k": _not_ready, "folder": _not_ready}
