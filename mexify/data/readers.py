"""Readers for the dataset layouts users have on disk.

- ``voc:ROOT``: Pascal VOC 2012 (``JPEGImages/``, ``SegmentationClass/``,
  ``ImageSets/Segmentation/<split>.txt``) and SBD-style augmented lists
  (``SegmentationClassAug/`` and lists of ``image mask`` path pairs).
- ``cityscapes:ROOT``: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
  ``gtFine/<split>/<city>/*_gtFine_labelIds.png``; label ids map to the 19 train ids.
- ``ade20k:ROOT``: ``ADEChallengeData2016/{images,annotations}/{training,validation}``;
  150 classes, label 0 (other) is ignored, k maps to k-1.
- ``folder:ROOT``: ``images/`` + ``masks/`` with matching stems (or ``ROOT/<split>/images``
  and ``ROOT/<split>/masks``); palette or grayscale PNG masks; optional ``classes.txt``. Without
  a ``masks/`` folder (or with ``?labels=0``) the images are read without labels: every mask
  pixel is :data:`~mexify.config.IGNORE_INDEX`.

``calib`` and ``test`` are disjoint halves of the validation split of every layout (a folder
dataset without ``calib/`` or ``test/`` folders included), chosen by a fixed hash of the image
file name; ``?calib_fraction=0.3`` moves the boundary. So a policy calibrated on ``calib`` is
judged on images it never saw.

Every label value is checked: values that the layout does not define raise a
:class:`~mexify.errors.DataError` naming the file, as do unreadable files, missing
masks and masks whose size differs from their image. ``skip_bad=1`` in the spec
turns these into a logged warning and the sample is skipped.
"""
from __future__ import annotations

import logging
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mexify.config import IGNORE_INDEX
from mexify.data.base import SegDataset
from mexify.data.spec import DatasetSpec, OptionReader
from mexify.data.transforms import build_transform
from mexify.errors import DataError

if TYPE_CHECKING:  # PIL is imported where images are read (it is slow to import)
    from PIL import Image

log = logging.getLogger(__name__)

__all__ = [
    "BUILDERS",
    "FileSegDataset",
    "VOC_CLASSES",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_ID_TO_TRAIN_ID",
    "OPTIONS",
    "check_options",
    "read_image",
    "read_rgb",
    "read_mask",
]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff")
_INVALID = -1

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]
# gtFine labelIds -> train ids (cityscapesScripts labels.py); every other id in 0..33 is ignored
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}


# --------------------------------------------------------------------------- file access


def read_image(path: Path) -> torch.Tensor:
    """Read an RGB image as float32 ``(3, H, W)`` in [0, 1] (see :func:`read_rgb`).

    Raises:
        DataError: missing or unreadable file, or one too large to decode safely (the path is named).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} does not exist", "check the dataset root and its list files")
    arr = np.asarray(read_rgb(path), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


_BAD_FILE = "the file is corrupt or not an image; re-export it or pass skip_bad=1"


def read_rgb(path: Union[Path, BinaryIO], hint: str = _BAD_FILE, name: Optional[str] = None) -> "Image.Image":
    """Open an image file (or an open binary file: a request's body) as 8-bit RGB; ``name`` names it in errors.

    16-bit and 32-bit grayscale (``I;16``, ``I``) and float (``F``) images are scaled from their
    type's range (0..65535, or 0..1 for float) to 0..255, not clipped to white; values outside
    that range are scaled from the image's own minimum and maximum. An image with more pixels
    than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is refused.

    Raises:
        DataError: an unreadable file or a decompression bomb, naming the file (``hint`` says what to do).
    """
    from PIL import Image, UnidentifiedImageError

    path = path if hasattr(path, "read") else Path(path)
    what = name or str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return _eight_bit(im) if im.mode in _WIDE_MODES else im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {what} is too large to decode safely ({e})",
                        f"resize it below {Image.MAX_IMAGE_PIXELS} pixels; or, if you trust the file, raise "
                        "PIL.Image.MAX_IMAGE_PIXELS in Python") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        text = str(e).replace(repr(path), "").strip() if hasattr(path, "read") else str(e)  # no "<_io.BytesIO object at ...>"
        raise DataError(f"cannot read image {what}: {text}", hint) from e


_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _eight_bit(im: "Image.Image") -> "Image.Image":
    """A 16/32-bit integer or float grayscale image as 8-bit RGB, scaled from its value range."""
    from PIL import Image

    arr = np.asarray(im, dtype=np.float64)
    top = 1.0 if im.mode == "F" else 65535.0
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, top)
    if lo < 0 or hi > top or not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo if hi > lo else 1.0)
    else:
        arr = arr / top
    gray = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def read_mask(path: Path) -> np.ndarray:
    """Read a label mask (palette ``P``, grayscale ``L`` or 16-bit ``I;16``/``I``) as an int64 array ``(H, W)``.

    Palette masks are read as their palette indices, not their colours.

    Raises:
        DataError: missing, unreadable or RGB mask (the path is named).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask file {path} does not exist", "every image needs a mask with the same stem; or pass skip_bad=1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            mode = im.mode
            if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA", "HSV"):
                raise DataError(
                    f"mask {path} is a {mode} image, not a label map",
                    "save masks as palette (P) or grayscale (L) PNGs whose pixel values are class indices",
                )
            arr = np.asarray(im, dtype=np.int64)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"mask {path} is too large to decode safely ({e})", "resize it with its image") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read mask {path}: {e}", _BAD_FILE) from e
    if arr.ndim != 2:
        raise DataError(f"mask {path} has shape {arr.shape}, expected (H, W)", "save masks as single-channel PNGs")
    return arr


