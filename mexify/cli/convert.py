"""`mexify convert`: a segmentation model becomes a multi-exit bundle."""
from __future__ import annotations

from typing import Any, List, Optional

import typer
from rich.table import Table

from mexify import api
from mexify.cli._common import Annotated, JsonOpt, TrustOpt, count, console, lib_parser, merged, print_json, trust_of, warn

SpecArg = Annotated[str, typer.Argument(help="package.module:factory, file.py:factory, model.pt2, or model.pt (with --trust-pickle).")]
ArgOpt = Annotated[Optional[List[Any]], typer.Option("--arg", parser=lib_parser(api.parse_yaml_assignment), metavar="KEY=VALUE",
                                                     help="Factory argument key=value (YAML scalar); repeatable.")]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", help="State dict (.pt/.pth, loaded weights_only) or .safetensors.")]
SizeOpt = Annotated[Any, typer.Option("--input-size", parser=lib_parser(api.parse_input_size), metavar="HxW",
                                      help="HxW (or N) at which shapes and FLOPs are profiled; sides from 32 to 16384.")]
LeafOpt = Annotated[Optional[List[str]], typer.Option("--leaf-module", help="Module class or qualified name to keep untraced; repeatable.")]
AutowrapOpt = Annotated[Optional[List[str]], typer.Option("--autowrap", help="Function (package.module.fn) to record as one call; repeatable.")]
TraceOpt = Annotated[str, typer.Option("--trace", parser=lib_parser(api.parse_trace_method), metavar="auto|fx|export",
                                       help="auto (torch.fx, then torch.export), fx, or export.")]


def trace_of(input_size: Any, leaf_module: Optional[List[str]], autowrap: Optional[List[str]], trace: str) -> Any:
    """The :class:`~mexify.api.TraceConfig` that ``--input-size``, ``--leaf-module``, ``--autowrap`` and ``--trace`` give."""
    return api.TraceConfig(input_size=input_size, leaf_modules=tuple(leaf_module or ()), autowrap_functions=tuple(autowrap or ()),
                           method=trace)


def _fmt_flops(f: int) -> str:
    return f"{f / 1e9:.2f}G" if f >= 1e8 else f"{f / 1e6:.1f}M"


def exit_table(result) -> Table:
    table = Table(title="Exits (FLOPs: 1 multiply-add = 1 FLOP)", title_justify="left")
    table.add_column("#", justify="right", no_wrap=True, min_width=1)
    table.add_column("exit node", no_wrap=True)
    for col in ("stride", "ch", "fuses", "backbone %", "head", "to exit", "% orig"):
        table.add_column(col, justify="left" if col == "fuses" else "right", no_wrap=True)
    for row in result.table():
        table.add_row(
            str(row["exit"]), row["node"], f"{row['stride']:g}", str(row["channels"]),
            f"{row['skip']} (stride {row['skip_stride']:g})" if row["skip"] else "-",
            f"{row['backbone_percent']:.1f}", _fmt_flops(row["head_flops"]) if row["head_flops"] else "-",
            _fmt_flops(row["flops_to_exit"]), f"{row['percent_of_original']:.1f}",
        )
    return table


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert_cmd(
        spec: SpecArg,
        out: Annotated[Optional[str], typer.Option("-o", "--out", help="Bundle directory to write.")] = None,
        arg: ArgOpt = None,
        weights: WeightsOpt = None,
        exits: Annotated[int, typer.Option("--exits", parser=count("--exits"), metavar="N", help="Number of early exits placed by FLOPs.")] = 6,
        at: Annotated[Optional[str], typer.Option("--at", help="Comma-separated exit node names (overrides --exits).")] = None,
        head: Annotated[str, typer.Option("--head", parser=lib_parser(api.parse_head_template), metavar="mess|fcn",
                                          help="Head template: mess or fcn.")] = "mess",
        head_set: Annotated[Optional[List[Any]], typer.Option("--head-set", parser=lib_parser(api.parse_head_settings), metavar="K=V,...",
                                                              help="Head overrides, e.g. width=128,blocks=2,aspp_rates=6:12.")] = None,
        heads: Annotated[Optional[str], typer.Option("--heads", parser=lib_parser(api.parse_head_space), metavar="SPACE|FILE.yaml",
                                                     help="Head candidates per exit instead of one head: a space "
                                                     "(mess, mess-fcn) or a YAML file listing head settings; calibrate --search keeps one.")] = None,
        input_size: SizeOpt = "512x512",
        leaf_module: LeafOpt = None,
        autowrap: AutowrapOpt = None,
        trace: TraceOpt = "auto",
        trust_pickle: TrustOpt = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle at -o.")] = False,
        no_check: Annotated[bool, typer.Option("--no-check", help="Skip the self-check that dropping rows at a cut never changes the kept rows.")] = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Convert a segmentation model into a multi-exit model and write a bundle."""
        result = api.convert(
            spec, args=merged(arg), weights=weights, exits=exits,
            at=[a.strip() for a in at.split(",") if a.strip()] if at else None,
            head=head, head_set=merged(head_set), trace=trace_of(input_size, leaf_module, autowrap, trace),
            trust=trust_of(False, trust_pickle), out=out, overwrite=overwrite, check=not no_check, heads=heads,
        )
        for note in result.notes:
            warn(note)
        if json_out:
            print_json({"bundle": out, "seconds": round(result.seconds, 3), "num_classes": result.model.num_classes,
                        "tracer": "export" if result.config.trace.export_shapes else "fx",
                        "export_shapes": result.config.trace.export_shapes or None,
                        "train_mode": not result.model.train_issue, "notes": result.notes,
                        "original_flops": result.model.original_flops, "output_stride": result.output_stride, "exits": result.table()})
            return
        console.print(exit_table(result))
        where = f" -> bundle [bold]{out}[/]" if out else " (no -o given: nothing written)"
        shapes = result.config.trace.export_shapes
        tracer = {"batch": "torch.export, batch dynamic, spatial size fixed", "batch+spatial": "torch.export, batch and "
                  "spatial sizes dynamic"}.get(shapes, "torch.fx")
        console.print(f"converted {spec} in {result.seconds:.1f}s ({tracer}): {len(result.exits)} early exits + final, "
                      f"{result.model.num_classes} classes, output path at stride {result.output_stride:g}{where}")
        if result.model.train_issue:
            console.print(f"[yellow]note:[/] stage-1 training is not possible: {result.model.train_issue}")
