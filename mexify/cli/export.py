"""`mexify export`: a self-contained pt2 or ONNX export of a bundle, per stage and per head."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mexify import api
from mexify.cli._common import Annotated, JsonOpt, TrustCodeOpt, TrustOpt, choice, console, count, print_json, stage_progress, trust_of


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Export directory to write.")],
        format: Annotated[str, typer.Option("--format", "-f", parser=choice(api.FORMATS, "export format"), metavar="pt2|onnx",
                                            help="pt2 (torch.export programs, loaded by mexify.load) or onnx "
                                            "(run by mexify.deploy with onnxruntime).")] = "pt2",
        opset: Annotated[Optional[int], typer.Option("--opset", parser=count("--opset", lo=api.MIN_OPSET, hi=api.MAX_OPSET), metavar="N",
                                                     help=f"ONNX opset, {api.MIN_OPSET} to {api.MAX_OPSET} (default 18).")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing export at --out.")] = False,
        trust_code: TrustCodeOpt = False,
        trust_pickle: TrustOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Export every stage and head as a program that runs without the model's code (pt2) or without torch (onnx)."""
        with stage_progress(not json_out) as progress:
            result = api.export(bundle, out=out, format=format, opset=opset, overwrite=overwrite, trust=trust_of(trust_code, trust_pickle),
                                progress=progress)
        if json_out:
            print_json(result.to_dict())
            return
        worst = max(result.max_abs_diff.values(), default=0.0)
        shapes = "batch and spatial sizes dynamic" if result.dynamic.get("spatial") else "batch dynamic, spatial sizes fixed"
        console.print(f"exported {bundle} -> {out} ({result.format}, {len(result.files)} files, {shapes}) in {result.seconds:.1f}s; "
                      f"largest difference from the bundle on the check batch: {worst:.3g}")
