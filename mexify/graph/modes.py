"""Train/eval mode for the length of a block, then put back: the one way mexify changes a module's mode.

Library functions that need a mode (tracing, FLOP counting, batch analysis, the exit cache,
temperature fitting, evaluation) enter :func:`training_mode` and leave the caller's module as it
came, the way torchvision's feature extraction hands a model back in the mode it arrived in.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

__all__ = ["training_mode"]


@contextlib.contextmanager
def training_mode(module: Any, training: Optional[bool] = False, flags_only: bool = False) -> Iterator[Any]:
    """``module`` in train (``training=True``) or eval mode for the block; afterwards every submodule's own
    flag is what it was (a model half in eval mode, such as one with a frozen backbone, stays so).

    Args:
        module: an ``nn.Module``.
        training: the mode inside the block; None leaves it and only restores it afterwards.
        flags_only: set each submodule's ``training`` flag instead of calling ``module.train()``: for
            modules whose ``train()`` must not run (torch.export's modules refuse it, their graph fixed the
            mode). Without it, ``module.train()`` runs on the way in and out, so overrides take effect
            (a :class:`~mexify.graph.split.DualGraphModule` swaps its graph, a frozen backbone keeps its
            BatchNorm in eval mode).

    Yields:
        ``module``.
    """
    saved = [(m, m.training) for m in module.modules()]
    if training is not None:
        _set(module, training, flags_only)
    try:
        yield module
    finally:
        if not flags_only:
            module.train(saved[0][1])
        for m, flag in saved:  # parents before children: a parent's train() resets its subtree, the children follow
            if m.training != flag:
                _set(m, flag, flags_only)


def _set(module: Any, training: bool, flags_only: bool) -> None:
    if flags_only:
        for m in module.modules():
            m.training = training
    else:
        module.train(training)
