"""`mexify bench`: per-exit latency and FLOPs, and the policy's measured speed-up."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from mexify import api
from mexify.cli._common import (Annotated, DataOpt, DeviceOpt, DtypeOpt, JsonOpt, ThreadsOpt, TrustCodeOpt, TrustOpt, WarmupOpt, choice, console,
                                count, print_json, print_notes, stage_progress, trust_of)


def _pct(v) -> str:
    """An overhead (a fraction) as a signed percentage; "-" when not measured."""
    return f"{100 * v:+.0f}%" if v is not None else "-"


def _gflops(v: float) -> str:
    return f"{v / 1e9:.3f}" if v < 1e11 else f"{v / 1e9:.1f}"


def render(report) -> None:
    """Print a :class:`~mexify.tools.BenchReport` as one rich table on stdout.

    One row per exit (taking every image there), the original model, and the policy:
    mIoU, FLOPs, exit rate, latency and the measured speed-up beside the FLOPs-predicted one.
    """
    h, w = report.image_size
    p = report.policy
    t = Table(
        title=f"exits and policy on {report.device}, batch {report.batch_size} at {h}x{w}"
        + (f", {p['images']} images" if p else ""),
        caption=f"latency: median of {report.repeats} after {report.warmup} warm-up (exit rows: time to reach the exit "
        "with every head on the way); GFLOPs at " + "x".join(map(str, report.input_size))
        + f", 1 multiply-add = 1 FLOP; speed-up: measured against the original model run the same way ({report.mode}, "
        f"{report.dtype}{', channels_last' if report.channels_last else ''}); predicted: by the timed stages and heads and "
        "the exit mix; by FLOPs: from FLOPs",
        title_justify="left",
        caption_justify="left",
    )
    has_miou = all("miou" in r for r in report.exits)
    cols = ["#", "exit"] + (["mIoU"] if has_miou else []) + ["GFLOPs"] + (["exit rate"] if p else []) + [
        "ms", "speed-up", "predicted", "by FLOPs"]
    for col in cols:
        if col == "exit":
            t.add_column(col, min_width=12, overflow="fold")
        else:
            t.add_column(col, justify="left" if col == "#" else "right", no_wrap=True)
    o = report.original
    for r in report.exits:
        row = [str(r["index"]), r["name"]] + ([f"{r['miou']:.2f}"] if has_miou else []) + [
            _gflops(r["flops"])]
        row += [f"{100 * r['exit_rate']:.1f}%"] if p else []
        row += [f"{r['latency_ms']:.2f}", f"{o['latency_ms'] / r['latency_ms']:.2f}x" if r["latency_ms"] else "-", "-",
                f"{1 / r['flops_fraction']:.2f}x" if r["flops_fraction"] else "-"]
        t.add_row(*row)
    row = ["", "original"] + ([f"{p['final_miou']:.2f}" if p and "final_miou" in p else "-"] if has_miou else []) + [
        _gflops(o["flops"])] + (["-"] if p else []) + [f"{o['latency_ms']:.2f}", "1.00x", "1.00x", "1.00x"]
    t.add_row(*row, style="dim")
    if p:
        off = p["exits_off_ms_per_image"]
        t.add_row(*(["", "every exit off"] + (["-"] if has_miou else []) + ["-", "-", f"{off * report.batch_size:.2f}",
                     f"{p['original_ms_per_image'] / off:.2f}x" if off else "-", "-", "-"]), style="dim")
        row = ["", f"policy {p['name']}"] + ([f"{p['miou']:.2f}" if "miou" in p else "-"] if has_miou else []) + [
            _gflops(p["mean_flops"]), "100.0%",
            f"{p['ms_per_image'] * report.batch_size:.2f}", f"{p['measured_speedup']:.2f}x",
            f"{p['predicted_speedup']:.2f}x", f"{p['flops_speedup']:.2f}x"]
        t.add_row(*row, style="bold")
    console.print(t)
    if p:
        console.print(f"policy over {p['images']} images: {p['ms_per_image']:.2f} ms/image vs "
                      f"{p['original_ms_per_image']:.2f} for the original (per-exit rows: first batch); every exit off "
                      f"{p['exits_off_ms_per_image']:.2f} ms/image, exits-off overhead {_pct(p['exits_off_overhead'])}")
        _print_accuracy(p, report.budget_check)
    print_notes(report.notes)


def _print_accuracy(p: dict, check) -> None:
    """``on these 200 images: drop 0.71 points, 1.9% of pixels differ from the original; budget max-drop 1.0 held``."""
    if "disagreement" not in p:
        return
    drop = (f"drop {p['drop']:.2f} points" if "drop" in p
            else f"agreement-mIoU drop {100 - p['agreement_miou']:.2f} points (no labels)")
    line = f"on these {p['images']} images: {drop}, {100 * p['disagreement']:.1f}% of pixels differ from the original"
    if check is not None:
        line += f"; {check.status(reading=not check.accuracy)}" + (f" {check.note}" if check.note else "")
    console.print(line, style=None if check is None or check.held else "bold red", markup=False, soft_wrap=True)


def render_engines(report) -> None:
    """Print an :class:`~mexify.api.EngineReport`: one row per engine."""
    h, w = report.image_size
    t = Table(title=f"engines on {report.device}, batch {report.batch_size} at {h}x{w}, {report.images} images",
              caption=f"ms/image: median of {report.repeats} passes; " + "; ".join(report.notes), title_justify="left",
              caption_justify="left")
    has_miou = all("miou" in r for r in report.rows)
    for col in ["engine", "policy"] + (["mIoU"] if has_miou else []) + ["ms/image", "original ms/image", "speed-up",
                                                                        "exits-off overhead", "by FLOPs", "same exit", "same pixels"]:
        t.add_column(col, justify="left" if col in ("engine", "policy") else "right", no_wrap=True)
    for r in report.rows:
        orig, speedup = r["original_ms_per_image"], r["measured_speedup"]
        t.add_row(r["engine"], r["policy"], *([f"{r['miou']:.2f}"] if has_miou else []), f"{r['ms_per_image']:.2f}",
                  f"{orig:.2f}" if orig else "-", f"{speedup:.2f}x" if speedup else "-", _pct(r["exits_off_overhead"]),
                  f"{r['flops_speedup']:.2f}x" if r["flops_speedup"] else "-", f"{100 * r['same_exit']:.1f}%",
                  f"{100 * r['same_pixels']:.2f}%")
    console.print(t)
    for r in report.rows:
        mix = ", ".join(f"{k} {v}" for k, v in r["exit_counts"].items() if v)
        console.print(f"[dim]{r['engine']} exits: {mix}[/]")


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
        data: DataOpt,
        split: Annotated[str, typer.Option("--split", help="Dataset split to measure on.")] = "val",
        limit: Annotated[int, typer.Option("--limit", parser=count("--limit"), metavar="N", help="Images for the policy's measured speed-up.")] = 32,
        batch_size: Annotated[int, typer.Option("--batch-size", parser=count("--batch-size"), metavar="N", help="Images per forward pass.")] = 1,
        warmup: WarmupOpt = 2,
        repeats: Annotated[int, typer.Option("--repeats", parser=count("--repeats"), metavar="N", help="Timed runs; the median is reported.")] = 5,
        threads: ThreadsOpt = None,
        graphs: Annotated[Optional[bool], typer.Option("--graphs/--no-graphs", help="Replay stages as CUDA graphs (default: on CUDA).")] = None,
        dtype: DtypeOpt = None,
        channels_last: Annotated[bool, typer.Option("--channels-last", help="Run convolutions in NHWC.")] = False,
        device: DeviceOpt = None,
        engine: Annotated[
            Optional[List[str]],
            typer.Option("--engine", parser=choice(api.ENGINES, "engine"), metavar="ENGINE",
                         help="Compare engines on the CPU instead: torch, onnxruntime (repeatable; "
                         "BUNDLE is then an ONNX export, and torch runs the bundle it came from)."),
        ] = None,
        trust_code: TrustCodeOpt = False,
        trust_pickle: TrustOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Per-exit latency and FLOPs, the original model's latency, and the policy's speed-up on a dataset."""
        trust = trust_of(trust_code, trust_pickle)
        engines = engine and engine != ["torch"]  # --engine torch alone is the plain benchmark
        with stage_progress(not json_out) as cb:
            if engines:
                report = api.compare_engines(bundle, data, engines=engine, split=split, limit=limit, batch_size=batch_size,
                                             warmup=warmup, repeats=repeats, threads=threads, trust=trust, progress=cb)
            else:
                report = api.bench(bundle, data, split=split, limit=limit, batch_size=batch_size, warmup=warmup, repeats=repeats,
                                   threads=threads, device=device, cuda_graphs=graphs, dtype=dtype, channels_last=channels_last,
                                   trust=trust, progress=cb)
        if json_out:
            print_json(report.to_dict())
        elif engines:
            render_engines(report)
        else:
            render(report)
