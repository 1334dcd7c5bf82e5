"""Tiny segmentation networks for training tests (importable as ``file.py:factory`` specs)."""
import torch.nn.functional as F
from torch import nn


def _block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinySegNet(nn.Module):
    """Four strided conv-BN-ReLU blocks and a 1x1 classifier, upsampled to the input:
    a plain chain with BatchNorm everywhere, cheap enough to train for real in a test."""

    def __init__(self, num_classes: int = 4, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            _block(3, width, 2), _block(width, width, 1), _block(width, 2 * width, 2),
            _block(2 * width, 2 * width, 1), _block(2 * width, 2 * width, 1), _block(2 * width, 2 * width, 1),
        )
        self.classifier = nn.Conv2d(2 * width, num_classes, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        return F.interpolate(self.classifier(self.features(x)), size=(h, w), mode="bilinear", align_corners=False)


def tiny(num_classes: int = 4, width: int = 16):
    return TinySegNet(num_classes, width)
