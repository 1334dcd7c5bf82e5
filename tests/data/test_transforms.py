"""MESS transforms keep image and mask aligned."""
import torch

from mexify.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SegTransform, build_transform


def _encoded(h=37, w=53, k=7):
    """An image whose first channel encodes the label of each pixel (blocky, so resizing keeps it)."""
    g = torch.Generator().manual_seed(3)
    coarse = torch.randint(0, k, (h // 8 + 1, w // 8 + 1), generator=g)
    mask = coarse.repeat_interleave(8, 0).repeat_interleave(8, 1)[:h, :w].contiguous()
    img = torch.stack([mask.float() / 10.0, torch.zeros(h, w), torch.ones(h, w)])
    return img, mask


def _decode(img):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    raw = img * std + mean
    return raw[0] * 10.0, raw[2]


def test_train_transform_keeps_alignment():
    img, mask = _encoded()
    tf = build_transform(True, base_size=64, crop_size=48)
    torch.manual_seed(0)
    for _ in range(30):
        out_img, out_mask = tf(img, mask)
        assert out_img.shape == (3, 48, 48) and out_mask.shape == (48, 48)
        label, ones = _decode(out_img)
        valid = out_mask != 255
        # padding is exactly where the mask is ignore: the constant channel is 1 inside, 0 in padding
        assert torch.allclose(ones[valid], torch.ones_like(ones[valid]), atol=1e-4)
        assert torch.all(ones[~valid].abs() < 1e-4)
        # bilinear resampling blends labels only near block edges, so the decoded labels match the mask
        # on most pixels, and better at offset (0, 0) than at any shifted offset
        scores = {off: _agreement(label, out_mask, *off) for off in _OFFSETS}
        assert max(scores, key=scores.get) == (0, 0), scores
        assert scores[(0, 0)] > 0.8


_OFFSETS = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]


def _agreement(label, mask, dy, dx):
    h, w = mask.shape
    lab = label[2 : h - 2, 2 : w - 2].round()
    m = mask[2 + dy : h - 2 + dy, 2 + dx : w - 2 + dx]
    valid = m != 255
    return float((lab[valid] == m[valid].float()).float().mean()) if valid.any() else 0.0


def test_flip_moves_image_and_mask_together():
    img, mask = _encoded(16, 16)
    tf = SegTransform(train=True, scale_range=(1.0, 1.0), crop_size=None, flip_p=1.0, mean=None, std=None)
    out_img, out_mask = tf(img, mask)
    assert torch.equal(out_mask, mask.flip(-1))
    assert torch.equal(out_img, img.flip(-1))


def test_crop_pads_with_ignore():
    img, mask = _encoded(10, 10)
    tf = SegTransform(train=True, scale_range=(1.0, 1.0), crop_size=(20, 30), flip_p=0.0, mean=None, std=None)
    out_img, out_mask = tf(img, mask)
    assert out_mask.shape == (20, 30)
    assert int((out_mask != 255).sum()) == 100
    assert torch.equal(out_mask[:10, :10], mask)


def test_eval_transform_is_resize_only():
    img, mask = _encoded(20, 40)
    tf = build_transform(False, base_size=80)
    a = tf(img, mask)
    b = tf(img, mask)
    assert a[0].shape == (3, 40, 80) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(a[1].unique().tolist()) <= set(mask.unique().tolist())
