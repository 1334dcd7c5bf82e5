"""Image files in, palette PNG masks out: what ``mexify predict`` does, as library functions."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from mexify.data.readers import read_rgb
from mexify.data.transforms import SegTransform
from mexify.errors import DataError
from mexify.files import check_writable, replace_dir, writing
from mexify.runtime import EarlyExitRuntime

log = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "PREDICTIONS_FILE", "palette", "collect_images", "read_image", "to_tensor",
           "predict_images", "predictions_out", "PredictReport"]

PREDICTIONS_FILE = "predictions.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")

Warn = Callable[[str], None]


def palette(n: int = 256) -> List[int]:
    """The Pascal VOC colour map (class 0 black), flattened RGB for ``Image.putpalette``."""
    out = []
    for c in range(n):
        r = g = b = 0
        v = c
        for shift in range(7, -1, -1):
            r |= (v & 1) << shift
            g |= ((v >> 1) & 1) << shift
            b |= ((v >> 2) & 1) << shift
            v >>= 3
        out += [r, g, b]
    return out


def collect_images(paths: Sequence[Path], warn: Warn = log.warning) -> List[Path]:
    """Image files named directly or found (not recursively) in the given directories, in order.

    Raises:
        DataError: a path that does not exist, or no image at all.
    """
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                warn(f"no image files in {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p} does not exist", "pass image files or directories of images")
    if not files:
        raise DataError("no images to predict on", f"image files end with one of {', '.join(IMAGE_SUFFIXES)}")
    return files


def read_image(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB (:func:`mexify.data.readers.read_rgb`: 16-bit images scaled, bombs refused).

    Raises:
        DataError: the file is not a readable image, or too large to decode safely.
    """
    return read_rgb(path, "check that it is a PNG/JPEG image, or pass --skip-bad")


