"""Exit heads: segmentation heads built from a template of the search space.

Every head maps an exit feature map (N, C, h, w) to logits (N, K, h, w) at the feature map's own
resolution: policies score there, and only the images that leave are upsampled to the input size
(:func:`resize_logits`, bilinear, as the model's own classifiers do) when a mask is asked for.

A *fused* head (``fuse=True`` with a skip feature) also reads a finer feature the network computed
before the exit, ``forward(features, skip=skip)``, and answers at the skip's resolution: the deep
branch is upsampled onto the reduced skip, as LR-ASPP's and DeepLabV3+'s decoders recover detail.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from mexify.config import HeadConfig, parse_head_settings
from mexify.errors import ConfigError, nearest

__all__ = ["HeadConfig", "ExitHead", "build_head", "parse_head_overrides", "parse_head_template", "resize_logits", "HEAD_TEMPLATES", "HEAD_SPACES",
           "head_space"]

HEAD_TEMPLATES: Dict[str, HeadConfig] = {
    # width 0: the widest head within 3% of the model's FLOPs (resolved at conversion); fuse: read
    # the finer feature convert chose for the exit, where there is one (plain heads elsewhere)
    "mess": HeadConfig(template="mess", width=0, blocks=1, dilation=1, fuse=True),
    "fcn": HeadConfig(template="fcn", width=0, blocks=1, dropout=0.1),
}


# Head candidates per exit (``convert --heads NAME``), MESS's over-provisioning: trained together in
# stage 2, one kept per exit by ``calibrate --search``. width 0: the widest within 3% of the model's FLOPs.
HEAD_SPACES: Dict[str, Tuple[HeadConfig, ...]] = {
    "mess": (
        HeadConfig(template="mess", width=0, blocks=0),
        HeadConfig(template="mess", width=0, blocks=1),
        HeadConfig(template="mess", width=0, blocks=2, dilation=2),
        HeadConfig(template="mess", width=0, blocks=1, aspp_rates=(6, 12)),
    ),
    # plain and fused heads side by side: the search keeps, per exit, whichever pays
    "fused": (
        HeadConfig(template="mess", width=0, blocks=1),
        HeadConfig(template="mess", width=0, blocks=0, fuse=True),
        HeadConfig(template="mess", width=0, blocks=1, fuse=True),
        HeadConfig(template="mess", width=0, blocks=2, dilation=2, fuse=True),
    ),
    # the uniform FCN baseline beside the mess candidates (what the search is compared with)
    "mess-fcn": (
        HeadConfig(template="fcn", width=0, blocks=1, dropout=0.1),
        HeadConfig(template="mess", width=0, blocks=0),
        HeadConfig(template="mess", width=0, blocks=1),
        HeadConfig(template="mess", width=0, blocks=2, dilation=2),
        HeadConfig(template="mess", width=0, blocks=1, aspp_rates=(6, 12)),
    ),
}


def head_space(space: Union[str, Sequence[Mapping[str, object]]]) -> Tuple[HeadConfig, ...]:
    """Head candidates from a space name (:data:`HEAD_SPACES`) or a list of head settings
    (``{"template": "mess", "blocks": 2, ...}``, e.g. read from a YAML file).

    Raises:
        ConfigError: unknown space, template or field, or an empty list.
    """
    if isinstance(space, str):
        if space not in HEAD_SPACES:
            close = nearest(space, HEAD_SPACES, n=1)
            raise ConfigError(f"unknown head space {space!r}", f"choose one of {', '.join(HEAD_SPACES)}, or give a YAML file"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
        return HEAD_SPACES[space]
    entries = list(space)
    if not entries:
        raise ConfigError("the head space lists no candidate", "list head settings, e.g. - {template: mess, blocks: 1}")
    out = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise ConfigError(f"a head candidate must be a mapping of head settings, got {entry!r}", "e.g. {template: mess, blocks: 1}")
        entry = dict(entry)
        out.append(parse_head_overrides(str(entry.pop("template", "mess")), entry))
    return tuple(out)


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _LightASPP(nn.Module):
    """1x1 branch plus one 3x3 dilated branch per rate, concatenated and projected back."""

    def __init__(self, channels: int, rates: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(channels, channels, 1)] + [_conv_bn_relu(channels, channels, 3, r) for r in rates]
        )
        self.project = _conv_bn_relu(channels * (len(rates) + 1), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


def resize_logits(logits: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Logits (or class scores) bilinearly resized to ``size`` (float32); unchanged when already there."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


SKIP_WIDTH = 48
"""Channels a fused head reduces its skip feature to (at most its width), DeepLabV3+'s choice."""


