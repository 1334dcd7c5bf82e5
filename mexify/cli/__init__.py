"""The ``mexify`` command line: a thin composition of one module per command.

Each command module defines ``register(app)``; errors derived from
:class:`~mexify.errors.MexifyError` become one red line and an exit code
(set ``MEXIFY_DEBUG=1`` for a traceback). Usage errors (an unknown option, a missing argument, a
value an option's type refuses) become one line too, with exit code 2.
"""
from __future__ import annotations

import importlib
import logging

import typer
from rich.markup import escape
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer 0.29 vendors click
from typer.core import TyperGroup

from mexify.api import MexifyError, __version__
from mexify.cli._common import debug_enabled, err_console, error_text

_COMMANDS = ("convert", "inspect", "train", "calibrate", "evaluate", "predict", "bench", "profile", "export", "compare", "serve",
             "loadtest")


class _Group(TyperGroup):
    """Runs a command; a MexifyError becomes one red line and the error's exit code, a usage error one line
    and exit code 2 (instead of typer's boxed panel)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as exc:
            _usage_error(exc)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MexifyError as exc:
            if debug_enabled():
                raise
            err_console.print(f"[bold red]error:[/] {escape(error_text(exc))}", soft_wrap=True)
            err_console.print("[dim](set MEXIFY_DEBUG=1 for a traceback)[/]")
            raise typer.Exit(exc.exit_code) from None
        except UsageError as exc:
            _usage_error(exc, ctx)
        except (OSError, MemoryError) as exc:  # the system refused: a full disk, a permission, no memory
            if debug_enabled():
                raise
            err_console.print(f"[bold red]error:[/] {escape(_system_error_text(exc))}", soft_wrap=True)
            err_console.print("[dim](set MEXIFY_DEBUG=1 for a traceback)[/]")
            raise typer.Exit(1) from None


def _system_error_text(exc: BaseException) -> str:
    """One line for an error the operating system raised (nothing was replaced: every write is atomic)."""
    if isinstance(exc, MemoryError):
        return "out of memory; use a smaller --batch-size or --input-size"
    text = str(exc).strip().splitlines()
    what = exc.strerror or (text[0] if text else type(exc).__name__)
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    return f"{what}{where}; nothing was replaced (outputs are written to a temporary file and renamed)"


def _usage_error(exc: UsageError, ctx=None) -> None:
    """``error: <what is wrong> (see `mexify CMD --help`)`` on one line, exit code 2; a bare ``mexify`` still prints the help."""
    if isinstance(exc, NoArgsIsHelpError) or debug_enabled():
        raise exc
    where = exc.ctx.command_path if exc.ctx is not None else "mexify"
    if exc.ctx is None and ctx is not None:
        where = " ".join(filter(None, [ctx.command_path, ctx.invoked_subcommand]))
    err_console.print(f"[bold red]error:[/] {escape(exc.format_message())} [dim](see `{escape(where)} --help`)[/]", soft_wrap=True)
    raise typer.Exit(exc.exit_code) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit(0)


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
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, expose_value=True,
                                 help="Print the mexify version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what each step does."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # operators without a FLOPs formula are expected (fvcore skips them too)
        logging.getLogger("mexify.graph.flops").setLevel(logging.ERROR)


for _name in _COMMANDS:
    importlib.import_module(f"mexify.cli.{_name}").register(app)


def main() -> None:
    """Console-script entry point."""
    app()
