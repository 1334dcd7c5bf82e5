"""`mexify inspect`: the candidate exit points of a model."""
from __future__ import annotations



import typer
from rich.table import Table

from mexify import api
from mexify.cli._common import JsonOpt, TrustOpt, trust_of, console, merged, print_json
from mexify.cli.convert import ArgOpt, AutowrapOpt, LeafOpt, SizeOpt, SpecArg, TraceOpt, WeightsOpt, trace_of


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        spec: SpecArg,
        arg: ArgOpt = None,
        weights: WeightsOpt = None,
        input_size: SizeOpt = "512x512",
        leaf_module: LeafOpt = None,
        autowrap: AutowrapOpt = None,
        trace: TraceOpt = "auto",
        trust_pickle: TrustOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        """List candidate exit points: node, shape, stride, cumulative FLOPs %."""
        traced = api.inspect(
            spec, args=merged(arg), weights=weights, trace=trace_of(input_size, leaf_module, autowrap, trace),
            trust=trust_of(False, trust_pickle),
        )
        rows = [c.to_dict() for c in traced.candidates]
        if json_out:
            print_json({"num_classes": traced.num_classes, "total_flops": traced.total_flops, "output_stride": traced.output_stride,
                        "fuse_stride": api.fuse_stride(traced.output_stride), "input_size": list(traced.input_size), "candidates": rows})
            return
        table = Table(title=f"Candidate exit points ({len(rows)}; FLOPs: 1 multiply-add = 1 FLOP)", title_justify="left")
        for col in ("node", "block", "shape", "stride", "cum. FLOPs %", "live tensors", "shrink"):
            table.add_column(col, justify="left" if col in ("node", "block", "shrink") else "right")
        for c in traced.candidates:
            table.add_row(c.name, c.block or "-", f"{c.channels}x{c.height}x{c.width}", f"{c.stride:g}",
                          f"{100 * c.fraction:.1f}", str(c.live_tensors), "no" if c.shrink_issue else "ok")
        console.print(table)
        for c in traced.candidates:
            if c.shrink_issue:
                console.print(f"[yellow]{c.name}[/]: not an exit point, {c.shrink_issue}")
        console.print(f"total {traced.total_flops / 1e9:.2f} GFLOPs at {traced.input_size[0]}x{traced.input_size[1]}, "
                      f"{traced.num_classes} classes")
        target = api.fuse_stride(traced.output_stride)
        coarse = sum(c.stride > target * 1.01 for c in traced.candidates)
        console.print(f"output path at stride {traced.output_stride:g}: an exit coarser than stride {target:g} ({coarse} of the candidates) "
                      "reaches the model's detail only with a fused head (the default), which reads a finer feature computed before it")
