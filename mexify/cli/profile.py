"""`mexify profile`: measured latency of each stage, head and policy step, kept in the bundle."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from mexify import api
from mexify.cli._common import (Annotated, DeviceOpt, JsonOpt, ThreadsOpt, TrustCodeOpt, TrustOpt, WarmupOpt, console, count, lib_parser,
                                print_json, stage_progress, trust_of)


def render(profiles: list) -> None:
    """One table per batch size: stage, head and policy milliseconds, time to each exit beside its FLOPs share."""
    for p in profiles:
        to_exit = p.to_exit_ms()
        t = Table(title=f"{p.device}, batch {p.batch_size}, {p.dtype}, {p.input_size[0]}x{p.input_size[1]}, {p.mode}",
                  caption=f"ms per batch: median of {p.repeats} after {p.warmup} warm-up; to exit: every head and "
                  "policy step on the way (masks not included); FLOPs: 1 multiply-add = 1 FLOP", title_justify="left", caption_justify="left")
        for col in ("#", "exit", "stage ms", "head ms", "policy ms", "mask ms", "to exit ms", "% of final", "% FLOPs"):
            t.add_column(col, justify="left" if col in ("#", "exit") else "right", no_wrap=col != "exit")
        for i, name in enumerate(p.exit_names):
            head = f"{p.head_ms[i]:.3f}" if i < len(p.head_ms) else "-"
            pol = f"{p.policy_ms[i]:.3f}" if p.policy_ms and i < len(p.policy_ms) else "-"
            mask = f"{p.mask_ms[i]:.3f}" if p.mask_ms else "-"
            t.add_row(str(i), name, f"{p.stage_ms[i]:.3f}", head, pol, mask, f"{to_exit[i]:.3f}",
                      f"{100 * to_exit[i] / to_exit[-1]:.1f}%", f"{100 * p.flops_to_exit[i] / p.original_flops:.1f}%")
        console.print(t)
        if p.original_ms is not None:
            console.print(f"original model (plain forward, run the same way): {p.original_ms:.3f} ms per batch")


def register(app: typer.Typer) -> None:
    @app.command("profile")
    def profile_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
        batch_size: Annotated[Any, typer.Option("--batch-size", parser=lib_parser(lambda text: api.parse_counts(text, "--batch-size")),
                                                metavar="N,N", help="Batch sizes to profile, comma-separated.")] = "1",
        dtype: Annotated[str, typer.Option("--dtype", parser=lib_parser(api.parse_dtype), metavar="DTYPE",
                                           help="float32, bfloat16 or float16 (GPU), run under autocast.")] = "float32",
        warmup: WarmupOpt = 3,
        repeats: Annotated[int, typer.Option("--repeats", parser=count("--repeats"), metavar="N", help="Timed runs; the median is kept.")] = 10,
        threads: ThreadsOpt = None,
        graphs: Annotated[Optional[bool], typer.Option("--graphs/--no-graphs", help="Time each piece replayed from a CUDA graph, as the runtime runs it (default: on CUDA).")] = None,
        device: DeviceOpt = None,
        trust_code: TrustCodeOpt = False,
        trust_pickle: TrustOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Measure each stage's, head's and policy step's latency on this device and keep the tables in the bundle."""
        with stage_progress(not json_out) as progress:
            report = api.profile(bundle, device=device, batch_sizes=batch_size, dtype=dtype,
                                   warmup=warmup, repeats=repeats, threads=threads, progress=progress, graphs=graphs,
                                   trust=trust_of(trust_code, trust_pickle))
        if json_out:
            print_json(report.to_dict())
            return
        render(report.profiles)
        console.print(f"[dim]stored in {bundle / 'config.yaml'} under latency: {', '.join(p.key for p in report.profiles)}[/]")
