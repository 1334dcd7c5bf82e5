"""``mexify train``: two-stage training of a converted bundle (see ``docs/train.md``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from mexify.cli._common import Annotated, DataOpt, DeviceOpt, JsonOpt, console, err_console, parse_kv, print_json


class _RichProgress:
    """One rich progress bar per stage on stderr: per-exit losses, lr, it/s and ETA."""

    def __init__(self, console_):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console_,
            transient=False,
        )
        self.tasks = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def __call__(self, ev) -> None:
        if ev.kind == "stage_start":
            name = f"stage {ev.stage}"
            self.tasks[ev.stage] = self.progress.add_task(name, total=ev.total, completed=ev.start, speed="", info="")
            return
        task = self.tasks.get(ev.stage)
        if task is None:
            return
        if ev.kind == "step":
            ce = " ".join(f"{v:.2f}" for k, v in ev.losses.items() if k.startswith("ce/"))
            kd = " ".join(f"{v:.2f}" for k, v in ev.losses.items() if k.startswith("kd/"))
            info = f"loss {ev.loss:.3f} | ce {ce}" + (f" | kd {kd}" if kd else "") + f" | lr {ev.lr:.2e}"
            self.progress.update(task, completed=ev.iteration, speed=f"{ev.it_per_s:.2f} it/s", info=info)
        elif ev.kind == "stage_end":
            self.progress.update(task, completed=ev.total)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle directory made by `mexify convert`.")],
        data: DataOpt,
        recipe: Annotated[str, typer.Option("--recipe", "-r", help="Recipe name (quick-synthetic, voc-deeplabv3-resnet50, ...) or YAML path.")] = "quick-synthetic",
        set_: Annotated[Optional[List[str]], typer.Option("--set", help="Override a recipe field: --set lr=0.01 (repeatable).")] = None,
        weights: Annotated[Optional[Path], typer.Option("--weights", help="Trained weights of the original model (state_dict or .safetensors) for the backbone.")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint of this run.")] = False,
        out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the trained bundle here (default: update BUNDLE in place).")] = None,
        run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Checkpoints and logs (default: OUT.train next to the bundle).")] = None,
        device: DeviceOpt = None,
        json_: JsonOpt = False,
    ) -> None:
        """Train a multi-exit bundle in two stages: end-to-end, then frozen backbone with distillation."""
        from mexify.train import train

        overrides = parse_kv(set_, "--set")
        quiet = json_ or os.environ.get("MEXIFY_NO_PROGRESS", "") not in ("", "0")
        quiet = quiet or int(os.environ.get("RANK", "0")) != 0
        progress = None if quiet else _RichProgress(err_console)
        try:
            if progress is not None:
                with progress:
                    report = train(bundle, data, recipe=recipe, out=out, overrides=overrides, weights=weights,
                                   resume=resume, device=device, progress=progress, run_dir=run_dir)
            else:
                report = train(bundle, data, recipe=recipe, out=out, overrides=overrides, weights=weights,
                               resume=resume, device=device, run_dir=run_dir)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted:[/] the last checkpoint is intact; continue with --resume")
            raise typer.Exit(130)
        if int(os.environ.get("RANK", "0")) != 0:
            return  # under torchrun only rank 0 reports
        if json_:
            print_json(report.to_dict())
            return
        _render(report)


def _render(report) -> None:
    from rich.table import Table

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
