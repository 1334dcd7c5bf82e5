"""`mexify predict`: early-exit segmentation of image files into palette PNG masks."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import typer
from rich.table import Table

from mexify import api
from mexify.cli._common import (Annotated, DeviceOpt, JsonOpt, TrustCodeOpt, TrustOpt, choice, console, count, lib_parser, print_json,
                                print_notes, stage_progress, trust_of, warn)


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
            Optional[Any], typer.Option("--size", parser=lib_parser(api.parse_image_size), metavar="HxW",
                                        help="Resize images to HxW (or N) before the model (default: the bundle's input size).")
        ] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", parser=count("--batch-size"), metavar="N", help="Images per forward pass.")] = 4,
        skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable images with a warning instead of stopping.")] = False,
        device: DeviceOpt = None,
        engine: Annotated[str, typer.Option("--engine", parser=choice(api.ENGINES, "engine"), metavar="ENGINE",
                                            help="torch (a bundle or pt2 export) or onnxruntime (an ONNX export).")] = "torch",
        trust_code: TrustCodeOpt = False,
        trust_pickle: TrustOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Segment images with early exits: a palette PNG mask per image plus predictions.jsonl."""
        with stage_progress(not json_out) as progress:
            report = api.predict(bundle, images, out=out, exit=exit_, size=size, batch_size=batch_size, skip_bad=skip_bad,
                                  device=device, warn=warn, progress=progress, trust=trust_of(trust_code, trust_pickle),
                                  engine=engine)
        if json_out:
            print_json(report.to_dict())
            return
        done = report.images
        t = Table(title=f"{done} images -> {out} (policy {report.policy})", title_justify="left")
        t.add_column("exit")
        t.add_column("images", justify="right")
        t.add_column("share", justify="right")
        for name, c in report.exit_counts.items():
            t.add_row(name, str(c), f"{100 * c / max(done, 1):.1f}%")
        console.print(t)
        if report.flops_speedup:
            console.print(f"mean FLOPs speed-up {report.flops_speedup:.2f}x (1 multiply-add = 1 FLOP); "
                          f"masks and {Path(report.predictions).name} in {out}")
        print_notes(_drift_notes(getattr(report, "drift", None)))


def _drift_notes(drift: Optional[Dict[str, Any]]) -> List[str]:
    """One note on the drift check when it found nothing (its findings are warnings on stderr already)."""
    if not drift or drift.get("warnings"):
        return []
    if drift.get("note"):
        return [f"drift not tested: {drift['note']}"]
    return [f"drift: the exit mix and confidences of these {drift['images']} images agree with calibration "
            f"({len(drift['tests'])} tests, alpha {drift['alpha']:g})"]
