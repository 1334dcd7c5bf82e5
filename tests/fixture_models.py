"""Tiny named networks for the conversion tests (loaded by spec ``fixture_models.py:NAME``)."""
import torch
import torch.nn.functional as F
from torch import nn


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyUNet(nn.Module):
    """Encoder-decoder with skip connections: stages must carry the skip tensors across cuts."""

    def __init__(self, num_classes: int = 4, width: int = 8):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3 = _block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.bottleneck = _block(4 * w, 4 * w)
        self.dec3, self.dec2, self.dec1 = _block(8 * w, 2 * w), _block(4 * w, w), _block(2 * w, w)
        self.final = nn.Conv2d(w, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        b = self.bottleneck(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([F.interpolate(b, scale_factor=2.0), e3], 1))
        d2 = self.dec2(torch.cat([F.interpolate(d3, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        return self.final(d1)


class LowResSegmenter(nn.Module):
    """Returns a tuple whose first element is logits at 1/4 resolution (a transformer-style head)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(_block(3, 8), nn.MaxPool2d(2), _block(8, 16), nn.MaxPool2d(2))
        self.body = nn.Sequential(_block(16, 16), _block(16, 16), _block(16, 16), _block(16, 16))
        self.head = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        f = self.body(self.stem(x))
        return self.head(f), f


class DataDependentGate(nn.Module):
    """A block whose control flow depends on tensor values: torch.fx and torch.export cannot trace it."""

    def __init__(self, c: int):
        super().__init__()
        self.a, self.b = _block(c, c), _block(c, c)

    def forward(self, x):
        if x.mean() > 0:
            return self.a(x)
        return self.b(x)


class BranchyNet(nn.Module):
    """A small segmenter with one untraceable block (``gate``); converts with --leaf-module DataDependentGate."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(_block(3, 8), _block(8, 8))
        self.down = nn.Sequential(nn.MaxPool2d(2), _block(8, 16), _block(16, 16))
        self.gate = DataDependentGate(16)
        self.tail = nn.Sequential(_block(16, 16), _block(16, 16))
        self.head = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        y = self.head(self.tail(self.gate(self.down(self.stem(x)))))
        return {"out": F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)}


class BatchSizeNet(nn.Module):
    """Keeps ``b = x.shape[0]`` from the start and uses it in a ``reshape`` after the middle: a Python
    int that must follow a shrinking batch."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(_block(3, 8), _block(8, 8))
        self.mid = nn.Sequential(_block(8, 8), _block(8, 8), _block(8, 8))
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        b = x.shape[0]
        h, w = x.shape[-2:]
        f = self.mid(self.stem(x))
        g = f.reshape(b, 8, -1).softmax(-1).reshape(b, 8, h, w) * f
        return self.head(g)


class TokenNet(nn.Module):
    """Carries ``(B, N, C)`` tokens and the unpacked ``B, C, H, W`` across the middle of the network."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(_block(3, 8), _block(8, 8))
        self.mid = nn.Sequential(_block(8, 8), _block(8, 8), _block(8, 8))
        self.proj = nn.Linear(8, 8)
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        f = self.stem(x)
        B, C, H, W = f.shape
        t = f.flatten(2).transpose(1, 2)
        g = self.mid(f)
        t = self.proj(t)
        return self.head(g + t.transpose(1, 2).reshape(B, C, H, W))


class SequenceFirstNet(TokenNet):
    """Carries sequence-first ``(N, B, C)`` tokens (``nn.MultiheadAttention``'s layout) across the middle:
    the batch is along dimension 1."""

    def forward(self, x):
        f = self.stem(x)
        t = f.flatten(2).permute(2, 0, 1)
        g = self.mid(f)
        t = self.proj(t)
        return self.head(g + t.permute(1, 2, 0).reshape_as(g))


class MixedBatchNet(nn.Module):
    """Folds the batch into ``(B * 2, C / 2, N)`` head groups and keeps them across the middle: the
    batch cannot shrink there, so placement must avoid those cuts."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(_block(3, 8), _block(8, 8))
        self.mid = nn.Sequential(_block(8, 8), _block(8, 8), _block(8, 8))
        self.tail = nn.Sequential(_block(8, 8), _block(8, 8))
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        f = self.stem(x)
        B, C, H, W = f.shape
        groups = f.reshape(B * 2, C // 2, H * W)
        g = self.mid(f)
        att = groups.softmax(-1).reshape(B, C, H, W)
        return self.head(self.tail(g * att))


class StochasticNet(nn.Module):
    """Train-mode behaviour written functionally: ``F.dropout(x, training=self.training)`` and
    torchvision's ``stochastic_depth``, which a single eval-mode trace would freeze off."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(_block(3, 8), _block(8, 8))
        self.body = nn.Sequential(_block(8, 8), _block(8, 8), _block(8, 8))
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        from torchvision.ops import stochastic_depth

        f = self.stem(x)
        f = f + stochastic_depth(self.body(f), 0.5, "row", self.training)
        return self.head(F.dropout(f, 0.5, self.training))


class DropOddRows:
    """A policy stand-in for shrinking tests: at every early exit, the odd rows still in the batch leave."""

    name = "drop-odd-rows"
    needs_features = False

    def decide(self, exit_index, logits, features=None):
        go = torch.zeros(logits.shape[0], dtype=torch.bool)
        go[1::2] = True
        return go, torch.ones(logits.shape[0])


def rows_agree_with_single_images(model, size, n=4, agree=1.0):
    """Masks of the shrinking runtime equal each image's masks run alone at the exit it took
    (``agree``: the share of pixels that must match; below 1 allows argmax ties between batch sizes)."""
    from mexify.runtime import EarlyExitRuntime

    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))
    batch = EarlyExitRuntime(model.eval(), DropOddRows()).predict_batch(x)
    assert batch.exit_index.tolist()[:2] == [model.num_exits - 1, 0]  # rows really left at different exits
    with torch.no_grad():
        for i in range(n):
            alone = model.forward_all(x[i:i + 1])[int(batch.exit_index[i])].max(1).indices[0]
            assert (batch.masks[i] == alone).float().mean() >= agree, f"row {i}"


class InplaceAfterExitNet(nn.Module):
    """Each block's output (a natural exit point) is changed in place by the next block's activation:
    an exit head must keep its own copy of the features for its backward pass."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8)) for c in (3, 8, 8, 8)])
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        for block in self.blocks:
            x = F.relu(block(x), inplace=True) if block is not self.blocks[0] else block(x)
            x = F.relu_(x) if block is self.blocks[0] else x
        return self.head(x)
