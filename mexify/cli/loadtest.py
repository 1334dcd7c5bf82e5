"""`mexify loadtest`: open-loop Poisson load against a `mexify serve` service (and its baseline)."""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from mexify import api
from mexify.cli._common import Annotated, JsonOpt, console, count, lib_parser, print_json


def _num(what: str):
    return lib_parser(lambda t: api.parse_number(t, what))


def register(app: typer.Typer) -> None:
    @app.command("loadtest")
    def loadtest_cmd(
        url: Annotated[str, typer.Argument(help="The service's URL, e.g. http://127.0.0.1:8000 (loopback or this machine).")],
        data: Annotated[Optional[str], typer.Option("--data", help="Images to send: a folder or image files, or a dataset spec "
                                                    "(default: synthetic scenes at the service's input size).")] = None,
        rate: Annotated[Optional[float], typer.Option("--rate", parser=_num("--rate"), metavar="PER_S",
                                                      help="Poisson arrivals per second (with --slo-ms: where the search starts).")] = None,
        slo_ms: Annotated[Optional[float], typer.Option("--slo-ms", parser=_num("--slo-ms"), metavar="MS",
                                                        help="Search the highest rate whose p99 latency stays within MS.")] = None,
        baseline: Annotated[Optional[str], typer.Option("--baseline", metavar="URL",
                                                        help="The original model served the same way (mexify serve --original): gives the ratio.")] = None,
        requests: Annotated[int, typer.Option("--requests", parser=count("--requests"), metavar="N", help="Requests per run.")] = 200,
        duration: Annotated[Optional[float], typer.Option("--duration", parser=_num("--duration"), metavar="S",
                                                          help="Also stop sending after S seconds.")] = None,
        limit: Annotated[int, typer.Option("--limit", parser=count("--limit"), metavar="N", help="Distinct images sent (cycled).")] = 32,
        warmup: Annotated[int, typer.Option("--warmup", parser=count("--warmup", lo=0), metavar="N",
                                            help="Untimed requests to each service first (one by one, then N at once).")] = 32,
        seed: Annotated[int, typer.Option("--seed", parser=count("--seed", lo=0), metavar="N", help="Seed of the arrival times.")] = 0,
        timeout: Annotated[float, typer.Option("--timeout", parser=_num("--timeout"), metavar="S", help="Most one request may take.")] = 30.0,
        wait: Annotated[float, typer.Option("--wait", parser=lib_parser(lambda t: api.parse_number(t, "--wait", zero=True)),
                                            metavar="S", help="Wait up to S seconds for the services to come up.")] = 0.0,
        allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Send load to a host that is not this machine (your own).")] = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Open-loop load test: goodput, p50/p95/p99 latency, exit mix and errors; with --slo-ms, the highest rate within it."""
        report = api.loadtest(url, data=data, rate=rate, slo_ms=slo_ms, baseline=baseline, requests=requests, duration_s=duration,
                              limit=limit, seed=seed, timeout_s=timeout, allow_remote=allow_remote, warmup=warmup,
                              wait_s=wait)
        if json_out:
            print_json(report.to_dict())
            return
        _render(report)
        if report.ratio is not None:
            what = "highest rate within the SLO" if report.slo_ms is not None else "p50 latency (baseline / service)"
            console.print(f"ratio, {what}: {report.ratio:.2f}x")
        if any(r.max_send_lag_ms > 50 for r in report.runs + report.baseline_runs):
            console.print("note: the load generator fell behind its schedule by over 50 ms (latency is still counted from the "
                          "schedule); run it on another core or machine for higher rates")


def _render(report: "api.LoadtestReport") -> None:
    t = Table(title=f"open-loop Poisson load{f', p99 target {report.slo_ms:g} ms' if report.slo_ms else ''}", title_justify="left")
    for col in ("service", "rate/s", "sent", "ok", "errors", "goodput/s", "p50 ms", "p95 ms", "p99 ms", "exit mix"):
        t.add_column(col, justify="left" if col in ("service", "errors", "exit mix") else "right")
    rows = [("service", report.final, report.best_rate)]
    if report.baseline_final is not None:
        rows.append(("baseline", report.baseline_final, report.baseline_best_rate))
    for name, r, best in rows:
        lat = r.latency_ms
        errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items() if v) or "-"
        mix = ", ".join(f"{k} {v}" for k, v in r.exit_mix.items())
        t.add_row(name + (" (best)" if best is not None else ""), f"{r.rate:.1f}", str(r.sent), str(r.ok), errors, f"{r.goodput:.1f}",
                  *(f"{lat[k]:.1f}" if k in lat else "-" for k in ("p50", "p95", "p99")), mix)
    console.print(t)
    if report.slo_ms is not None:
        console.print(f"searched {len(report.runs)} rates for the service" + (f", {len(report.baseline_runs)} for the baseline" if report.baseline_runs else "")
                      + f"; best: {report.best_rate or 0:.1f}/s" + (f" vs {report.baseline_best_rate or 0:.1f}/s" if report.baseline_runs else ""))
