"""`mexify predict`: early-exit segmentation of image files into palette PNG masks."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import typer

from mexify.cli._common import DeviceOpt, JsonOpt, console, err_console, print_json
from mexify.errors import DataError

try:
    from typing import Annotated
except ImportError:  # pragma: no cover
    from typing_extensions import Annotated  # type: ignore

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


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


def collect_images(paths: List[Path]) -> List[Path]:
    """Image files named directly or found (not recursively) in the given directories, in order.

    Raises:
        DataError: a path that does not exist, or no image at all.
    """
    files: List[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                err_console.print(f"[yellow]warning:[/] no image files in {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p} does not exist", "pass image files or directories of images")
    if not files:
        raise DataError("no images to predict on", f"image files end with one of {', '.join(IMAGE_SUFFIXES)}")
    return files


def read_image(path: Path) -> Any:
    """Open an image as RGB (PIL).

    Raises:
        DataError: the file is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}", "check that it is a PNG/JPEG image, or pass --skip-bad") from e


def to_tensor(image: Any, size: Tuple[int, int]) -> Any:
    """RGB PIL image -> normalised float32 ``(3, H, W)`` at ``size``, like the eval transform."""
    import numpy as np
    import torch

    from mexify.data.transforms import SegTransform

    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    dummy = torch.zeros(arr.shape[-2:], dtype=torch.long)
    return SegTransform(train=False, base_size=size)(arr, dummy)[0]


def _parse_size(text: Optional[str], default: Tuple[int, int]) -> Tuple[int, int]:
    if not text:
        return tuple(default)  # type: ignore[return-value]
    from mexify.errors import ConfigError

    try:
        if "x" in text.lower():
            h, w = text.lower().split("x", 1)
            return (int(h), int(w))
        return (int(text), int(text))
    except ValueError as e:
        raise ConfigError(f"--size {text!r} is not HxW or N", "e.g. --size 512x1024") from e


def _out_name(path: Path, used: Dict[str, int]) -> str:
    stem = path.stem
    n = used.get(stem, 0)
    used[stem] = n + 1
    return f"{stem}.png" if n == 0 else f"{stem}-{n}.png"


def _batches(files: List[Path], batch_size: int, skip_bad: bool) -> Iterator[List[Tuple[Path, Any]]]:
    batch: List[Tuple[Path, Any]] = []
    for f in files:
        try:
            batch.append((f, read_image(f)))
        except DataError as e:
            if not skip_bad:
                raise
            err_console.print(f"[yellow]warning:[/] skipped {f}: {e.message}")
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle directory (calibrated with `mexify calibrate`).")],
        images: Annotated[List[Path], typer.Argument(help="Image files or directories of images.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the PNG masks and predictions.jsonl.")],
        exit_: Annotated[
            Optional[str], typer.Option("--exit", help="Force every image to this exit (index, negative from the end, or name).")
        ] = None,
        size: Annotated[
            Optional[str], typer.Option("--size", help="Resize images to HxW (or N) before the model (default: the bundle's input size).")
        ] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 4,
        skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable images with a warning instead of stopping.")] = False,
        device: DeviceOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Segment images with early exits: a palette PNG mask per image plus predictions.jsonl."""
        import numpy as np
        import torch
        from PIL import Image

        import mexify
        from mexify.runtime import EarlyExitRuntime

        files = collect_images(list(images))
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = mexify.load(bundle, device=dev)
        forced: Any = None
        if exit_ is not None:
            forced = int(exit_) if exit_.lstrip("-").isdigit() else exit_
        elif model.config is None or model.config.policy is None:
            err_console.print(
                "[yellow]warning:[/] the bundle has no exit policy: every image uses the final exit "
                "(run `mexify calibrate` first, or pass --exit N)"
            )
            forced = -1
        rt = EarlyExitRuntime(model, exit=forced)
        hw = _parse_size(size, model.input_size)
        out.mkdir(parents=True, exist_ok=True)
        pal = palette()
        used: Dict[str, int] = {}
        counts = [0] * model.num_exits
        total_flops, done = 0, 0
        show = not json_out and os.environ.get("MEXIFY_NO_PROGRESS", "") in ("", "0")
        prog = None
        if show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            prog = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err_console, transient=True)
            task = prog.add_task("predict", total=len(files))
            prog.start()
        lines_path = out / "predictions.jsonl"
        try:
            with open(lines_path, "w") as lines:
                for batch in _batches(files, max(1, batch_size), skip_bad):
                    x = torch.stack([to_tensor(im, hw) for _, im in batch])
                    res = rt.predict_batch(x)
                    masks = res.masks.to("cpu", torch.uint8 if model.num_classes <= 256 else torch.int32)
                    for j, (path, im) in enumerate(batch):
                        p = res[j]
                        mask = Image.fromarray(masks[j].numpy().astype(np.uint8), mode="P")
                        if mask.size != im.size:
                            mask = mask.resize(im.size, Image.NEAREST)
                        mask.putpalette(pal)
                        name = _out_name(path, used)
                        mask.save(out / name)
                        rec = {"file": str(path), "mask": name, "width": im.size[0], "height": im.size[1], **p.to_dict()}
                        lines.write(json.dumps(rec) + "\n")
                        counts[p.exit_index] += 1
                        total_flops += p.flops
                        done += 1
                    if prog is not None:
                        prog.update(task, completed=done)
        finally:
            if prog is not None:
                prog.stop()
        summary = {
            "images": done,
            "out": str(out),
            "predictions": str(lines_path),
            "policy": getattr(rt.policy, "name", type(rt.policy).__name__),
            "exit_counts": dict(zip(model.exit_names, counts)),
            "mean_flops": total_flops / done if done else None,
            "original_flops": int(model.original_flops),
            "flops_speedup": (model.original_flops * done / total_flops) if total_flops else None,
            "flops_convention": "1 multiply-add = 1 FLOP, at the input size " + "x".join(map(str, hw)),
        }
        if json_out:
            print_json(summary)
            return
        from rich.table import Table

        t = Table(title=f"{done} images -> {out} (policy {summary['policy']})", title_justify="left")
        t.add_column("exit")
        t.add_column("images", justify="right")
        t.add_column("share", justify="right")
        for name, c in summary["exit_counts"].items():
            t.add_row(name, str(c), f"{100 * c / max(done, 1):.1f}%")
        console.print(t)
        if summary["flops_speedup"]:
            console.print(f"mean FLOPs speed-up {summary['flops_speedup']:.2f}x (1 multiply-add = 1 FLOP); masks and {lines_path.name} in {out}")
