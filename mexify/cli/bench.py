"""`mexify bench`: per-exit latency and FLOPs, and the policy's measured speed-up."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from mexify.cli._common import DataOpt, DeviceOpt, JsonOpt, console, err_console, print_json

try:
    from typing import Annotated
except ImportError:  # pragma: no cover
    from typing_extensions import Annotated  # type: ignore


def _gflops(v: float) -> str:
    return f"{v / 1e9:.3f}" if v < 1e11 else f"{v / 1e9:.1f}"


def render(report) -> None:
    """Print a :class:`~mexify.runtime.BenchReport` as rich tables on stdout."""
    from rich.table import Table

    h, w = report.image_size
    t = Table(
        title=f"latency per exit on {report.device}, batch {report.batch_size} at {h}x{w}",
        caption=f"median of {report.repeats} after {report.warmup} warm-up; GFLOPs at "
        + "x".join(map(str, report.input_size))
        + ", 1 multiply-add = 1 FLOP, early heads on the way included",
        title_justify="left",
        caption_justify="left",
    )
    for col, just in (("exit", "left"), ("name", "left"), ("GFLOPs", "right"), ("% FLOPs", "right"),
                      ("stage ms", "right"), ("head ms", "right"), ("ms to exit", "right"), ("% latency", "right")):
        t.add_column(col, justify=just)
    for r in report.exits:
        t.add_row(
            str(r["index"]), r["name"], _gflops(r["flops"]), f"{100 * r['flops_fraction']:.1f}%",
            f"{r['stage_ms']:.2f}", f"{r['head_ms']:.2f}" if r["head_ms"] else "-", f"{r['latency_ms']:.2f}",
            f"{100 * r['latency_fraction']:.1f}%",
        )
    o = report.original
    t.add_row("", "original", _gflops(o["flops"]), "100.0%", "", "", f"{o['latency_ms']:.2f}", "100.0%", style="bold")
    console.print(t)
    p = report.policy
    if p:
        s = Table(title=f"policy {p['name']} on {p['images']} images", title_justify="left")
        s.add_column("")
        s.add_column("ms / image", justify="right")
        s.add_column("mean GFLOPs", justify="right")
        s.add_column("measured speed-up", justify="right")
        s.add_column("FLOPs speed-up", justify="right")
        if "miou" in p:
            s.add_column("mIoU", justify="right")
        row_o = ["original", f"{p['original_ms_per_image']:.2f}", _gflops(o["flops"]), "1.00x", "1.00x"]
        row_p = [f"[bold]{p['name']}[/]", f"{p['ms_per_image']:.2f}", _gflops(p["mean_flops"]),
                 f"{p['measured_speedup']:.2f}x", f"{p['flops_speedup']:.2f}x"]
        if "miou" in p:
            row_o.append(f"{p['final_miou']:.2f}")
            row_p.append(f"{p['miou']:.2f}")
        s.add_row(*row_o)
        s.add_row(*row_p)
        console.print(s)
        console.print("exit rates: " + ", ".join(f"{n} {100 * r:.1f}%" for n, r in p["exit_rates"].items()))
    for note in report.notes:
        console.print(f"[dim]note: {note}[/]")


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
        data: DataOpt,
        split: Annotated[str, typer.Option("--split", help="Dataset split to measure on.")] = "val",
        limit: Annotated[int, typer.Option("--limit", help="Images for the policy's measured speed-up.")] = 32,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 1,
        warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs before timing.")] = 2,
        repeats: Annotated[int, typer.Option("--repeats", help="Timed runs; the median is reported.")] = 5,
        threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch (default: torch's).")] = None,
        device: DeviceOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Per-exit latency and FLOPs, the original model's latency, and the policy's speed-up on a dataset."""
        import torch

        import mexify
        from mexify.runtime import bench

        if threads:
            torch.set_num_threads(int(threads))
        model = mexify.load(bundle, device=device)
        show = not json_out and os.environ.get("MEXIFY_NO_PROGRESS", "") in ("", "0")
        prog, cb = None, None
        if show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err_console, transient=True)
            tasks = {}

            def cb(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = prog.add_task(stage, total=total)
                prog.update(tasks[stage], completed=done, total=total)

            prog.start()
        try:
            report = bench(model, data, split=split, limit=limit, batch_size=batch_size, warmup=warmup, repeats=repeats,
                           device=device, progress=cb)
        finally:
            if prog is not None:
                prog.stop()
        if json_out:
            print_json(report.to_dict())
        else:
            render(report)
