"""Shared CLI pieces: the console, option aliases, JSON output and error handling."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Annotated, Any, List, Optional

import numpy as np
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mexify.api import ConfigError, Trust

# Piped output (CI logs, `| tee`) gets 120 columns instead of rich's 80, so tables are not truncated.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
console = Console(stderr=False, highlight=False, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, width=_WIDTH)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")]
DataOpt = Annotated[
    str,
    typer.Option("--data", help="Dataset spec: synthetic:scenes[?k=v&...], voc:PATH, cityscapes:PATH, ade20k:PATH, folder:PATH."),
]
TrustOpt = Annotated[
    bool,
    typer.Option("--trust-pickle", help="Allow unpickling: a .pt/.pth module, pickled entries of a .pt2 archive, or a bundle converted from a pickled module (runs code from the file)."),
]
TrustCodeOpt = Annotated[
    bool,
    typer.Option("--trust-code", help="Import and call any factory or file.py the bundle names, not only known model builders (runs code the bundle names)."),
]
# the budget and cost model of calibrate and compare
BudgetOpt = Annotated[Optional[str], typer.Option(
    "--budget", help="Mean speed-up (2x), mean cost share (40%) or mean latency per image (8ms): maximise mIoU within it.")]
MaxDropOpt = Annotated[Optional[float], typer.Option(
    "--max-drop", help="Fastest thresholds within this many mIoU points of the final exit (default 1.0).")]
CostOpt = Annotated[Optional[str], typer.Option(
    "--cost", help="latency (measured, from `mexify profile`) or flops; default latency when the bundle has a profile.")]
ProfileOpt = Annotated[Optional[str], typer.Option(
    "--profile", help="Which latency profile: part of its key, e.g. 'cpu|b1' or 'H100|b8|bfloat16'.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available).")]


def progress_enabled(enabled: bool = True) -> bool:
    """Progress bars are drawn unless turned off (``--json``, ``MEXIFY_NO_PROGRESS=1``)."""
    return enabled and os.environ.get("MEXIFY_NO_PROGRESS", "") in ("", "0")


@contextlib.contextmanager
def stage_progress(enabled: bool, transient: bool = True):
    """The progress display of every command: bars on stderr, one task per stage name.

    Yields ``callback(stage, done, total, info="")`` (None when not enabled, e.g. with
    ``--json``); ``info`` is free text shown after the bar (losses, speed).
    """
    if not progress_enabled(enabled):
        yield None
        return
    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=err_console, transient=transient)
    tasks: dict = {}

    def callback(stage: str, done: int, total: int, info: str = "") -> None:
        if stage not in tasks:
            tasks[stage] = prog.add_task(stage, total=total, info="")
        prog.update(tasks[stage], completed=done, total=total, info=info)

    with prog:
        yield callback


def print_notes(notes: List[str], files: Optional[dict] = None) -> None:
    """A report's notes (dim) and the files it wrote, one per line, after its tables."""
    for note in notes:
        console.print(f"[dim]note: {note}[/]")
    for k, v in (files or {}).items():
        console.print(f"{k}: {v}")


def print_json(obj: Any) -> None:
    """Write ``obj`` as JSON on stdout (no rich markup, safe for pipes)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def debug_enabled() -> bool:
    return os.environ.get("MEXIFY_DEBUG", "") not in ("", "0", "false", "False")


def parse_kv(items: Optional[List[str]], what: str = "--arg") -> dict:
    """Parse repeatable ``key=value`` options; values are YAML scalars (``null``, ``3``, ``true``)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{what} {item!r} is not key=value", "write it as key=value, e.g. num_classes=21")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value != "" else ""
    return out


def trust_of(trust_code: bool, trust_pickle: bool) -> Trust:
    """The trust the command-line flags give (both off by default)."""
    return Trust(code=trust_code, pickle=trust_pickle)
