"""`folder:` datasets without labels: no masks/ folder, or ?labels=0 on a labelled one."""
import numpy as np
import pytest
import torch
from PIL import Image

from mexify.config import IGNORE_INDEX
from mexify.data import build_dataset, build_loader, parse_dataset_spec, unpadded
from mexify.errors import DataError
from mexify.metrics import ConfusionMatrix

H, W = 12, 16


def _img(path, seed=0, size=(W, H)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _mask(path, values, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).choice(np.asarray(values), size=(H, W)).astype(np.uint8)
    Image.fromarray(arr, mode="L").save(path)


def _labelled_pixels(ds, k):
    cm = ConfusionMatrix(k)
    for x, y in unpadded(build_loader(ds, batch_size=2, shuffle=False, num_workers=0)):
        cm.update(torch.zeros_like(y), y)
    return cm.total


def test_images_only_folder_reads_with_ignore_labels(tmp_path):
    for i in range(3):
        _img(tmp_path / "images" / f"f{i}.jpg", i, size=(W + 4 * i, H))  # sizes differ: padded batches too
    ds = build_dataset(f"folder:{tmp_path}?classes=4", split="val")
    assert len(ds) == 3 and ds.num_classes == 4 and ds.labelled is False and "unlabelled" in repr(ds)
    for i in range(3):
        image, mask = ds[i]
        assert image.shape[-2:] == mask.shape and mask.dtype == torch.int64
        assert bool((mask == IGNORE_INDEX).all())
    assert _labelled_pixels(ds, 4) == 0


def test_classes_from_classes_txt_or_the_caller(tmp_path):
    _img(tmp_path / "images" / "f0.png")
    assert build_dataset(f"folder:{tmp_path}", num_classes=6).num_classes == 6  # the model's count
    (tmp_path / "classes.txt").write_text("road\ncar\n")
    ds = build_dataset(f"folder:{tmp_path}", num_classes=6)
    assert ds.num_classes == 2 and ds.class_names == ["road", "car"]  # the folder's own word first


def test_without_classes_one_line_error_says_pass_classes(tmp_path):
    _img(tmp_path / "images" / "f0.png")
    with pytest.raises(DataError) as exc:
        build_dataset(f"folder:{tmp_path}")
    text = str(exc.value)
    assert "\n" not in text and "?classes=N" in text and "no labels" in text


def test_per_split_layout_without_masks(tmp_path):
    for i in range(2):
        _img(tmp_path / "train" / "images" / f"t{i}.png", i)
        _mask(tmp_path / "train" / "masks" / f"t{i}.png", [0, 1], i)
        _img(tmp_path / "test" / "images" / f"s{i}.png", i)
    train = build_dataset(f"folder:{tmp_path}?classes=2", split="train")
    test = build_dataset(f"folder:{tmp_path}?classes=2", split="test")
    assert train.labelled and _labelled_pixels(train, 2) == 2 * H * W
    assert not test.labelled and len(test) == 2 and _labelled_pixels(test, 2) == 0


def test_labels_0_ignores_existing_masks(tmp_path):
    for i in range(8):
        _img(tmp_path / "images" / f"f{i}.png", i)
        _mask(tmp_path / "masks" / f"f{i}.png", [0, 1, 2], i)
    assert _labelled_pixels(build_dataset(f"folder:{tmp_path}?classes=3", split="val"), 3) == 8 * H * W
    ds = build_dataset(f"folder:{tmp_path}?classes=3&labels=0", split="val")
    assert not ds.labelled and _labelled_pixels(ds, 3) == 0
    # calib / test halves are the same images with or without labels
    for split in ("calib", "test"):
        with_labels = build_dataset(f"folder:{tmp_path}?classes=3", split=split)
        without = build_dataset(f"folder:{tmp_path}?classes=3&labels=0", split=split)
        names = [with_labels.describe(i) for i in range(len(with_labels))]
        assert names and names == [without.describe(i) for i in range(len(without))]
    with pytest.raises(DataError, match=r"\?classes=N"):  # masks not read: nothing to count classes in
        build_dataset(f"folder:{tmp_path}?labels=0")
    with pytest.raises(DataError, match="labels"):
        parse_dataset_spec(f"folder:{tmp_path}?labels=maybe")


def test_some_masks_missing_is_still_an_error_naming_the_file(tmp_path):
    _img(tmp_path / "images" / "f0.png")
    _img(tmp_path / "images" / "f1.png", 1)
    _mask(tmp_path / "masks" / "f0.png", [0, 1])
    with pytest.raises(DataError) as exc:
        build_dataset(f"folder:{tmp_path}?classes=2")
    assert "f1.png" in str(exc.value) and "labels=0" in str(exc.value) and "skip_bad=1" in str(exc.value)
    assert len(build_dataset(f"folder:{tmp_path}?classes=2&skip_bad=1")) == 1
    assert len(build_dataset(f"folder:{tmp_path}?classes=2&labels=0")) == 2
