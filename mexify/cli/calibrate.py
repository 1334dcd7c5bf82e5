"""`mexify calibrate`: fit an exit policy for a budget and write it into the bundle."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from mexify import api
from mexify.cli._common import (Annotated, BudgetOpt, ConfidenceOpt, CostOpt, DataOpt, DeviceOpt, JsonOpt, MaxDisagreeOpt, MaxDropOpt, PolicyOpt,
                                ProfileOpt, TrustCodeOpt,
                                TrustOpt, checked, console, count, lib_parser, merged, print_json, print_notes, stage_progress, trust_of, warn)


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

    ms = "mean_ms" in fig
    what = f"cost: measured latency, {fig['latency_profile']}" if fig.get("cost") == "latency" else "cost: FLOPs"
    s = Table(title=f"budget {report.budget.text} ({what}; 1 multiply-add = 1 FLOP)", title_justify="left")
    s.add_column("")
    s.add_column(label, justify="right")
    s.add_column("drop", justify="right")
    s.add_column("mean FLOPs", justify="right")
    s.add_column("speed-up (FLOPs)", justify="right")
    if ms:
        s.add_column("ms / image", justify="right")
        s.add_column("speed-up (predicted)", justify="right")

    def row(name: str, f: dict, drop: float) -> None:
        cells = [name, f"{f['miou']:.2f}", f"{drop:.2f}", _fmt_flops(f["mean_flops"]), f"{f['flops_speedup']:.2f}x"]
        if ms:
            cells += [f"{f['mean_ms']:.2f}", f"{f['predicted_speedup']:.2f}x"] if "mean_ms" in f else ["-", "-"]
        s.add_row(*cells)

    orig = {"miou": fig["final_miou"], "mean_flops": fig["original_flops"], "flops_speedup": 1.0}
    if ms:
        orig.update(mean_ms=fig["original_ms"], predicted_speedup=1.0)
    row("original model (final exit)", orig, 0.0)
    row(f"[bold]{report.policy.name}[/]", fig, fig["drop"])
    o = report.oracle
    if o:
        row(f"oracle (tolerance {o['tolerance']:.2g})", o, o["drop"])
    th = report.theoretical
    if th:
        s.add_row("pixel-level, theoretical", "-", "-", _fmt_flops(th["mean_flops"]), f"{th['speedup']:.2f}x", *(["-", "-"] if ms else []))
    console.print(s)
    _render_bound(report.budget, fig, report.point)
    g = report.best_global
    if g:
        console.print(f"one global threshold at the same budget: mIoU {g['miou']:.2f}, {g['speedup']:.2f}x by the search's cost")
    if report.temperatures:
        console.print("temperatures: " + ", ".join(f"{n}={t:.3f}" for n, t in zip(report.policy.exit_names, report.temperatures)))
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    for what, path in report.files.items():
        console.print(f"[dim]{what}: {path}[/]")


def _render_bound(budget, fig: dict, point: Optional[dict]) -> None:
    """What the fit promises on new images: the point figure, its bound and the confidence; the point fit beside it."""
    if "confidence" not in fig:
        console.print(f"[dim]point fit: within {budget.text} on the calibration images; new images may break it "
                      f"(about half of new sets would at a budget met exactly): --confidence 0.9 certifies it[/]")
        return
    conf = f"{100 * fig['confidence']:g}%"
    console.print(f"certified at {conf} confidence on a new set of {fig['bound_images']} images like these: "
                  f"drop {fig['drop']:.2f} -> at most {fig['drop_bound']:.2f} points, pixels differing from the final exit "
                  f"{100 * fig['disagreement']:.2f}% -> at most {100 * fig['disagreement_bound']:.2f}%, "
                  f"speed-up {fig['speedup']:.2f}x -> at least {fig['speedup_bound']:.2f}x")
    if point:
        console.print(f"[dim]the point fit (--confidence 0) would reach {point['speedup']:.2f}x at drop {point['drop']:.2f} "
                      f"on these images, without that guarantee[/]")


def _render_search(report) -> None:
    """The chosen configuration (exit, head, threshold, exit rate) and the searched vs uniform-FCN figures."""
    t = Table(title=f"searched configuration ({report.policy.name}, {report.evaluations} configurations in {report.seconds:.1f}s)",
              title_justify="left")
    for col in ("exit", "head", "head GFLOPs", "threshold", "exit rate"):
        t.add_column(col, justify="left" if col in ("exit", "head") else "right", no_wrap=True)
    for r in report.rows:
        th = "never" if r.candidate is None or r.threshold == float("inf") else f"{r.threshold:.4f}"
        t.add_row(r.exit, r.head, f"{r.head_flops / 1e9:.3f}" if r.head_flops else "-", th, f"{100 * r.exit_rate:.1f}%")
    t.add_row("final", "(the model)", "-", "always", f"{100 * report.figures['exit_rates']['final']:.1f}%")
    console.print(t)
    timed = "predicted_speedup" in report.figures
    s = Table(title="on the calibration split (FLOPs: 1 multiply-add = 1 FLOP)", title_justify="left")
    for col in ("configuration", "mIoU", "drop", "speed-up (FLOPs)") + (("speed-up (measured latency)",) if timed else ()):
        s.add_column(col, justify="left" if col == "configuration" else "right")
    for name, f in (("searched", report.figures), ("uniform fcn", report.baseline), ("uniform mess b1", report.default),
                    ("oracle, searched exits", report.oracle), ("oracle, every exit on", report.oracle_all)):
        if f is not None:
            s.add_row(name, f"{f['miou']:.2f}", f"{f['drop']:.2f}", f"{f['flops_speedup']:.2f}x",
                      *((f"{f['predicted_speedup']:.2f}x",) if timed else ()))
    console.print(s)
    _render_bound(report.budget, report.figures, None)
    print_notes(report.notes, report.files)


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle directory (from `mexify convert` / `mexify train`).")],
        data: DataOpt,
        policy: PolicyOpt = "mess",
        budget: BudgetOpt = None,
        max_drop: MaxDropOpt = None,
        max_disagree: MaxDisagreeOpt = None,
        confidence: ConfidenceOpt = api.DEFAULT_CONFIDENCE,
        split: Annotated[str, typer.Option("--split", help="Calibration split.")] = "calib",
        limit: Annotated[Optional[int], typer.Option("--limit", parser=count("--limit"), metavar="N", help="Use only the first N images.")] = None,
        temperature: Annotated[bool, typer.Option("--temperature", help="Fit a temperature per exit first (needs labels).")] = False,
        option: Annotated[Optional[List[Any]], typer.Option(
            "--option", parser=lib_parser(lambda text: api.parse_assignment(text, "--option")), metavar="KEY=VALUE",
            help="Policy option key=value, e.g. pixel_threshold=0.95 (repeatable).")] = None,
        out: Annotated[Optional[Path], typer.Option("--out", help="Where pareto.csv/png go (default BUNDLE/calibration).")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", parser=count("--batch-size"), metavar="N", help="Images per forward pass.")] = 4,
        cost: CostOpt = None,
        profile: ProfileOpt = None,
        search: Annotated[bool, typer.Option("--search", help="Choose per exit off or one head candidate, and the thresholds "
                                             "(a bundle converted with --heads, or with --max-exits).")] = False,
        max_exits: Annotated[Optional[int], typer.Option("--max-exits", parser=count("--max-exits"), metavar="N",
                                                         help="With --search: keep at most N exits on, placed among the bundle's "
                                                         "exit positions (convert with more, e.g. --exits 12).")] = None,
        keep_candidates: Annotated[bool, typer.Option("--keep-candidates", help="With --search: keep the unchosen candidates in the bundle.")] = False,
        device: DeviceOpt = None,
        trust_code: TrustCodeOpt = False,
        trust_pickle: TrustOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Fit exit thresholds on a calibration split for a budget and write them into the bundle."""
        opts = checked(api.policy_options, policy, merged(option), param="--option")
        if search and temperature:
            raise api.ConfigError("--search does not fit temperatures", "search first, then calibrate the chosen bundle with --temperature")
        if max_exits is not None and not search:
            raise api.ConfigError("--max-exits chooses exit positions in the configuration search", "add --search")
        goal = api.Budget.from_options(budget=budget, max_drop=max_drop, cost=cost, profile=profile, max_disagree=max_disagree,
                                       confidence=confidence)
        common = dict(policy=policy, budget=goal, split=split, limit=limit, batch_size=batch_size, policy_options=opts, out=out,
                      device=device, trust=trust_of(trust_code, trust_pickle), warn=warn)
        with stage_progress(not json_out) as progress_cb:
            if search:
                report = api.search(str(bundle), data, keep_candidates=keep_candidates, max_exits=max_exits, progress=progress_cb, **common)
            else:
                report = api.calibrate(str(bundle), data, temperature=temperature, progress=progress_cb, **common)
        if json_out:
            print_json(api.json_safe(report.to_dict()))
        elif isinstance(report, api.ConfigurationReport):
            _render_search(report)
        else:
            _render(report)


