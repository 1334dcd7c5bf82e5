"""`mexify compare`: every policy fitted for one budget on one split and judged on another, in one table."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from mexify import api
from mexify.cli._common import (Annotated, BudgetOpt, ConfidenceOpt, CostOpt, DataOpt, DeviceOpt, JsonOpt, MaxDisagreeOpt, MaxDropOpt, ProfileOpt,
                                TrustCodeOpt, TrustOpt,
                                console, count, lib_parser, print_json, print_notes, stage_progress, trust_of)


def _x(v: Optional[float]) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def _held(held: Optional[bool]) -> str:
    return "-" if held is None else ("held" if held else "[bold red]BROKEN[/]")


def render(report) -> None:
    """Print a :class:`~mexify.api.PolicyComparison`: one row per policy, the oracle last; the fitting split's
    figure beside the evaluation split's, and whether the budget held there."""
    rows = report.rows + ([report.oracle] if report.oracle else [])
    measured = any("measured_speedup" in r["eval"] for r in rows)
    b = report.budget
    key, unit = ("disagreement", 100.0) if b.kind == "max_disagree" else ("drop", 1.0)
    name = "disagree %" if key == "disagreement" else "drop"
    t = Table(title=f"policies at {b.claim}: fitted on the fitting split, judged on the evaluation split",
              caption="predicted: " + ("the bundle's measured latency profile" if report.cost == "latency" else "FLOPs")
              + " x the exit mix; oracle share: the policy's saving over the oracle's at the same budget"
              + ("; measured: against the original model run the same way" if measured else "")
              + (f"; bound: what the fit certified at {100 * b.confidence:g}% confidence" if b.confidence else "")
              + "; vs final: the drop against the final exit's masks (what a label-free calibration measures)",
              title_justify="left", caption_justify="left")
    cols = ["policy", f"fit {name}"] + (["bound"] if b.confidence else []) + [f"eval {name}", "budget", "mIoU", "vs final"]
    cols += (["measured"] if measured else []) + ["predicted", "by FLOPs", "oracle share"]
    for col in cols:
        t.add_column(col, justify="left" if col == "policy" else "right", no_wrap=True)
    for r in rows:
        e, f = r["eval"], r.get("fit") or {}
        predicted = e.get("predicted_speedup", e.get("speedup"))
        share = r.get("oracle_share")
        cells = [r["policy"], f"{unit * f[key]:.2f}" if f else "-"]
        if b.confidence:
            bound = f.get(f"{key}_bound")
            cells.append(f"{unit * bound:.2f}" if bound is not None else "-")
        cells += [f"{unit * e[key]:.2f}", _held(r.get("held")) if f else "-", f"{e['miou']:.2f}", f"{e.get('agree_drop', float('nan')):.2f}"]
        cells += ([_x(e.get("measured_speedup"))] if measured else []) + [_x(predicted), _x(e.get("flops_speedup")),
                                                                            f"{100 * share:.0f}%" if share is not None else "-"]
        t.add_row(*cells, style="dim" if r["policy"] == "oracle" else None)
    m = report.measured
    if measured and m:  # the exits-off overhead: every exit off, against the same original
        t.add_row("every exit off", *["-"] * (cols.index("measured") - 1), _x(m["original_ms"] / m["exits_off_ms"]),
                  *["-"] * (len(cols) - cols.index("measured") - 1), style="dim")
    console.print(t)
    broken = [r["policy"] for r in report.rows if r.get("held") is False]
    if broken:
        console.print(f"[bold red]budget {b.text} broken on the evaluation split by: {', '.join(broken)}[/]"
                      + (f" (at {100 * b.confidence:g}% confidence, about {100 * (1 - b.confidence):g}% of such splits may break it)"
                         if b.confidence else " (a point fit: expect about half of new splits to break it; use --confidence)"))
    print_notes(report.notes, report.files)


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle directory (trained).")],
        data: DataOpt,
        max_drop: MaxDropOpt = None,
        budget: BudgetOpt = None,
        max_disagree: MaxDisagreeOpt = None,
        confidence: ConfidenceOpt = api.DEFAULT_CONFIDENCE,
        policies: Annotated[Optional[Any], typer.Option(
            "--policies", parser=lib_parser(lambda text: [api.parse_policy(p.strip()) for p in text.split(",") if p.strip()]),
            metavar="A,B", help="Comma-separated policies (default: every registered one).")] = None,
        fit_split: Annotated[str, typer.Option("--fit-split", help="Split the policies are fitted on.")] = "calib",
        eval_split: Annotated[str, typer.Option("--eval-split", help="Split they are judged on.")] = "test",
        limit: Annotated[Optional[int], typer.Option("--limit", parser=count("--limit"), metavar="N", help="Images per split.")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", parser=count("--batch-size"), metavar="N",
                                                help="Images per forward pass while collecting.")] = 8,
        no_measure: Annotated[bool, typer.Option("--no-measure", help="Skip the measured speed-ups (runtime timing).")] = False,
        repeats: Annotated[int, typer.Option("--repeats", parser=count("--repeats"), metavar="N",
                                             help="Timed passes per policy; the median is reported.")] = 3,
        cost: CostOpt = None,
        profile: ProfileOpt = None,
        out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory for compare.png / compare.csv (default BUNDLE/compare).")] = None,
        device: DeviceOpt = None,
        trust_code: TrustCodeOpt = False,
        trust_pickle: TrustOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Fit every policy for one budget on one split, judge it on another: one table, one Pareto plot."""
        names = policies or None
        goal = api.Budget.from_options(budget=budget, max_drop=max_drop, cost=cost, profile=profile, max_disagree=max_disagree,
                                       confidence=confidence)
        with stage_progress(not json_out) as progress:
            report = api.compare(bundle, data, budget=goal, policies=names, fit_split=fit_split, eval_split=eval_split, limit=limit,
                                 batch_size=batch_size, measure=not no_measure, repeats=repeats, out=out, device=device,
                                 trust=trust_of(trust_code, trust_pickle), progress=progress)
        if json_out:
            print_json(api.json_safe(report.to_dict()))
        else:
            render(report)
