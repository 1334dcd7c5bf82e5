"""Shared CLI pieces: the console, option aliases and their types, JSON output and error handling.

Every option a user types a value into has a type here: a ``parser=`` that calls the library's
parser for that value (:func:`lib_parser`), so a bad value is a usage error (exit code 2, one
line with the library's hint) before any work, and the Python API refuses it with the same words.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from typing import Annotated, Any, Callable, List, Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mexify import api
from mexify.api import MexifyError, Trust

# Piped output (CI logs, `| tee`) gets 120 columns instead of rich's 80, so tables are not truncated.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
console = Console(stderr=False, highlight=False, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, width=_WIDTH)


def lib_parser(parse: Callable[[str], Any], keep_text: bool = False) -> Callable[[Any], Any]:
    """A typer ``parser=`` running a library parser: what it refuses is a usage error (``typer.BadParameter``:
    exit code 2, one line with the library's message and hint). ``keep_text``: pass the text on (the API parses it again)."""
    def parser(value: Any) -> Any:
        if not isinstance(value, str):  # a default already of the parsed type
            return value
        try:
            out = parse(value)
        except MexifyError as e:
            raise typer.BadParameter(error_text(e)) from None
        return value if keep_text else out

    parser.__name__ = getattr(parse, "__name__", "parser")
    return parser


def checked(check: Callable[..., Any], *args: Any, param: str) -> Any:
    """Run a library check on values of several options (``--option`` for ``--policy``): what it refuses is
    a usage error of ``param``."""
    try:
        return check(*args)
    except MexifyError as e:
        raise typer.BadParameter(error_text(e), param_hint=f"'{param}'") from None


def error_text(e: MexifyError) -> str:
    """A library error as the CLI prints it: the message, then ``Hint:`` and the hint."""
    return e.message + (f" Hint: {e.hint}" if e.hint else "")


def count(what: str, lo: int = 1, hi: Optional[int] = None) -> Callable[[Any], Any]:
    """The parser of an integer option (``--batch-size``, ``--limit``...): at least ``lo`` (at most ``hi``)."""
    return lib_parser(functools.partial(api.parse_count, what=what, lo=lo, hi=hi))


def choice(choices: Any, what: str) -> Callable[[Any], Any]:
    """The parser of an option with a fixed set of values (``--engine``, ``--format``)."""
    return lib_parser(functools.partial(api.parse_choice, choices=choices, what=what))


def merged(items: Optional[List[Any]]) -> dict:
    """Repeated ``key=value`` options (each parsed to a ``(key, value)`` pair or a dict) as one dict, later ones winning."""
    out: dict = {}
    for item in items or []:
        out.update(item if isinstance(item, dict) else [item])
    return out


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")]
_DATA_HELP = "Dataset spec: synthetic:scenes[?k=v&...], voc:PATH, cityscapes:PATH, ade20k:PATH, folder:PATH."
DataOpt = Annotated[str, typer.Option("--data", parser=lib_parser(api.parse_dataset_spec, keep_text=True), metavar="SPEC",
                                      help=_DATA_HELP)]


def data_option(help: str = _DATA_HELP) -> Any:
    """``--data`` where it may be left out (eval, train)."""
    return typer.Option("--data", parser=lib_parser(api.parse_dataset_spec, keep_text=True), metavar="SPEC", help=help)


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
    "--budget", parser=lib_parser(api.parse_budget, keep_text=True), metavar="BUDGET",
    help="Mean speed-up (2x), mean cost share (40%) or mean latency per image (8ms): maximise mIoU within it.")]
MaxDropOpt = Annotated[Optional[float], typer.Option(
    "--max-drop", parser=lib_parser(api.parse_max_drop), metavar="POINTS",
    help="Fastest thresholds within this many mIoU points (0 to 100) of the final exit (default 1.0).")]
MaxDisagreeOpt = Annotated[Optional[str], typer.Option(
    "--max-disagree", parser=lib_parser(api.parse_max_disagree, keep_text=True), metavar="SHARE",
    help="Fastest thresholds whose masks differ from the final exit's on at most this share of pixels (2%): needs no labels.")]
ConfidenceOpt = Annotated[float, typer.Option(
    "--confidence", parser=lib_parser(api.parse_confidence), metavar="P",
    help="Probability that the budget holds on a new set of images like the calibration images, as large as it "
         "(default 0.9); 0: the point fit, within the budget on the calibration images only.")]
CostOpt = Annotated[Optional[str], typer.Option(
    "--cost", parser=lib_parser(api.parse_cost), metavar="latency|flops",
    help="latency (measured, from `mexify profile`) or flops; default latency when the bundle has a profile.")]
ProfileOpt = Annotated[Optional[str], typer.Option(
    "--profile", help="Which latency profile: part of its key, e.g. 'cpu|b1' or 'H100|b8|bfloat16'.")]
DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", parser=lib_parser(api.parse_device, keep_text=True), metavar="DEVICE",
    help="cpu, cuda, cuda:1, mps: one this machine has (default: cuda if available).")]
PolicyOpt = Annotated[str, typer.Option("--policy", parser=lib_parser(api.parse_policy), metavar="NAME",
                                        help="mess, entropy, maxprob, cbt, class-means, fft or learned.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", parser=lib_parser(api.parse_dtype), metavar="DTYPE",
                                                 help="float32 (default), bfloat16 or float16 (GPU): run under autocast.")]
WarmupOpt = Annotated[int, typer.Option("--warmup", parser=count("--warmup", lo=0), metavar="N", help="Untimed runs before timing.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", parser=count("--threads"), metavar="N",
                                                   help="CPU threads for torch (default: torch's).")]


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


def warn(message: str) -> None:
    """One yellow ``warning:`` line on stderr."""
    err_console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


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


def trust_of(trust_code: bool, trust_pickle: bool) -> Trust:
    """The trust the command-line flags give (both off by default)."""
    return Trust(code=trust_code, pickle=trust_pickle)
