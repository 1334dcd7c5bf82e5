"""A mask-classification segmenter end to end from the command line: a small HuggingFace Mask2Former.

Two flows, each typed as a user would (the commands are printed and their ``--json`` output kept):

* ``mexify``: ``mexify convert transformers:Mask2FormerForUniversalSegmentation`` (random init, a small
  ResNet backbone, 8 classes, 128 px), then ``mexify train`` both stages (the demo's recipe at lr 2e-4:
  stage 1 end to end with a per-pixel cross entropy on every exit, the final exit's log scores included;
  stage 2, 150 iterations, the early heads with positive filtering distillation from the final exit) on
  the built-in synthetic scenes. At the recipe's lr 2e-3 the query decoder collapsed to one class (final
  exit 8.6 mIoU); a per-pixel loss is not how this family is trained from scratch;
* ``user``: the user's own Mask2Former trained first by a plain PyTorch loop with the library's own loss
  (Hungarian matching of queries to one binary mask per class present; 1500 iterations, reused by later
  runs), saved as a safetensors state dict, converted with ``--weights`` and trained by ``mexify train``
  stage 2 only (``--stage2-iters``, 600; the final exit stays the user's model). The common flow.

For each: per-exit mIoU on the 300 held-out test scenes, the FLOPs share of the part that runs on queries
(the transformer decoder and the post-processing: the most a query-based exit could save), an entropy
policy calibrated for ``--max-drop 1.0`` on the calib split and judged on test (``mexify eval``), and
``mexify bench`` on test (measured speed-up against the original model run the same way, beside the
prediction). Writes ``benchmarks/results/mask2former.md`` and ``.json``; bundles go to
``out/bench-mask2former``.

    python benchmarks/bench_mask2former.py [--flows mexify,user] [--user-iters 1500] [--stage2-iters 600] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402
from user_model import mexify as run_mexify  # noqa: E402  (the CLI runner: printed as typed, --json kept)

RESULTS = Path(__file__).resolve().parent / "results"
DATA = "synthetic:scenes?classes=8&size=128&n=400&n_eval=300"  # the demo's scenes: 300 images each in calib and test
SPEC = "transformers:Mask2FormerForUniversalSegmentation"
BACKBONE = {"model_type": "resnet", "embedding_size": 32, "hidden_sizes": [32, 64, 128, 256], "depths": [2, 2, 2, 2],
            "layer_type": "basic", "out_features": ["stage1", "stage2", "stage3", "stage4"]}
CONFIG = {"backbone_config": BACKBONE, "num_labels": 8, "num_queries": 20, "feature_size": 64, "mask_feature_size": 64,
          "hidden_dim": 64, "encoder_feedforward_dim": 128, "dim_feedforward": 128, "encoder_layers": 2, "decoder_layers": 3,
          "num_attention_heads": 4}


def mexify(*argv: str, json_out: bool = True) -> tuple:
    return run_mexify(*argv, json_out=json_out, ok=(0, 3))


def convert_args(weights: Path = None) -> list:
    args = [x for k, v in CONFIG.items() for x in ("--arg", f"{k}={json.dumps(v)}")]
    return [SPEC, *args, "--input-size", "128", *(["--weights", str(weights)] if weights else [])]


def flop_shares() -> list:
    """Where a Mask2Former's FLOPs go (torch's FlopCounterMode on one eager forward, the semantic wrapper
    included): the bench's small model at 128 px, and the library's default Swin-T and a ResNet-50 backbone at
    512 px. The transformer decoder's share is the most an exit inside it could save."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    from mexify.graph.adapt import adapt_module

    stages = {"backbone": "pixel_level_module.encoder", "pixel decoder": "pixel_level_module.decoder",
              "transformer decoder": "transformer_module"}
    cases = [("small (this bench)", Mask2FormerConfig(**CONFIG), 128), ("Swin-T (library default)", Mask2FormerConfig(), 512),
             ("ResNet-50", Mask2FormerConfig(backbone_config=ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"])), 512)]
    rows = []
    for name, config, size in cases:
        torch.manual_seed(0)
        model = adapt_module(Mask2FormerForUniversalSegmentation(config).eval())
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, size, size))
        counts = counter.get_flop_counts()
        total = sum(counts["Global"].values())
        row = {"model": name, "size": size, "gflops": round(total / 2e9, 2)}  # FlopCounterMode counts a multiply-add as 2
        for label, path in stages.items():
            row[label] = round(sum(counts.get(f"MaskClassification.model.model.{path}", {}).values()) / total, 4)
        row["post-processing"] = round(1 - sum(row[k] for k in stages), 4)
        rows.append(row)
    return rows


def per_exit(bundle: Path) -> dict:
    report, run = mexify("eval", str(bundle), "--data", DATA, "--split", "test", "--device", "cpu")
    return {"run": run, "report": report}


def flow(name: str, out: Path, weights: Path = None, stage2_iters: int = 150) -> dict:
    bundle = out / f"{name}.mex"
    record = {"flow": name}
    record["convert_report"], record["convert"] = mexify("convert", *convert_args(weights), "-o", str(bundle), "--overwrite")
    # from random init, stage 1 at the demo recipe's lr (2e-3) collapses the query decoder to one class; 2e-4 trains it
    sets = ["--set", "stage1_iters=0"] if weights else ["--set", "lr=0.0002"]
    sets += ["--set", f"stage2_iters={stage2_iters}"]
    record["train_report"], record["train"] = mexify("train", str(bundle), "--data", DATA, "--recipe", "demo-synthetic",
                                                     *sets, "--device", "cpu")
    record["exits"] = per_exit(bundle)
    _, record["profile"] = mexify("profile", str(bundle), "--device", "cpu", json_out=False)
    record["calibrate_report"], record["calibrate"] = mexify(  # exit code 3: a budget not certified (reported)
        "calibrate", str(bundle), "--data", DATA, "--split", "calib", "--policy", "entropy", "--max-drop", "1.0", "--device", "cpu")
    record["policy"] = per_exit(bundle)
    record["bench_report"], record["bench"] = mexify("bench", str(bundle), "--data", DATA, "--split", "test", "--limit", "100",
                                                     "--device", "cpu")
    return record


def user_weights(out: Path, iters: int) -> tuple:
    """The user's Mask2Former trained by a plain loop with the library's own loss; its state dict and a record."""
    import torch
    from safetensors.torch import save_file
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    from mexify.data import build_dataset

    path, done = out / "user_mask2former.safetensors", out / "user_mask2former.json"
    if path.exists() and done.exists() and json.loads(done.read_text()).get("iters") == iters:
        print(f"reusing {path} (trained for {iters} iterations)", file=sys.stderr)
        return path, json.loads(done.read_text())
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(**CONFIG)).train()
    ds = build_dataset(DATA, split="train", train=True)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (1 - i / iters) ** 0.9)
    gen = torch.Generator().manual_seed(0)
    t0, losses = time.perf_counter(), []
    for it in range(iters):
        idx = torch.randint(len(ds), (8,), generator=gen).tolist()
        images, masks = zip(*(ds[i] for i in idx))
        classes = [m.unique() for m in masks]
        classes = [c[c != 255] for c in classes]
        mask_labels = [torch.stack([(m == c).float() for c in cs]) for m, cs in zip(masks, classes)]
        out_ = model(pixel_values=torch.stack(images), mask_labels=mask_labels, class_labels=[c.long() for c in classes])
        opt.zero_grad()
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out_.loss.item())
        if it % 100 == 0:
            print(f"user loop {it}/{iters}: loss {sum(losses[-100:]) / len(losses[-100:]):.3f}", file=sys.stderr, flush=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    record = {"iters": iters, "seconds": round(time.perf_counter() - t0, 1), "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
              "loss": "transformers' Mask2Former loss (Hungarian matching; class, mask BCE and dice terms)",
              "optimizer": "AdamW lr 4e-4, poly decay, weight decay 0.05, grad-norm clip 1.0, batch 8"}
    done.write_text(json.dumps(record))
    return path, record


def _exit_rows(record: dict) -> list:
    strides = {e["node"]: e["stride"] for e in record["convert_report"]["exits"]}
    return [f"| {record['flow']} | {e['index']} | {e['name']} | {strides.get(e['name'], '')} | {e['miou']:.1f} |"
            for e in record["exits"]["report"]["exits"]]


def write(records: list, shares: list, threads: int) -> None:
    json_path, md_path = RESULTS / "mask2former.json", RESULTS / "mask2former.md"
    json_path.write_text(json.dumps({"machine": cpu_name(), "python": platform.python_version(), "threads": threads,
                                     "flop_shares": shares, "records": records}, indent=2) + "\n")
    lines = ["# Mask2Former end to end", "",
             f"Machine: {cpu_name()}, {threads} threads. A small HuggingFace Mask2Former (ResNet basic blocks 32-256 wide,",
             "20 queries, 3 decoder layers, 8 classes) at 128 px on the built-in synthetic scenes (`" + DATA + "`),",
             "converted, trained, profiled, calibrated and benchmarked from the command line (the commands are in",
             "`mask2former.json`).", "",
             "## Where the FLOPs go (why exits sit on per-pixel features, not inside the transformer decoder)", "",
             "| model | input | GFLOPs | backbone | pixel decoder | transformer decoder | post-processing |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in shares:
        lines.append(f"| {r['model']} | {r['size']} | {r['gflops']} | {100 * r['backbone']:.1f}% | {100 * r['pixel decoder']:.1f}% | "
                     f"{100 * r['transformer decoder']:.1f}% | {100 * r['post-processing']:.1f}% |")
    lines += ["", "An exit after the first of the decoder's layers, taken by every image, would save at most the decoder's share "
              "(the post-processing still runs); exits on the backbone and pixel decoder can skip the rest of the model.", "",
              "## Per-exit mIoU on the 300 test scenes", "", "| flow | exit | node | stride | mIoU |", "|---|---:|---|---:|---:|"]
    for record in records:
        lines += _exit_rows(record)
    lines += ["", "## Entropy policy for --max-drop 1.0 (calibrated on calib, judged on test)", "",
              "| flow | drop on test (points) | budget held | predicted speed-up | measured speed-up (bench, CPU batch 1) |",
              "|---|---:|---|---:|---:|"]
    for record in records:
        check = record["policy"]["report"].get("budget_check") or {}
        bench = record["bench_report"].get("policy") or {}
        lines.append(f"| {record['flow']} | {check.get('observed', float('nan')):.2f} | {check.get('held', '-')} | "
                     f"{bench.get('predicted_speedup', float('nan')):.2f}x | {bench.get('measured_speedup', float('nan')):.2f}x |")
    for record in records:
        if "user_training" in record:
            u = record["user_training"]
            lines += ["", f"The user's model: {u['iters']} iterations of a plain loop with {u['loss']}, {u['optimizer']}; "
                      f"{u['seconds']:.0f} s, final loss {u['final_loss']}."]
    md_path.write_text("\n".join(lines) + "\n")
    print(f"wrote {md_path} and {json_path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", default="mexify,user")
    ap.add_argument("--user-iters", type=int, default=1500, help="iterations of the user's own training loop (reused when done)")
    ap.add_argument("--stage2-iters", type=int, default=600, help="mexify train stage-2 iterations of the user flow")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("out/bench-mask2former"))
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for name in args.flows.split(","):
        if name == "mexify":
            records.append(flow("mexify", args.out))
        elif name == "user":
            weights, training = user_weights(args.out, args.user_iters)
            records.append(dict(flow("user", args.out, weights, args.stage2_iters), user_training=training))
        else:
            sys.exit(f"unknown flow {name!r}: choose mexify and/or user")
    write(records, flop_shares(), args.threads)


if __name__ == "__main__":
    main()
