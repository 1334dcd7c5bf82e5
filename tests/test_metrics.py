"""Metrics cross-checked against an independent numpy confusion matrix."""
import math

import numpy as np
import pytest
import torch

from mexify.metrics import ConfusionMatrix, per_image_miou


def _np_confusion(pred, target, k, ignore=255):
    cm = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t == ignore:
            continue
        cm[t, p] += 1
    return cm


def _np_scores(cm):
    """IoU, mIoU and pixel accuracy in points (0-100), the library's unit."""
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, 100 * tp / union, np.nan)
    return iou, np.nanmean(iou), 100 * tp.sum() / cm.sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    k = 6
    cm = ConfusionMatrix(k)
    preds, targets = [], []
    for _ in range(3):  # streaming over batches
        target = rng.integers(0, k - 1, size=(2, 9, 11))  # class k-1 never in target
        target[rng.random(target.shape) < 0.2] = 255
        pred = np.where(rng.random(target.shape) < 0.6, np.where(target == 255, 0, target), rng.integers(0, k, target.shape))
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        preds.append(pred)
        targets.append(target)
    ref = _np_confusion(np.concatenate(preds), np.concatenate(targets), k)
    assert np.array_equal(cm.mat.numpy(), ref)
    iou, miou, acc = _np_scores(ref)
    np.testing.assert_allclose(cm.iou().numpy(), iou, equal_nan=True)
    assert cm.miou() == pytest.approx(miou)
    assert cm.pixel_accuracy() == pytest.approx(acc)


def test_absent_class_is_nan_and_excluded():
    cm = ConfusionMatrix(4)
    t = torch.tensor([[0, 0, 1, 1]])
    cm.update(t.clone(), t)
    iou = cm.iou()
    assert torch.isnan(iou[2]) and torch.isnan(iou[3])
    assert cm.miou() == 100.0 and cm.pixel_accuracy() == 100.0


def test_logits_merge_reset():
    k = 3
    logits = torch.randn(2, k, 5, 5)
    target = torch.randint(0, k, (2, 5, 5))
    a = ConfusionMatrix(k).update(logits, target)
    b = ConfusionMatrix(k).update(logits.argmax(1), target)
    assert torch.equal(a.mat, b.mat)
    a.merge(b)
    assert int(a.mat.sum()) == 100
    a.reset()
    assert a.total == 0 and math.isnan(a.miou()) and math.isnan(a.pixel_accuracy())  # nothing counted: undefined
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(k + 1))


def test_per_image_miou_matches_numpy():
    rng = np.random.default_rng(5)
    k = 5
    target = rng.integers(0, k, size=(4, 8, 8))
    target[rng.random(target.shape) < 0.3] = 255
    target[3] = 255  # an image without labelled pixels
    pred = np.where(rng.random(target.shape) < 0.5, np.where(target == 255, 1, target), rng.integers(0, k, target.shape))
    got = per_image_miou(torch.from_numpy(pred), torch.from_numpy(target), k)
    assert got.shape == (4,)
    for i in range(3):
        assert got[i].item() == pytest.approx(_np_scores(_np_confusion(pred[i], target[i], k))[1], rel=1e-6)
    assert torch.isnan(got[3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda():
    t = torch.randint(0, 4, (2, 16, 16), device="cuda")
    cm = ConfusionMatrix(4).update(t, t)
    assert cm.mat.device.type == "cuda" and cm.miou() == 100.0
    assert per_image_miou(t, t, 4).device.type == "cuda"
