"""Training speed: iterations/s and peak memory of stage 1 (end-to-end) and stage 2 (frozen
backbone under no_grad, early heads with CE + PFD) on CPU, and on CUDA when present.

Each (model, device, stage) runs in a fresh subprocess so that peak RSS is per measurement.
Batches are random tensors of the training shape, so the numbers are the model's compute
(forward, losses, backward, SGD step), not data loading.

    python benchmarks/bench_train.py                 # CPU (+ CUDA if available)
    python benchmarks/bench_train.py --iters 20 --threads 2

Writes a Markdown table to benchmarks/results/train.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train.md"

# (name, spec, input size, batch, devices)
CASES = [
    ("lraspp_mobilenet_v3_large", "torchvision.models.segmentation:lraspp_mobilenet_v3_large", 128, 8, ("cpu", "cuda")),
    ("deeplabv3_resnet50", "torchvision.models.segmentation:deeplabv3_resnet50", 128, 4, ("cpu",)),
    ("deeplabv3_resnet50", "torchvision.models.segmentation:deeplabv3_resnet50", 520, 8, ("cuda",)),
]


def _worker(bundle: str, device: str, stage: int, batch: int, size: int, iters: int, warmup: int, threads: int,
            amp: str) -> dict:
    import resource

    import torch

    import mexify
    from mexify.train.losses import early_exits_loss, multi_exit_ce
    from mexify.train.trainer import _set_stage_modes, _StageForward

    if threads:
        torch.set_num_threads(threads)
    model = mexify.load(bundle).to(device)
    _set_stage_modes(model, stage)
    if stage == 1:
        model.freeze_backbone(False)
        model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    net = _StageForward(model, stage)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch, size, size), generator=g).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    cuda = device.startswith("cuda")
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
        model.to(memory_format=torch.channels_last)

    def step():
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            outs = net(x)
        if stage == 1:
            loss, _ = multi_exit_ce(outs, y)
        else:
            loss = early_exits_loss(outs[:-1], outs[-1], y, "pfd", 0.5, 1.0)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"it_per_s": iters / dt, "ms_per_it": 1000 * dt / iters, "peak_mib": peak,
            "threads": torch.get_num_threads() if not cuda else None,
            "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()}


def _run_worker(args, bundle, device, stage, batch, size) -> dict:
    cmd = [sys.executable, __file__, "--worker", bundle, device, str(stage), str(batch), str(size),
           "--iters", str(args.iters), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--amp", args.amp if device.startswith("cuda") else "none"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default)")
    p.add_argument("--amp", default="bf16", choices=("none", "bf16", "fp16"), help="autocast on CUDA")
    p.add_argument("--devices", default=None, help="comma-separated subset of cpu,cuda")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.worker:
        bundle, device, stage, batch, size = args.worker
        print(json.dumps(_worker(bundle, device, int(stage), int(batch), int(size), args.iters, args.warmup,
                                 args.threads, args.amp)))
        return 0

    import torch

    import mexify

    have_cuda = torch.cuda.is_available()
    wanted = set(args.devices.split(",")) if args.devices else {"cpu", "cuda"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec, size, batch, devices in CASES:
            devs = [d for d in devices if d in wanted and (d == "cpu" or have_cuda)]
            if not devs:
                continue
            bundle = os.path.join(tmp, f"{name}-{size}.mex")
            mexify.convert(spec, args={"num_classes": 21, "weights": None, "weights_backbone": None},
                           trace=mexify.TraceConfig((size, size)), out=bundle)
            if name == "lraspp_mobilenet_v3_large" and "cpu" in devs:
                rows.append(_candidates_row(args, spec, tmp, name, size, batch))
            for dev in devs:
                res = {s: _run_worker(args, bundle, dev, s, batch, size) for s in (1, 2)}
                for s in (1, 2):
                    r = res[s]
                    rows.append({"model": name, "input": f"{size}x{size}", "batch": batch, "device": dev,
                                 "device_name": r["device_name"], "threads": r["threads"],
                                 "amp": args.amp if dev == "cuda" else "none", "stage": s, **r,
                                 "speedup": res[2]["it_per_s"] / res[1]["it_per_s"] if s == 2 else None})
                    print(f"{name} {dev} stage {s}: {r['it_per_s']:.2f} it/s, {r['ms_per_it']:.0f} ms/it, "
                          f"peak {r['peak_mib']:.0f} MiB", file=sys.stderr)
    _write(rows, args)
    return 0


def _candidates_row(args, spec: str, tmp: str, name: str, size: int, batch: int) -> dict:
    """Stage 2 with the mess-fcn head space (5 candidates per exit) against one head per exit, same model:
    the frozen backbone runs once per batch, so the difference should be the extra heads' cost."""
    import mexify

    rows = {}
    for label, heads in (("1 head", None), ("5 candidates", "mess-fcn")):
        bundle = os.path.join(tmp, f"{name}-{size}-{label.replace(' ', '')}.mex")
        res = mexify.api.convert(spec, args={"num_classes": 21, "weights": None, "weights_backbone": None},
                                 trace=mexify.api.TraceConfig((size, size)), out=bundle, heads=heads)
        head_flops = sum(sum(e.candidate_flops or (e.head_flops,)) for e in res.config.exits)
        rows[label] = dict(_run_worker(args, bundle, "cpu", 2, batch, size), head_gflops=head_flops / 1e9,
                           backbone_gflops=res.model.original_flops / 1e9)
        print(f"{name} cpu stage 2, {label}: {rows[label]['ms_per_it']:.0f} ms/it", file=sys.stderr)
    return {"candidates": rows, "model": name, "input": f"{size}x{size}", "batch": batch}