def _lut(size: int, mapping: Dict[int, int], ignore: Sequence[int] = ()) -> np.ndarray:
    lut = np.full(size, _INVALID, dtype=np.int64)
    for k, v in mapping.items():
        lut[k] = v
    for k in ignore:
        lut[k] = IGNORE_INDEX
    return lut


class FileSegDataset(SegDataset):
    """Image/mask pairs on disk with a label lookup table.

    Args:
        pairs: ``(image_path, mask_path)`` per sample; a mask path of None reads the image without
            labels (a mask of :data:`~mexify.config.IGNORE_INDEX` everywhere).
        lut: raw mask value -> train id (``255`` ignore, ``-1`` invalid value).
        num_classes: number of classes.
        class_names: class names.
        valid_hint: what the valid raw values are (for the error message).
        transform: joint transform.
        skip_bad: skip unreadable samples with a warning instead of raising.
        split: the split these files belong to.
    """

    def __init__(
        self,
        pairs: Sequence[Tuple[Path, Optional[Path]]],
        lut: np.ndarray,
        num_classes: int,
        class_names: Sequence[str],
        valid_hint: str,
        transform=None,
        skip_bad: bool = False,
        split: str = "train",
        root: Optional[Path] = None,
    ):
        super().__init__(num_classes, class_names, transform=transform, skip_bad=skip_bad)
        self.pairs = [(Path(a), None if b is None else Path(b)) for a, b in pairs]
        self.labelled = any(b is not None for _, b in self.pairs)
        self.lut = lut
        self.valid_hint = valid_hint
        self.split = split
        self.root = root

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self, index: int) -> str:
        return str(self.pairs[index][0])

    def load(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        img_path, mask_path = self.pairs[index]
        image = read_image(img_path)
        if mask_path is None:  # no labels: every pixel ignored
            return image, torch.full(tuple(image.shape[-2:]), IGNORE_INDEX, dtype=torch.int64)
        raw = read_mask(mask_path)
        if tuple(raw.shape) != tuple(image.shape[-2:]):
            raise DataError(
                f"mask {mask_path} is {raw.shape[1]}x{raw.shape[0]} but image {img_path} is {image.shape[-1]}x{image.shape[-2]}",
                "masks must have the size of their image (W x H); re-export the mask",
            )
        if raw.min() < 0 or raw.max() >= len(self.lut):
            bad = np.unique(raw[(raw < 0) | (raw >= len(self.lut))])[:8]
            raise DataError(f"mask {mask_path} has label values {bad.tolist()} out of range", self.valid_hint)
        mapped = self.lut[raw]
        if (mapped == _INVALID).any():
            bad = np.unique(raw[mapped == _INVALID])[:8]
            raise DataError(f"mask {mask_path} has label values {bad.tolist()} out of range", self.valid_hint)
        return image, torch.from_numpy(mapped)

    def __repr__(self) -> str:
        labels = "" if self.labelled else ", unlabelled"
        return f"{type(self).__name__}(root={self.root}, split={self.split!r}, n={len(self)}, classes={self.num_classes}{labels})"


# --------------------------------------------------------------------------- helpers shared by builders

_COMMON = ("split", "skip_bad", "base_size", "crop_size", "calib_fraction")
HELD_OUT = ("calib", "test")  # disjoint halves of the validation split
OPTIONS: Dict[str, Tuple[str, ...]] = {
    "voc": _COMMON + ("list", "masks"),
    "cityscapes": _COMMON,
    "ade20k": _COMMON,
    "folder": _COMMON + ("classes", "reduce_zero", "labels"),
}
"""The options each reader's spec takes (``voc:PATH?list=...``)."""


def check_options(spec: DatasetSpec) -> None:
    """Check a reader's spec without reading the disk: a path, known options, values of the right type.

    Raises:
        DataError: what is wrong, naming the option and the spec.
    """
    if not spec.target:
        raise DataError(f"dataset spec {str(spec)!r} has no path", f"write it as {spec.scheme}:/path/to/dataset")
    o = OptionReader(spec, OPTIONS[spec.scheme])
    o.bool("skip_bad", False)
    o.size("base_size", None)
    o.size("crop_size", None)
    o.float("calib_fraction", 0.5, lo=0.0, hi=1.0)
    if spec.scheme == "folder":
        o.int("classes", None, lo=1)
        o.bool("reduce_zero", False)
        o.bool("labels", True)


def _held_out(pairs: List[Tuple[Path, Path]], split: str, o: OptionReader) -> List[Tuple[Path, Path]]:
    """For ``calib`` and ``test``: the validation samples on their side of a fixed hash of the file name.

    A sample is in ``calib`` when ``crc32(image file name) / 2**32 < calib_fraction`` (option, default
    0.5), else in ``test``: the halves are disjoint, the same on every machine and in any listing
    order, and a sample keeps its side when others are added. Other splits pass through.
    """
    if split not in HELD_OUT:
        return pairs
    fraction = o.float("calib_fraction", 0.5, lo=0.0, hi=1.0)
    in_calib = [zlib.crc32(img.name.encode()) / 2**32 < fraction for img, _ in pairs]
    return [p for p, c in zip(pairs, in_calib) if c == (split == "calib")]


def _root(spec: DatasetSpec) -> Path:
    if not spec.target:
        raise DataError(f"dataset spec {str(spec)!r} has no path", f"write it as {spec.scheme}:/path/to/dataset")
    root = Path(spec.target).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset root {root} (from {str(spec)!r}) is not a directory", "check the path after the scheme")
    return root


def _transform(o: OptionReader, train: bool, crop_size, base_size, default_base, default_crop):
    base_size = o.size("base_size", base_size)
    crop_size = o.size("crop_size", crop_size)
    if base_size is None:
        base_size = default_base
    if crop_size is None:
        crop_size = default_crop
    return build_transform(train, base_size=base_size, crop_size=crop_size if train else None)


def _drop_missing(pairs: List[Tuple[Path, Path]], skip_bad: bool, what: str,
                  hint: str = "fix the list or the files, or pass skip_bad=1 to skip such samples") -> List[Tuple[Path, Path]]:
    out = []
    for img, mask in pairs:
        missing = img if not img.is_file() else (mask if not mask.is_file() else None)
        if missing is None:
            out.append((img, mask))
            continue
        kind = "image" if missing is img else "mask"
        msg = f"{kind} file {missing} listed in {what} does not exist"
        if not skip_bad:
            raise DataError(msg, hint)
        log.warning("skipping: %s", msg)
    return out


def _empty(pairs, spec: DatasetSpec, split: str, where: Path):
    if not pairs:
        raise DataError(f"no samples found for split {split!r} of {str(spec)!r} under {where}", "check the layout described in docs/data.md")


# --------------------------------------------------------------------------- VOC


def _voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DataError(f"no JPEGImages/ folder under {root}", "point voc: at VOCdevkit/VOC2012 (the folder holding JPEGImages/ and SegmentationClass/)")


def _voc_split(split: str) -> str:
    return "val" if split in HELD_OUT else split


def build_voc(spec: DatasetSpec, split: str = "train", train: bool = False, crop_size=None, base_size=None) -> FileSegDataset:
    """Pascal VOC 2012 / SBD-style lists (``?list=PATH`` or ``split=train_aug``; ``?masks=DIR``)."""
    o = OptionReader(spec, OPTIONS["voc"])
    root = _voc_root(_root(spec))
    requested = o.get("split", split)
    split = _voc_split(requested)
    skip_bad = o.bool("skip_bad", False)
    if o.has("list"):
        lst = Path(o.get("list", "")).expanduser()
        if not lst.is_absolute():
            lst = root / lst
        candidates = [lst]
    else:
        candidates = [
            root / "ImageSets" / "Segmentation" / f"{split}.txt",
            root / "ImageSets" / "SegmentationAug" / f"{split}.txt",
            root / f"{split}.txt",
        ]
    lst = next((c for c in candidates if c.is_file()), None)
    if lst is None:
        raise DataError(
            f"no list file for split {split!r} of {str(spec)!r}; looked for {', '.join(str(c) for c in candidates)}",
            "VOC lists live in ImageSets/Segmentation/<split>.txt; pass ?list=PATH for SBD-style lists",
        )
    mask_dir = o.get("masks", "")
    if not mask_dir:
        aug = root / "SegmentationClassAug"
        mask_dir = "SegmentationClassAug" if ("aug" in lst.stem.lower() and aug.is_dir()) else "SegmentationClass"
    pairs = []
    for lineno, line in enumerate(lst.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 1:
            stem = parts[0]
            pairs.append((root / "JPEGImages" / f"{stem}.jpg", root / mask_dir / f"{stem}.png"))
        elif len(parts) == 2:
            pairs.append((root / parts[0].lstrip("/"), root / parts[1].lstrip("/")))
        else:
            raise DataError(f"line {lineno} of {lst} has {len(parts)} fields", "each line is an image id, or 'image_path mask_path'")
    pairs = _held_out(_drop_missing(pairs, skip_bad, str(lst)), requested, o)
    _empty(pairs, spec, requested, lst)
    lut = _lut(256, {i: i for i in range(21)}, ignore=[255])
    tf = _transform(o, train, crop_size, base_size, 512, 512)
    return FileSegDataset(pairs, lut, 21, VOC_CLASSES, "VOC masks hold 0..20 and 255 (boundary, ignored)", tf, skip_bad, split, root)


# --------------------------------------------------------------------------- Cityscapes


def build_cityscapes(spec: DatasetSpec, split: str = "train", train: bool = False, crop_size=None, base_size=None) -> FileSegDataset:
    """Cityscapes gtFine (label ids -> 19 train ids; others ignored)."""
    o = OptionReader(spec, _COMMON)
    root = _root(spec)
    requested = o.get("split", split)
    split = "val" if requested in HELD_OUT else requested
    skip_bad = o.bool("skip_bad", False)
    img_dir = root / "leftImg8bit" / split
    if not img_dir.is_dir():
        raise DataError(f"no folder {img_dir} for split {split!r}", "point cityscapes: at the folder holding leftImg8bit/ and gtFine/")
    pairs = []
    for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
        stem = img.name[: -len("_leftImg8bit.png")]
        pairs.append((img, root / "gtFine" / split / img.parent.name / f"{stem}_gtFine_labelIds.png"))
    pairs = _held_out(_drop_missing(pairs, skip_bad, str(img_dir)), requested, o)
    _empty(pairs, spec, requested, img_dir)
    lut = _lut(256, CITYSCAPES_ID_TO_TRAIN_ID, ignore=[i for i in range(34) if i not in CITYSCAPES_ID_TO_TRAIN_ID] + [255])
    tf = _transform(o, train, crop_size, base_size, (1024, 2048), (512, 1024))
    return FileSegDataset(pairs, lut, 19, CITYSCAPES_CLASSES, "gtFine labelIds hold 0..33 (and 255)", tf, skip_bad, split, root)


# --------------------------------------------------------------------------- ADE20K


def _ade_names(root: Path) -> List[str]:
    info = root / "objectInfo150.txt"
    names = [f"class_{i}" for i in range(1, 151)]
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) >= 5 and parts[0].strip().isdigit():
                idx = int(parts[0]) - 1
                if 0 <= idx < 150:
                    names[idx] = parts[4].split(",")[0].strip()
    return names


def build_ade20k(spec: DatasetSpec, split: str = "train", train: bool = False, crop_size=None, base_size=None) -> FileSegDataset:
    """ADE20K SceneParsing (ADEChallengeData2016): 150 classes; 0 ignored, k -> k-1."""
    o = OptionReader(spec, _COMMON)
    root = _root(spec)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    split = o.get("split", split)
    folder = {"train": "training", "val": "validation", "calib": "validation", "test": "validation"}.get(split, split)
    skip_bad = o.bool("skip_bad", False)
    img_dir = root / "images" / folder
    if not img_dir.is_dir():
        raise DataError(f"no folder {img_dir} for split {split!r}", "point ade20k: at ADEChallengeData2016 (holding images/ and annotations/)")
    pairs = [(p, root / "annotations" / folder / f"{p.stem}.png") for p in sorted(img_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTS]
    pairs = _held_out(_drop_missing(pairs, skip_bad, str(img_dir)), split, o)
    _empty(pairs, spec, split, img_dir)
    lut = _lut(256, {k: k - 1 for k in range(1, 151)}, ignore=[0, 255])
    tf = _transform(o, train, crop_size, base_size, 512, 512)
    return FileSegDataset(pairs, lut, 150, _ade_names(root), "ADE20K annotations hold 0 (other, ignored) and 1..150", tf, skip_bad, split, root)


# --------------------------------------------------------------------------- generic folder


def _folder_dirs(root: Path, split: str) -> Tuple[Path, Path]:
    if (root / split / "images").is_dir():
        return root / split / "images", root / split / "masks"
    if (root / "images").is_dir():
        return root / "images", root / "masks"
    raise DataError(f"no images/ folder under {root} (nor {root / split / 'images'})", "lay the data out as ROOT/images/ + ROOT/masks/ with matching file stems")


def build_folder(spec: DatasetSpec, split: str = "train", train: bool = False, crop_size=None, base_size=None,
                 num_classes: Optional[int] = None) -> FileSegDataset:
    """Generic ``images/`` + ``masks/`` folder (``?classes=N``, ``?reduce_zero=1`` to ignore 0).

    Without a ``masks/`` folder, or with ``?labels=0`` (existing masks are then not read), the images
    come without labels: every mask pixel is :data:`~mexify.config.IGNORE_INDEX`. With a ``masks/``
    folder, every image needs its mask (``skip_bad=1`` skips those without one).

    Args:
        num_classes: the class count to use when neither ``?classes=N`` nor ``classes.txt`` gives one
            (the model's, when the caller has it); without it, the largest label in the masks.

    Raises:
        DataError: no images, a missing mask, or no way to know the class count of a folder without
            labels (the message says to pass ``?classes=N``).
    """
    o = OptionReader(spec, OPTIONS["folder"])
    root = _root(spec)
    split = o.get("split", split)
    skip_bad = o.bool("skip_bad", False)
    own = (root / split / "images").is_dir()  # a folder of its own for this split, else calib/test halve val
    img_dir, mask_dir = _folder_dirs(root, "val" if split in HELD_OUT and not own else split)
    labelled = o.bool("labels", True) and mask_dir.is_dir()
    if not labelled:
        log.info("folder dataset %s: %s; reading the images without labels", root,
                 "labels=0" if mask_dir.is_dir() else f"no folder {mask_dir}")
    pairs = _folder_pairs(img_dir, mask_dir if labelled else None, skip_bad)
    if not own:
        pairs = _held_out(pairs, split, o)
    _empty(pairs, spec, split, img_dir)
    k, names = _folder_classes(o, root, img_dir, pairs if labelled else None, num_classes)
    if not labelled:
        lut, hint = _lut(256, {}, ignore=[IGNORE_INDEX]), "no masks are read (an unlabelled folder)"
    elif o.bool("reduce_zero", False):
        lut = _lut(256, {v: v - 1 for v in range(1, k + 1)}, ignore=[0, 255])
        hint = f"masks hold 0 (ignored) and 1..{k}, or 255 (ignored)"
    else:
        lut = _lut(256, {v: v for v in range(k)}, ignore=[255])
        hint = f"masks hold 0..{k - 1} and 255 (ignored); set ?classes=N or fix classes.txt if there are more classes"
    tf = _transform(o, train, crop_size, base_size, None, 512)
    return FileSegDataset(pairs, lut, k, names, hint, tf, skip_bad, split, root)


def _folder_pairs(img_dir: Path, mask_dir: Optional[Path], skip_bad: bool) -> List[Tuple[Path, Optional[Path]]]:
    """Every image of ``img_dir`` with its mask in ``mask_dir`` by file stem (None: no labels, no masks read)."""
    images = [p for p in sorted(img_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTS]
    if mask_dir is None:
        return [(p, None) for p in images]
    masks: Dict[str, Path] = {}
    for p in sorted(mask_dir.iterdir()):
        if p.suffix.lower() in MASK_EXTS:
            masks.setdefault(p.stem, p)
    pairs = [(p, masks.get(p.stem, mask_dir / f"{p.stem}.png")) for p in images]
    return _drop_missing(pairs, skip_bad, str(img_dir), "every image needs a mask with its file stem in "
                         f"{mask_dir}; pass skip_bad=1 to skip images without one, or labels=0 to read every image without labels")


def _folder_classes(o: OptionReader, root: Path, img_dir: Path, pairs: Optional[Sequence[Tuple[Path, Path]]],
                    num_classes: Optional[int]) -> Tuple[int, List[str]]:
    """The class count and names of a folder dataset: ``?classes=N``, else ``classes.txt``, else ``num_classes``
    (the caller's model), else the largest label in the masks (``pairs``; None: an unlabelled folder, an error)."""
    names: Optional[List[str]] = None
    for cand in (img_dir.parent / "classes.txt", root / "classes.txt"):
        if cand.is_file():
            names = [ln.strip() for ln in cand.read_text().splitlines() if ln.strip()]
            break
    k = o.int("classes", None, lo=1)
    if k is None and names:
        k = len(names)
    if k is None and num_classes:
        k = int(num_classes)
    if k is None and pairs is None:
        raise DataError(f"folder dataset {str(o.spec)!r} has no labels (no masks/ folder, or labels=0) and no classes.txt, "
                        "so its number of classes is unknown",
                        f"pass ?classes=N, the number of classes the model predicts (e.g. folder:{root}?classes=19)")
    if k is None:
        k = _infer_classes(pairs, o.bool("reduce_zero", False))
        log.warning("folder dataset %s: no classes.txt or ?classes=N; inferred %d classes from the masks", root, k)
    if names is None or len(names) != k:
        if names is not None:
            log.warning("classes.txt lists %d names but the dataset has %d classes; using generic names", len(names), k)
        names = [f"class_{i}" for i in range(k)]
    return k, names


def _infer_classes(pairs: Sequence[Tuple[Path, Path]], reduce_zero: bool) -> int:
    top = 0
    for _, mask in pairs:
        try:
            arr = read_mask(mask)
        except DataError:
            continue
        vals = arr[arr != IGNORE_INDEX]
        if vals.size:
            top = max(top, int(vals.max()))
    return max(1, top if reduce_zero else top + 1)


BUILDERS: Dict[str, Callable[..., FileSegDataset]] = {
    "voc": build_voc,
    "cityscapes": build_cityscapes,
    "ade20k": build_ade20k,
    "folder": build_folder,
}
