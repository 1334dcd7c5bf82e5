"""`mexify calibrate`: fit an exit policy for a budget and write it into the bundle."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from mexify import api
from mexify.cli._common import Annotated, DataOpt, DeviceOpt, JsonOpt, console, parse_kv, print_json, stage_progress


def _fmt_flops(v: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f} {unit}"
    return f"{v:.0f}"


def _render(report) -> None:
    fig = report.figures
    label = "mIoU" if report.labelled else "agreement mIoU (no labels)"
    t = Table(title=f"policy {report.policy.name}: thresholds and exit rates", title_justify="left")
    t.add_column("exit")
    t.add_column("threshold", justify="right")
    t.add_column("exit rate", justify="right")
    if report.oracle:
        t.add_column("oracle rate", justify="right")
    thr = report.thresholds
    for name, rate in fig["exit_rates"].items():
        th = thr.get(name, "always") if name in thr else "always"
        th_s = "never" if th is None else (th if isinstance(th, str) else f"{th:.4f}")
        row = [name, th_s, f"{100 * rate:.1f}%"]
        if report.oracle:
            row.append(f"{100 * report.oracle['exit_rates'].get(name, 0.0):.1f}%")
        t.add_row(*row)
    console.print(t)

    s = Table(title=f"budget {report.budget['text']} (FLOPs: 1 multiply-add = 1 FLOP)", title_justify="left")
    s.add_column("")
    s.add_column(label, justify="right")
    s.add_column("drop", justify="right")
    s.add_column("mean FLOPs", justify="right")
    s.add_column("speed-up", justify="right")
    s.add_row("original model (final exit)", f"{fig['final_miou']:.2f}", "0.00", _fmt_flops(fig["original_flops"]), "1.00x")
    s.add_row(f"[bold]{report.policy.name}[/]", f"{fig['miou']:.2f}", f"{fig['drop']:.2f}", _fmt_flops(fig["mean_flops"]), f"{fig['speedup']:.2f}x")
    g = report.best_global
    if g:
        s.add_row("one global threshold", f"{g['miou']:.2f}", f"{fig['final_miou'] - g['miou']:.2f}", _fmt_flops(g["mean_flops"]), f"{g['speedup']:.2f}x")
    o = report.oracle
    if o:
        s.add_row(f"oracle (tolerance {o['tolerance']:.2g})", f"{o['miou']:.2f}", f"{o['drop']:.2f}", _fmt_flops(o["mean_flops"]), f"{o['speedup']:.2f}x")
    th = report.theoretical
    if th:
        s.add_row("pixel-level, theoretical", "-", "-", _fmt_flops(th["mean_flops"]), f"{th['speedup']:.2f}x")
    console.print(s)
    if report.temperatures:
        console.print("temperatures: " + ", ".join(f"{n}={t:.3f}" for n, t in zip(report.policy.exit_names, report.temperatures)))
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    for what, path in report.files.items():
        console.print(f"[dim]{what}: {path}[/]")


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle directory (from `mexify convert` / `mexify train`).")],
        data: DataOpt,
        policy: Annotated[str, typer.Option("--policy", help="mess, entropy, maxprob, cbt or class-means.")] = "mess",
        budget: Annotated[Optional[str], typer.Option("--budget", help="Mean speed-up (2x) or mean cost share (40%): maximise mIoU within it.")] = None,
        max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Fastest thresholds within this many mIoU points of the final exit (default 1.0).")] = None,
        split: Annotated[str, typer.Option("--split", help="Calibration split.")] = "calib",
        limit: Annotated[Optional[int], typer.Option("--limit", help="Use only the first N images.")] = None,
        temperature: Annotated[bool, typer.Option("--temperature", help="Fit a temperature per exit first (needs labels).")] = False,
        option: Annotated[Optional[List[str]], typer.Option("--option", help="Policy option key=value, e.g. pixel_threshold=0.95 (repeatable).")] = None,
        out: Annotated[Optional[Path], typer.Option("--out", help="Where pareto.csv/png go (default BUNDLE/calibration).")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 4,
        device: DeviceOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Fit exit thresholds on a calibration split for a budget and write them into the bundle."""
        opts = parse_kv(option, "--option")
        with stage_progress(not json_out) as progress_cb:
            report = api.calibrate(
                str(bundle),
                data,
                policy=policy,
                budget=budget,
                max_drop=max_drop,
                split=split,
                temperature=temperature,
                out=out,
                limit=limit,
                batch_size=batch_size,
                device=device,
                policy_options=opts,
                progress=progress_cb,
            )
        if json_out:
            print_json(api.json_safe(report.to_dict()))
        else:
            _render(report)


