"""Plots and CSV files of calibration curves, each written atomically (:func:`mexify.files.atomic_file`).

Figures are drawn with matplotlib's object API (``Figure``), not pyplot, so importing mexify
never changes the caller's matplotlib backend.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from matplotlib.figure import Figure

from mexify.files import atomic_file

log = logging.getLogger(__name__)

__all__ = ["save_pareto", "save_comparison"]


def _finish(fig: Figure, ax: Any, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int,
            title_size: Optional[int] = None) -> None:
    """Labels, grid and legend of a speed-up / mIoU plot, then the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, **({"fontsize": title_size} if title_size else {}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png")


def save_pareto(result: Any, oracle_curve: List[Dict[str, Any]], chosen: Dict[str, Any], out: Path, title: str = "") -> Dict[str, str]:
    """Write ``pareto.csv`` and ``pareto.png`` (mIoU against the mean speed-up in the search's cost model)."""
    out.mkdir(parents=True, exist_ok=True)
    orig = float(result.cache.original_cost)
    unit = result.cache.cost_unit
    csv_path, png_path = out / "pareto.csv", out / "pareto.png"
    with atomic_file(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["curve", f"mean_{unit}", "speedup", "miou", "parameter"])
        for p in result.pareto:
            w.writerow(["policy", f"{p['mean_cost']:.6g}", f"{p['speedup']:.4f}", f"{p['miou']:.4f}",
                        ";".join("inf" if not math.isfinite(t) else f"{t:.6g}" for t in p["thresholds"])])
        for p in result.global_curve:
            w.writerow(["global", f"{p['mean_cost']:.6g}", f"{orig / p['mean_cost']:.4f}", f"{p['miou']:.4f}", f"{p['threshold']:.6g}"])
        for p in oracle_curve:
            w.writerow(["oracle", f"{p['mean_cost']:.6g}", f"{p['speedup']:.4f}", f"{p['miou']:.4f}", f"{p['tolerance']:.4g}"])
        w.writerow(["chosen", f"{chosen['mean_cost']:.6g}", f"{chosen['speedup']:.4f}", f"{chosen['miou']:.4f}", ""])
    try:
        fig = Figure(figsize=(6, 4), dpi=120)
        ax = fig.subplots()
        g = sorted(result.global_curve, key=lambda p: p["mean_cost"])
        ax.plot([orig / p["mean_cost"] for p in g], [p["miou"] for p in g], ".", ms=3, color="0.6", label="one global threshold")
        ax.plot([p["speedup"] for p in result.pareto], [p["miou"] for p in result.pareto], "-", color="C0", label="per-exit thresholds (Pareto)")
        if oracle_curve:
            oc = sorted(oracle_curve, key=lambda p: p["speedup"])
            ax.plot([p["speedup"] for p in oc], [p["miou"] for p in oc], "--", color="C2", label="oracle")
        ax.plot([chosen["speedup"]], [chosen["miou"]], "*", ms=12, color="C3", label="chosen")
        what = f"measured latency, {result.cache.latency.key}" if unit == "ms" else "FLOPs, 1 multiply-add = 1 FLOP"
        _finish(fig, ax, png_path, f"mean speed-up over the original\n({what})",
                "mIoU (%)" if result.cache.labelled else "agreement mIoU with final exit (%)", title, legend_size=8)
    except Exception as e:  # plotting must never fail a calibration
        log.warning("could not draw %s: %s", png_path, e)
        return {"pareto_csv": str(csv_path)}
    return {"pareto_csv": str(csv_path), "pareto_png": str(png_path)}


def save_comparison(curves: Dict[str, List[Dict[str, Any]]], points: Dict[str, Dict[str, Any]], oracle_curve: List[Dict[str, Any]],
                    out: Path, unit: str, title: str = "", stem: str = "compare") -> Dict[str, str]:
    """``<stem>.png`` (every curve, e.g. each policy's Pareto curve on the fitting split, its chosen point
    on the evaluation split, the oracle's curve) and ``<stem>.csv`` (the same numbers)."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / f"{stem}.csv", out / f"{stem}.png"
    with atomic_file(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["policy", "curve", "speedup", "miou"])
        for name, curve in curves.items():
            for p in curve:
                w.writerow([name, "pareto (fit split)", f"{p['speedup']:.4f}", f"{p['miou']:.4f}"])
        for p in oracle_curve:
            w.writerow(["oracle", "tolerances (eval split)", f"{p['speedup']:.4f}", f"{p['miou']:.4f}"])
        for name, p in points.items():
            w.writerow([name, "chosen (eval split)", f"{p['speedup']:.4f}", f"{p['miou']:.4f}"])
    try:
        fig = Figure(figsize=(7, 4.5), dpi=120)
        ax = fig.subplots()
        for k, (name, curve) in enumerate(curves.items()):
            c = sorted(curve, key=lambda p: p["speedup"])
            ax.plot([p["speedup"] for p in c], [p["miou"] for p in c], "-", color=f"C{k % 10}", label=name)
            if name in points:
                ax.plot([points[name]["speedup"]], [points[name]["miou"]], "o", color=f"C{k % 10}", ms=6)
        if oracle_curve:
            oc = sorted(oracle_curve, key=lambda p: p["speedup"])
            ax.plot([p["speedup"] for p in oc], [p["miou"] for p in oc], "--", color="k", label="oracle")
        what = "measured latency" if unit == "ms" else "FLOPs, 1 multiply-add = 1 FLOP"
        _finish(fig, ax, png_path, f"mean speed-up over the original ({what})", "mIoU (%)",
                title or "lines: Pareto curves on the fitting split; dots: chosen thresholds on the evaluation split",
                legend_size=7, title_size=8)
    except Exception as e:  # plotting must never fail a comparison
        log.warning("could not draw %s: %s", png_path, e)
        return {f"{stem}_csv": str(csv_path)}
    return {f"{stem}_csv": str(csv_path), f"{stem}_png": str(png_path)}