def _write(rows, args) -> None:
    import torch

    lines = [
        "# Training speed (`benchmarks/bench_train.py`)",
        "",
        f"torch {torch.__version__}, {args.iters} timed iterations after {args.warmup} warm-up, random batches "
        "(model compute only: forward, losses, backward, SGD step). 6 early exits + final, MESS heads, 21 classes. "
        "Stage 2 runs the backbone under no_grad and trains only the early heads (CE + 0.5 PFD). "
        "Peak memory: max RSS of the whole process on CPU (includes about 1 GiB of interpreter, torch and "
        "model), max allocated on CUDA. CPU threads: torch intra-op threads (`--threads`); timings on a "
        "shared machine vary by tens of percent between runs, the stage-2/stage-1 ratio much less.",
        "",
        "| model | input | batch | device | threads | amp | stage | it/s | ms/it | peak MiB | stage 2 vs 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cand = [r for r in rows if "candidates" in r]
    rows = [r for r in rows if "candidates" not in r]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} | {r['batch']} | {r['device']} ({r['device_name']}) | "
            f"{r['threads'] or '-'} | {r['amp']} | {r['stage']} | {r['it_per_s']:.2f} | {r['ms_per_it']:.0f} | "
            f"{r['peak_mib']:.0f} | {'%.2fx faster' % r['speedup'] if r['speedup'] else ''} |")
    for c in cand:
        one, many = c["candidates"]["1 head"], c["candidates"]["5 candidates"]
        lines += ["", f"Stage 2 with head candidates ({c['model']} {c['input']}, batch {c['batch']}, CPU): the frozen backbone "
                  "runs once per batch and every candidate trains on its features (CE + PFD each).", "",
                  "| heads per exit | head GFLOPs per image (all exits, forward) | model GFLOPs | ms/it | it/s | peak MiB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, r in (("1 (mess template)", one), ("5 (mess-fcn space)", many)):
            lines.append(f"| {label} | {r['head_gflops']:.3f} | {r['backbone_gflops']:.3f} | {r['ms_per_it']:.0f} | "
                         f"{r['it_per_s']:.2f} | {r['peak_mib']:.0f} |")
        lines.append(f"\n+{many['ms_per_it'] - one['ms_per_it']:.0f} ms/it for {many['head_gflops'] / one['head_gflops']:.1f}x "
                     "the head FLOPs; the backbone's share does not change.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
