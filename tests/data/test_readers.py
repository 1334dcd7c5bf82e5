"""Readers on tiny files written in each on-disk layout."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from mexify.data import build_dataset
from mexify.data.readers import CITYSCAPES_ID_TO_TRAIN_ID
from mexify.errors import DataError

H, W = 12, 16


def _img(path, seed=0, size=(W, H)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _mask(path, arr, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(arr, dtype=np.uint8)
    if mode == "P":
        im = Image.fromarray(arr, mode="P")
        pal = np.random.default_rng(1).integers(0, 255, 768).astype(np.uint8).tolist()
        im.putpalette(pal)
        im.save(path)
    else:
        Image.fromarray(arr, mode="L").save(path)


def _labels(values, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice(np.asarray(values), size=(H, W))


# ----------------------------------------------------------------- VOC


def _voc(root, ids=("a", "b"), masks=None, split="train"):
    voc = root / "VOCdevkit" / "VOC2012"
    for i, stem in enumerate(ids):
        _img(voc / "JPEGImages" / f"{stem}.jpg", i)
        _mask(voc / "SegmentationClass" / f"{stem}.png", masks[i] if masks else _labels([0, 5, 20, 255], i), mode="P")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return voc


def test_voc_reads_palette_indices(tmp_path):
    lab = _labels([0, 5, 20, 255])
    _voc(tmp_path, ids=("a",), masks=[lab])
    ds = build_dataset(f"voc:{tmp_path}?base_size=16", split="train")
    assert ds.num_classes == 21 and ds.class_names[15] == "person"
    img, mask = ds[0]
    assert img.shape == (3, H, W) and img.dtype == torch.float32
    assert mask.dtype == torch.int64
    assert torch.equal(mask, torch.from_numpy(lab).long())


def test_voc_sbd_pair_list(tmp_path):
    voc = _voc(tmp_path, ids=("a",))
    lab = _labels([1, 2, 255], 3)
    _mask(voc / "SegmentationClassAug" / "a.png", lab)
    (voc / "train_aug.txt").write_text("/JPEGImages/a.jpg /SegmentationClassAug/a.png\n")
    ds = build_dataset(f"voc:{voc}?split=train_aug&base_size=16")
    assert torch.equal(ds[0][1], torch.from_numpy(lab).long())


def test_voc_out_of_range_label_names_file(tmp_path):
    _voc(tmp_path, ids=("a",), masks=[_labels([0, 21, 3])])
    ds = build_dataset(f"voc:{tmp_path}?base_size=16")
    with pytest.raises(DataError, match=r"SegmentationClass/a\.png.*\[21\]"):
        ds[0]


def test_voc_missing_mask_names_file_and_skip(tmp_path, caplog):
    voc = _voc(tmp_path, ids=("a", "b"))
    (voc / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(DataError, match=r"b\.png"):
        build_dataset(f"voc:{tmp_path}")
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(f"voc:{tmp_path}?skip_bad=1")
    assert len(ds) == 1 and "b.png" in caplog.text


def test_corrupt_image_names_file_and_skip(tmp_path, caplog):
    voc = _voc(tmp_path, ids=("a", "b"))
    (voc / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg at all")
    ds = build_dataset(f"voc:{tmp_path}?base_size=16")
    with pytest.raises(DataError, match=r"JPEGImages/a\.jpg"):
        ds[0]
    ds = build_dataset(f"voc:{tmp_path}?base_size=16&skip_bad=1")
    with caplog.at_level(logging.WARNING):
        img, mask = ds[0]  # falls through to b
    assert "a.jpg" in caplog.text and img.shape == (3, H, W)


def test_size_mismatch_names_both_files(tmp_path):
    voc = _voc(tmp_path, ids=("a",))
    _mask(voc / "SegmentationClass" / "a.png", np.zeros((H + 2, W), np.uint8))
    ds = build_dataset(f"voc:{tmp_path}")
    with pytest.raises(DataError, match=r"a\.png.*a\.jpg"):
        ds[0]


def test_missing_list_file(tmp_path):
    _voc(tmp_path, ids=("a",))
    with pytest.raises(DataError, match="val"):
        build_dataset(f"voc:{tmp_path}", split="val")


# ----------------------------------------------------------------- Cityscapes


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    ids = np.arange(34)
    raw = np.resize(np.concatenate([ids, [255]]), (H, W))
    _img(tmp_path / "leftImg8bit" / "val" / "ulm" / "ulm_000000_000019_leftImg8bit.png")
    _mask(tmp_path / "gtFine" / "val" / "ulm" / "ulm_000000_000019_gtFine_labelIds.png", raw)
    ds = build_dataset(f"cityscapes:{tmp_path}?split=val&base_size={H}x{W}")
    assert ds.num_classes == 19 and ds.class_names[0] == "road"
    mask = ds[0][1].numpy()
    expect = np.array([CITYSCAPES_ID_TO_TRAIN_ID.get(int(v), 255) for v in raw.ravel()]).reshape(H, W)
    assert np.array_equal(mask, expect)
    assert mask[raw == 7].tolist() == [0] * int((raw == 7).sum())  # road
    assert set(np.unique(mask[raw == 26])) == {13}  # car
    assert set(np.unique(mask[raw == 0])) == {255}


def test_cityscapes_bad_label_id(tmp_path):
    _img(tmp_path / "leftImg8bit" / "train" / "aachen" / "x_leftImg8bit.png")
    _mask(tmp_path / "gtFine" / "train" / "aachen" / "x_gtFine_labelIds.png", np.full((H, W), 40))
    ds = build_dataset(f"cityscapes:{tmp_path}?base_size={H}x{W}")
    with pytest.raises(DataError, match=r"x_gtFine_labelIds\.png.*\[40\]"):
        ds[0]


# ----------------------------------------------------------------- ADE20K


def test_ade20k_zero_is_ignored_and_shifted(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    raw = _labels([0, 1, 75, 150])
    _img(ade / "images" / "validation" / "ADE_val_00000001.jpg")
    _mask(ade / "annotations" / "validation" / "ADE_val_00000001.png", raw)
    ds = build_dataset(f"ade20k:{tmp_path}?base_size=16", split="val")
    assert ds.num_classes == 150
    mask = ds[0][1].numpy()
    assert np.all(mask[raw == 0] == 255)
    assert np.all(mask[raw == 1] == 0) and np.all(mask[raw == 150] == 149)


def test_ade20k_out_of_range(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    _img(ade / "images" / "training" / "t1.jpg")
    _mask(ade / "annotations" / "training" / "t1.png", np.full((H, W), 151))
    ds = build_dataset(f"ade20k:{ade}?base_size=16")
    with pytest.raises(DataError, match=r"t1\.png"):
        ds[0]


# ----------------------------------------------------------------- generic folder


def test_folder_palette_and_classes_txt(tmp_path):
    raw = _labels([0, 1, 2, 255])
    _img(tmp_path / "images" / "s1.png")
    _mask(tmp_path / "masks" / "s1.png", raw, mode="P")
    (tmp_path / "classes.txt").write_text("floor\nbox\nperson\n")
    ds = build_dataset(f"folder:{tmp_path}")
    assert ds.num_classes == 3 and ds.class_names == ["floor", "box", "person"]
    assert torch.equal(ds[0][1], torch.from_numpy(raw).long())


def test_folder_infers_classes_and_rejects_rgb_mask(tmp_path):
    _img(tmp_path / "images" / "s1.jpg")
    _mask(tmp_path / "masks" / "s1.png", _labels([0, 4]))
    ds = build_dataset(f"folder:{tmp_path}")
    assert ds.num_classes == 5
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "masks" / "s1.png")
    with pytest.raises(DataError, match=r"s1\.png is a RGB image"):
        build_dataset(f"folder:{tmp_path}?classes=5")[0]


def test_folder_label_beyond_classes(tmp_path):
    _img(tmp_path / "images" / "s1.jpg")
    _mask(tmp_path / "masks" / "s1.png", _labels([0, 1, 7]))
    (tmp_path / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"s1\.png.*\[7\]"):
        build_dataset(f"folder:{tmp_path}")[0]


def test_folder_missing_mask(tmp_path):
    _img(tmp_path / "images" / "s1.jpg")
    _img(tmp_path / "images" / "s2.jpg")
    _mask(tmp_path / "masks" / "s1.png", _labels([0, 1]))
    with pytest.raises(DataError, match=r"s2\.png"):
        build_dataset(f"folder:{tmp_path}?classes=2")
    assert len(build_dataset(f"folder:{tmp_path}?classes=2&skip_bad=1")) == 1


def test_folder_train_transform_keeps_labels_valid(tmp_path):
    _img(tmp_path / "images" / "s1.jpg", size=(40, 30))
    _mask(tmp_path / "masks" / "s1.png", np.random.default_rng(0).choice([0, 1, 2], (30, 40)))
    ds = build_dataset(f"folder:{tmp_path}?classes=3", train=True, crop_size=24)
    img, mask = ds[0]
    assert img.shape == (3, 24, 24) and mask.shape == (24, 24)
    assert set(mask.unique().tolist()) <= {0, 1, 2, 255}


# ----------------------------------------------------------------- spec strings


def test_unknown_scheme_lists_valid_ones():
    with pytest.raises(DataError) as ei:
        build_dataset("coco:/data")
    text = str(ei.value)
    for s in ("synthetic:", "voc:", "cityscapes:", "ade20k:", "folder:"):
        assert s in text


def test_unknown_option_suggests_nearest(tmp_path):
    with pytest.raises(DataError, match="classes"):
        build_dataset("synthetic:scenes?clases=4")


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        build_dataset(f"voc:{tmp_path / 'nope'}")


def _files(ds):
    return {ds.describe(i).rsplit("/", 1)[-1] for i in range(len(ds))}


@pytest.mark.parametrize("layout", ["ade20k", "voc", "folder"])
def test_calib_and_test_are_disjoint_halves_of_validation(tmp_path, layout):
    names = [f"v{i:02d}" for i in range(24)]
    if layout == "ade20k":
        root = tmp_path / "ADEChallengeData2016"
        for i, n in enumerate(names):
            _img(root / "images" / "validation" / f"{n}.jpg", i)
            _mask(root / "annotations" / "validation" / f"{n}.png", _labels([1, 2], i))
        spec = f"ade20k:{root}"
    elif layout == "voc":
        _voc(tmp_path, ids=names, split="val")
        spec = f"voc:{tmp_path}"
    else:
        for i, n in enumerate(names):
            _img(tmp_path / "images" / f"{n}.png", i)
            _mask(tmp_path / "masks" / f"{n}.png", _labels([0, 1], i))
        spec = f"folder:{tmp_path}?classes=2"
    val, calib, test = (_files(build_dataset(spec, split=s)) for s in ("val", "calib", "test"))
    assert calib and test and not calib & test and calib | test == val
    assert _files(build_dataset(spec, split="calib")) == calib  # the same halves every time
    sep = "&" if "?" in spec else "?"
    assert _files(build_dataset(f"{spec}{sep}calib_fraction=1", split="calib")) == val


def test_folder_per_split_layout(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            _img(tmp_path / split / "images" / f"{split}{i}.png", i)
            _mask(tmp_path / split / "masks" / f"{split}{i}.png", _labels([0, 1, 2], i))
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    assert len(build_dataset(f"folder:{tmp_path}", split="train")) == 3
    val = build_dataset(f"folder:{tmp_path}", split="val")
    assert len(val) == 2 and val.class_names == ["a", "b", "c"]


def test_error_in_a_loader_worker_is_one_line(tmp_path):
    from mexify.data import build_loader

    _img(tmp_path / "images" / "s1.jpg")
    _mask(tmp_path / "masks" / "s1.png", _labels([0, 1, 7]))
    (tmp_path / "classes.txt").write_text("a\nb\n")
    loader = build_loader(build_dataset(f"folder:{tmp_path}"), batch_size=1, shuffle=False, num_workers=1)
    with pytest.raises(DataError) as exc:
        next(iter(loader))
    assert "\n" not in exc.value.message and "s1.png" in exc.value.message and "[7]" in exc.value.message
    assert not exc.value.message.startswith("Caught") and "Traceback" not in exc.value.message
