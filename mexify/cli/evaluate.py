"""`mexify eval`: accuracy and cost of every exit of a bundle on a dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mexify import api
from mexify.cli._common import Annotated, DeviceOpt, JsonOpt, TrustCodeOpt, TrustOpt, console, count, data_option, print_json, stage_progress, trust_of


def _gflops(v: float) -> str:
    return f"{v / 1e9:.3f}" if v < 1e11 else f"{v / 1e9:.1f}"


def render_report(report, title: str = "") -> None:
    """Print an :class:`~mexify.tools.EvalReport` as rich tables on stdout."""
    h, w = report.input_size
    t = Table(
        title=title or f"{report.num_images} images, {report.num_classes} classes",
        caption=f"GFLOPs at {h}x{w} input, 1 multiply-add = 1 FLOP, early heads on the way included",
        title_justify="left",
        caption_justify="left",
    )
    t.add_column("exit")
    t.add_column("name")
    t.add_column("mIoU", justify="right")
    t.add_column("pixel acc", justify="right")
    t.add_column("GFLOPs to reach", justify="right")
    t.add_column("% of original", justify="right")
    for e in report.exits:
        style = "bold" if e.index == len(report.exits) - 1 else None
        t.add_row(
            str(e.index),
            e.name,
            f"{e.miou:.2f}",
            f"{e.pixel_accuracy:.2f}",
            _gflops(e.flops),
            f"{100 * e.flops_fraction:.1f}%",
            style=style,
        )
    console.print(t)
    if report.image_size and tuple(report.image_size) != tuple(report.input_size):
        ih, iw = report.image_size
        console.print(f"[dim]note: images were evaluated at {ih}x{iw}; FLOPs are quoted at the {h}x{w} profiling size "
                      "(convolution FLOPs scale with the pixel count)[/]")
    if report.policies:
        _render_policies(report)
    check = report.budget_check
    if check is not None:
        console.print(check.line(), style=None if check.held else "bold red", markup=False, soft_wrap=True)


def _render_policies(report) -> None:
    """The policy rows of an :class:`~mexify.tools.EvalReport` (mIoU, cost, the share of pixels whose class
    differs from the final exit's, exit rates) and where their latency comes from."""
    p = Table(title="exit policies", title_justify="left")
    p.add_column("policy")
    p.add_column("mIoU", justify="right")
    p.add_column("pixel acc", justify="right")
    p.add_column("mean GFLOPs", justify="right")
    p.add_column("% of original", justify="right")
    timed = any(r.latency is not None for r in report.policies)
    if timed:
        p.add_column("ms / image (profile)", justify="right")
        p.add_column("speed-up (profile)", justify="right")
    compared = any(r.disagreement == r.disagreement for r in report.policies)  # NaN: not counted
    if compared:
        p.add_column("differs from final", justify="right")
    p.add_column("exit rates", justify="left")
    for r in report.policies:
        frac = r.mean_flops / report.original_flops if report.original_flops else float("nan")
        rates = " ".join(f"{100 * x:.0f}%" for x in r.exit_rates)
        cells = [r.name, f"{r.miou:.2f}", f"{r.pixel_accuracy:.2f}", _gflops(r.mean_flops), f"{100 * frac:.1f}%"]
        if timed:
            lat = r.latency
            cells += [f"{lat.mean_ms:.2f}", f"{lat.speedup:.2f}x"] if lat is not None else ["-", "-"]
        if compared:
            cells.append(f"{100 * r.disagreement:.2f}%" if r.disagreement == r.disagreement else "-")
        p.add_row(*cells, rates)
    console.print(p)
    for r in report.policies:
        if r.latency is not None:
            console.print(f"[dim]{r.name}: latency predicted from the bundle's profile {r.latency.profile} "
                          "and this exit mix (`mexify bench` measures it)[/]")
        t = r.throughput
        if t is not None:
            console.print(f"{r.name}: predicted throughput with full batches of {t.batch_size} (`mexify serve --max-batch "
                          f"{t.batch_size}` under load, profile {t.profile}): {t.images_per_s:.0f} images/s vs the original's "
                          f"{t.original_images_per_s:.0f}/s ({t.speedup:.2f}x; `mexify loadtest` measures it)")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle directory (from `mexify convert` / `mexify train`).")],
        data: Annotated[
            Optional[str],
            data_option("Dataset spec: synthetic:scenes[?k=v&...], voc:PATH, cityscapes:PATH, ade20k:PATH, folder:PATH "
                        "(default: the dataset the bundle was trained on)."),
        ] = None,
        split: Annotated[str, typer.Option("--split", help="Split to evaluate on.")] = "val",
        batch_size: Annotated[int, typer.Option("--batch-size", parser=count("--batch-size"), metavar="N", help="Images per forward pass.")] = 8,
        limit: Annotated[Optional[int], typer.Option("--limit", parser=count("--limit"), metavar="N", help="Evaluate only the first N images.")] = None,
        workers: Annotated[Optional[int], typer.Option("--workers", parser=count("--workers", lo=0), metavar="N",
                                                       help="DataLoader workers (default: one per core).")] = None,
        device: DeviceOpt = None,
        trust_code: TrustCodeOpt = False,
        trust_pickle: TrustOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Run every exit of a bundle on a dataset: mIoU, pixel accuracy, FLOPs to reach each exit, and the
        bundle's exit policy (when calibrated): its mIoU, mean FLOPs, exit rates, the share of pixels whose
        class differs from the final exit's, and whether the budget it was calibrated for held here."""
        with stage_progress(not json_out) as progress:
            report = api.evaluate(bundle, data, split=split, batch_size=batch_size, limit=limit, workers=workers,
                                  device=device, progress=progress, trust=trust_of(trust_code, trust_pickle))
        if json_out:
            out = report.to_dict()
            out.update(bundle=str(bundle), data=report.data, split=split)
            print_json(out)
        else:
            render_report(report, title=f"{bundle} on {report.data} ({split}, {report.num_images} images)")
            for note in report.notes:
                console.print(f"[yellow]note:[/] {note}")
