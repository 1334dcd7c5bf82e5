"""The ``mexify`` command line: a thin composition of one module per command.

Each command module defines ``register(app)``; errors derived from
:class:`~mexify.errors.MexifyError` become one red line and an exit code
(set ``MEXIFY_DEBUG=1`` for a traceback).
"""
from __future__ import annotations

import importlib
import logging

import typer
from rich.markup import escape
from typer.core import TyperGroup

from mexify.api import MexifyError, __version__
from mexify.cli._common import debug_enabled, err_console

_COMMANDS = ("convert", "inspect", "train", "calibrate", "evaluate", "predict", "bench", "profile", "export", "compare")


class _Group(TyperGroup):
    """Runs a command; a MexifyError becomes one red line and the error's exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MexifyError as exc:
            if debug_enabled():
                raise
            msg = exc.message + (f" Hint: {exc.hint}" if exc.hint else "")
            err_console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)
            err_console.print("[dim](set MEXIFY_DEBUG=1 for a traceback)[/]")
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=_Group,
    name="mexify",
    help="Turn a PyTorch segmentation model into a multi-exit model, train, calibrate and run it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the mexify version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what each step does."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # operators without a FLOPs formula are expected (fvcore skips them too)
        logging.getLogger("mexify.graph.profile").setLevel(logging.ERROR)
    if version:
        typer.echo(__version__)
        raise typer.Exit(0)


for _name in _COMMANDS:
    importlib.import_module(f"mexify.cli.{_name}").register(app)


def main() -> None:
    """Console-script entry point."""
    app()