class ExitHead(nn.Module):
    """A segmentation head: ``forward(features) -> logits`` at the features' resolution.

    A fused head (``config.fuse`` and ``skip_channels > 0``) takes ``forward(features, skip=skip)`` and
    answers at the skip's resolution. ``size`` resizes the logits to it (training, where the loss
    is taken at the labels' resolution).
    """

    def __init__(self, config: HeadConfig, in_channels: int, num_classes: int, skip_channels: int = 0):
        super().__init__()
        self.config = config
        self.fused = bool(config.fuse and skip_channels > 0)
        layers: List[nn.Module] = []
        if config.template == "fcn":
            width = config.width or max(in_channels // 4, 1)
            layers.append(_conv_bn_relu(in_channels, width, 3))
        else:
            width = config.width
            if width < 1:  # 0 means "automatic", which convert resolves from the model's FLOPs
                raise ConfigError("a mess head needs its width resolved (width=0 means automatic, chosen by convert)",
                                  "give --head-set width=N, or let mexify convert choose it")
            layers.append(_conv_bn_relu(in_channels, width, 1))
            for _ in range(config.blocks):
                layers.append(_conv_bn_relu(width, width, 3, config.dilation))
            if config.aspp_rates:
                layers.append(_LightASPP(width, config.aspp_rates))
        self.body = nn.Sequential(*layers)
        if self.fused:
            reduced = min(SKIP_WIDTH, width)
            self.skip = _conv_bn_relu(skip_channels, reduced, 1)
            mixed = width + reduced
            self.fuse = nn.Sequential(
                nn.Conv2d(mixed, mixed, 3, padding=1, groups=mixed, bias=False), nn.BatchNorm2d(mixed), nn.ReLU(inplace=True),
                _conv_bn_relu(mixed, width, 1),
            )
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor, size: Optional[Tuple[int, int]] = None, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.body(x)
        if self.fused:
            if skip is None:
                raise TypeError("a fused exit head needs the skip feature: head(features, skip=skip)")
            s = self.skip(skip)
            y = F.interpolate(y, size=s.shape[-2:], mode="bilinear", align_corners=False)
            y = self.fuse(torch.cat([y, s], dim=1))
        logits = self.classifier(self.dropout(y))
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def build_head(config: HeadConfig, in_channels: int, num_classes: int, skip_channels: int = 0) -> ExitHead:
    """Build one exit head (fused when ``config.fuse`` and the exit has a skip feature of ``skip_channels``)."""
    return ExitHead(config, in_channels, num_classes, skip_channels)


def parse_head_overrides(template: str, overrides: Union[str, Mapping[str, object], None] = None) -> HeadConfig:
    """The head config for ``--head TEMPLATE --head-set k=v,...`` (settings checked by
    :func:`mexify.config.parse_head_settings`).

    Raises:
        ConfigError: unknown template or setting, or a value of the wrong type or out of range.
    """
    template = parse_head_template(template)
    return dataclasses.replace(HEAD_TEMPLATES[template], **parse_head_settings(overrides))


def parse_head_template(text: object) -> str:
    """``mess`` or ``fcn`` (:data:`HEAD_TEMPLATES`)."""
    if text not in HEAD_TEMPLATES:
        raise ConfigError(f"unknown head template {text!r}", f"choose one of {', '.join(HEAD_TEMPLATES)}")
    return str(text)
