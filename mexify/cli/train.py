"""``mexify train``: two-stage training of a converted bundle (see ``docs/train.md``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from mexify import api

from mexify.cli._common import (Annotated, DeviceOpt, JsonOpt, TrustCodeOpt, TrustOpt, console, data_option, err_console, lib_parser, merged,
                                print_json, stage_progress, trust_of)


def _progress_adapter(callback):
    """Turn the trainer's events into bars of :func:`stage_progress`: per-exit losses and lr as info."""
    def on_event(ev) -> None:
        name = f"stage {ev.stage}"
        if ev.kind == "stage_start":
            callback(name, ev.start, ev.total)
        elif ev.kind == "step":
            ce = " ".join(f"{v:.2f}" for k, v in ev.losses.items() if k.startswith("ce/"))
            kd = " ".join(f"{v:.2f}" for k, v in ev.losses.items() if k.startswith("kd/"))
            info = f"{ev.it_per_s:.2f} it/s | loss {ev.loss:.3f} | ce {ce}" + (f" | kd {kd}" if kd else "") + f" | lr {ev.lr:.2e}"
            callback(name, ev.iteration, ev.total, info)
        elif ev.kind == "stage_end":
            callback(name, ev.total, ev.total)

    return on_event


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle directory made by `mexify convert`.")],
        data: Annotated[
            Optional[str], data_option("Dataset spec (synthetic:scenes?..., voc:PATH, ...); default: the recipe's `data`."),
        ] = None,
        recipe: Annotated[str, typer.Option("--recipe", "-r", help="Recipe name (quick-synthetic, voc-deeplabv3-resnet50, ...) or YAML path.")] = "quick-synthetic",
        set_: Annotated[Optional[List[Any]], typer.Option("--set", parser=lib_parser(api.parse_recipe_override), metavar="KEY=VALUE",
                                                          help="Override a recipe field: --set lr=0.01 (repeatable).")] = None,
        weights: Annotated[Optional[Path], typer.Option("--weights", help="Trained weights of the original model (state_dict or .safetensors) for the backbone.")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint of this run.")] = False,
        out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the trained bundle here (default: update BUNDLE in place).")] = None,
        run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Checkpoints and logs (default: OUT.train next to the bundle).")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle at --out.")] = False,
        device: DeviceOpt = None,
        trust_code: TrustCodeOpt = False,
        trust_pickle: TrustOpt = False,
        json_: JsonOpt = False,
    ) -> None:
        """Train a multi-exit bundle in two stages: end-to-end, then frozen backbone with distillation."""
        overrides = merged(set_)
        quiet = json_ or int(os.environ.get("RANK", "0")) != 0
        try:
            with stage_progress(not quiet, transient=False) as callback:
                report = api.train(bundle, data, recipe=recipe, out=out, overrides=overrides, weights=weights,
                                   resume=resume, device=device, progress=_progress_adapter(callback) if callback else None,
                                   run_dir=run_dir, trust=trust_of(trust_code, trust_pickle), overwrite=overwrite)
        except KeyboardInterrupt as e:
            ckpt = getattr(e, "checkpoint", None)
            if ckpt:
                err_console.print(f"[yellow]interrupted:[/] the last checkpoint ({ckpt}) is intact; continue with --resume")
            else:
                err_console.print("[yellow]interrupted[/] before the first checkpoint: nothing to resume; run again without --resume")
            raise typer.Exit(130) from None
        if int(os.environ.get("RANK", "0")) != 0:
            return  # under torchrun only rank 0 reports
        if json_:
            print_json(report.to_dict())
            return
        _render(report)


def _render(report) -> None:
    if not report.stages:
        console.print("nothing to train (both stages have 0 iterations)")
        return
    names = []
    for st in report.stages:
        for k in st.final_losses:
            if k not in names:
                names.append(k)
    title = f"recipe {report.recipe['name']} on {report.device}" + (
        f" x{report.world_size}" if report.world_size > 1 else "")
    table = Table(title=title, caption="losses: mean of each stage's last 50 iterations")
    table.add_column("")
    for st in report.stages:
        table.add_column(f"stage {st.stage}", justify="right")
    table.add_row("iterations", *[str(st.iterations) for st in report.stages])
    table.add_row("it/s", *[f"{st.it_per_s:.2f}" if st.it_per_s else "-" for st in report.stages])
    for n in names:
        table.add_row(n, *[f"{st.final_losses[n]:.4f}" if n in st.final_losses else "" for st in report.stages])
    console.print(table)
    console.print(f"bundle: {report.out}\nlog: {report.log}\ncheckpoint: {report.checkpoint}")
