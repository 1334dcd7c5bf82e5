"""Shared CLI pieces: the console, option aliases, JSON output and error handling."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, List, Optional

import typer
from rich.console import Console

from mexify.errors import MexifyError

# Piped output (CI logs, `| tee`) gets 120 columns instead of rich's 80, so tables are not truncated.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
console = Console(stderr=False, highlight=False, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, width=_WIDTH)

try:  # typer >= 0.9 supports Annotated
    from typing import Annotated
except ImportError:  # pragma: no cover - python < 3.9
    from typing_extensions import Annotated  # type: ignore

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")]
DataOpt = Annotated[
    str,
    typer.Option("--data", help="Dataset spec: synthetic:scenes[?k=v&...], voc:PATH, cityscapes:PATH, ade20k:PATH, folder:PATH."),
]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available).")]


@contextlib.contextmanager
def stage_progress(enabled: bool):
    """A transient progress bar on stderr with one task per stage name.

    Yields ``callback(stage, done, total)`` (None when not ``enabled``, e.g. with ``--json``).
    """
    if not enabled or os.environ.get("MEXIFY_NO_PROGRESS", "") not in ("", "0"):
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=True)
    tasks: dict = {}

    def callback(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = prog.add_task(stage, total=total)
        prog.update(tasks[stage], completed=done, total=total)

    with prog:
        yield callback


def print_json(obj: Any) -> None:
    """Write ``obj`` as JSON on stdout (no rich markup, safe for pipes)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def debug_enabled() -> bool:
    return os.environ.get("MEXIFY_DEBUG", "") not in ("", "0", "false", "False")


def fail(exc: MexifyError) -> "typer.Exit":
    """Print one red line for ``exc`` and return the Exit to raise."""
    msg = exc.message + (f" Hint: {exc.hint}" if exc.hint else "")
    err_console.print(f"[bold red]error:[/] {msg}", soft_wrap=True)
    return typer.Exit(exc.exit_code)


def parse_kv(items: Optional[List[str]], what: str = "--arg") -> dict:
    """Parse repeatable ``key=value`` options; values are YAML scalars (``null``, ``3``, ``true``)."""
    import yaml

    from mexify.errors import ConfigError

    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{what} {item!r} is not key=value", "write it as key=value, e.g. num_classes=21")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value != "" else ""
    return out