def to_tensor(image: Image.Image, size: Tuple[int, int]) -> torch.Tensor:
    """RGB image -> normalised float32 ``(3, H, W)`` at ``size``, like the eval transform."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    dummy = torch.zeros(arr.shape[-2:], dtype=torch.long)
    return SegTransform(train=False, base_size=size)(arr, dummy)[0]


def _out_name(path: Path, used: Dict[str, int]) -> str:
    stem = path.stem
    n = used.get(stem, 0)
    used[stem] = n + 1
    return f"{stem}.png" if n == 0 else f"{stem}-{n}.png"


def _batches(files: Sequence[Path], batch_size: int, skip_bad: bool, warn: Warn) -> Iterator[List[Tuple[Path, Image.Image]]]:
    batch: List[Tuple[Path, Image.Image]] = []
    for f in files:
        try:
            batch.append((f, read_image(f)))
        except DataError as e:
            if not skip_bad:
                raise
            warn(f"skipped {f}: {e.message}")
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _save_mask(mask: torch.Tensor, image: Image.Image, pal: List[int], path: Path) -> None:
    out = Image.fromarray(mask.numpy().astype(np.uint8), mode="P")
    if out.size != image.size:
        out = out.resize(image.size, Image.NEAREST)
    out.putpalette(pal)
    out.save(path)


_OUT = {"overwrite": True, "marker": PREDICTIONS_FILE, "what": f"predictions folder (it has no {PREDICTIONS_FILE})"}


def predictions_out(out: Path) -> ContextManager[Path]:
    """Claim ``out`` for a whole prediction run, before any work (:func:`mexify.files.writing`): it must be
    new, empty or an earlier predictions folder, which the run replaces as a whole; held locked.

    Raises:
        BundleError: a file, a non-empty folder without ``predictions.jsonl``, an unwritable place, or
        another mexify process writing it.
    """
    return writing(out, **_OUT)


def predict_images(
    runtime: EarlyExitRuntime,
    files: Sequence[Path],
    out: Path,
    size: Tuple[int, int],
    batch_size: int = 4,
    skip_bad: bool = False,
    warn: Warn = log.warning,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> "PredictReport":
    """Segment image files with early exits: a palette PNG mask per image plus ``predictions.jsonl`` in ``out``.

    The masks and ``predictions.jsonl`` are written into a new folder beside ``out`` that replaces
    ``out`` as a whole once every image is done (:func:`mexify.files.replace_dir`): a failed or
    interrupted run leaves an earlier run's results as they were.

    Args:
        runtime: the early-exit runtime (model and policy).
        files: image files (see :func:`collect_images`).
        out: output directory: new, empty or an earlier predictions folder (see :func:`predictions_out`).
        size: (H, W) the images are resized to before the model; masks are resized back.
        batch_size: images per forward pass.
        skip_bad: skip unreadable images (with ``warn``) instead of raising.
        progress: ``progress("predict", done, total)``.

    Returns:
        a :class:`PredictReport`: images, exit counts, mean FLOPs and the FLOPs speed-up, where the files are.

    Raises:
        DataError: an unreadable image without ``skip_bad``. BundleError: ``out`` may not be replaced.
    """
    out = Path(out)
    check_writable(out, **_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary: Dict[str, Any] = {}
    replace_dir(out, lambda tmp: summary.update(_predict_into(runtime, files, tmp, size, batch_size, skip_bad, warn, progress)))
    return PredictReport(out=str(out), predictions=str(out / PREDICTIONS_FILE), **summary)


@dataclasses.dataclass
class PredictReport:
    """What :func:`predict_images` wrote (``mexify predict``); ``to_dict`` is the ``--json`` output.

    Attributes:
        images: images segmented.
        out: the predictions folder; ``predictions``: its ``predictions.jsonl``.
        policy: the exit policy's name (``fixed-exit`` with a forced exit).
        exit_counts: images per exit, by exit name.
        mean_flops, original_flops, flops_speedup: FLOPs per image (None without an image) and the original model's.
        flops_convention: how FLOPs are counted.
        drift: these images against what calibration saw (``{"stats", "compared", "tests", "warnings", ...}``,
            :func:`mexify.runtime.drift_report`); None with a forced exit or before it is checked.
    """

    images: int
    out: str
    predictions: str
    policy: str
    exit_counts: Dict[str, int]
    mean_flops: Optional[float]
    original_flops: int
    flops_speedup: Optional[float]
    flops_convention: str
    drift: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _predict_into(runtime: EarlyExitRuntime, files: Sequence[Path], out: Path, size: Tuple[int, int], batch_size: int,
                  skip_bad: bool, warn: Warn, progress: Optional[Callable[[str, int, int], None]]) -> Dict[str, Any]:
    """:func:`predict_images` into the new folder ``out``."""
    model = runtime.model
    pal, used = palette(), {}
    counts = [0] * model.num_exits
    total_flops, done = 0, 0
    with open(out / PREDICTIONS_FILE, "w") as lines:
        for batch in _batches(files, max(1, batch_size), skip_bad, warn):
            res = runtime.predict_batch(torch.stack([to_tensor(im, size) for _, im in batch]))
            masks = res.masks.to("cpu", torch.uint8 if model.num_classes <= 256 else torch.int32)
            for j, (path, im) in enumerate(batch):
                p = res[j]
                name = _out_name(path, used)
                _save_mask(masks[j], im, pal, out / name)
                rec = {"file": str(path), "mask": name, "width": im.size[0], "height": im.size[1], **p.to_dict()}
                lines.write(json.dumps(rec) + "\n")
                counts[p.exit_index] += 1
                total_flops += p.flops
                done += 1
            if progress is not None:
                progress("predict", done, len(files))
    return {
        "images": done,
        "policy": getattr(runtime.policy, "name", type(runtime.policy).__name__),
        "exit_counts": dict(zip(model.exit_names, counts)),
        "mean_flops": total_flops / done if done else None,
        "original_flops": int(model.original_flops),
        "flops_speedup": (model.original_flops * done / total_flops) if total_flops else None,
        "flops_convention": "1 multiply-add = 1 FLOP, at the input size " + "x".join(map(str, size)),
    }
