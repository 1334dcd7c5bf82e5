"""Files mexify reads from users and writes for them: safe paths inside a directory.

Every path read from a file a user hands us (a bundle's ``config.yaml``, an export manifest) is
resolved through :func:`inside`: a name such as ``../../etc/passwd`` or an absolute path cannot
make a loader open a file outside the directory the user gave.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from mexify.errors import BundleError

__all__ = ["inside"]

PathLike = Union[str, "os.PathLike[str]"]


def inside(root: PathLike, name: object, what: str = "file") -> Path:
    """``root / name``, refused unless it resolves inside ``root`` (symlinks followed).

    Args:
        root: the directory the user gave (a bundle, an export).
        name: a relative path read from a file in ``root``.
        what: what the path is, for the message (``"graph"``, ``"weights"``).

    Raises:
        BundleError: ``name`` is not a non-empty relative path string, or leaves ``root``.
    """
    root = Path(root)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise BundleError(f"{root}: the {what} entry {name!r} is not a file name", "the file was altered; get a fresh copy")
    candidate = Path(name)
    base = root.resolve()
    resolved = (base / candidate).resolve()
    if candidate.is_absolute() or (resolved != base and base not in resolved.parents):
        raise BundleError(
            f"{root}: the {what} entry {name!r} points outside the directory; refusing to read it",
            "a bundle or export only names files inside itself; the file was altered, get a fresh copy",
        )
    return resolved
