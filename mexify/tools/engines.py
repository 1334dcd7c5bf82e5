"""Engines: the torch runtime and the onnxruntime runner behind one interface, and their comparison.

``mexify predict --engine onnxruntime`` runs an ONNX export through :class:`OnnxEngine`, which
answers like :class:`~mexify.runtime.EarlyExitRuntime` (``predict_batch -> BatchPrediction``).
``mexify bench --engine torch --engine onnxruntime`` (:func:`compare_engines`) runs the same
images through each engine: latency with the policy and with every exit off (the original
graph, stage after stage, as that engine runs it), exit mix, mIoU, and agreement with the first
engine (same exit chosen, same mask pixel).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from mexify.trust import Trust
from mexify.bundle import load, read_config
from mexify.config import json_safe
from mexify.deploy import Runner
from mexify.errors import BundleError, ConfigError
from mexify.metrics import ConfusionMatrix
from mexify.nn import device_name, exit_flops, module_device, resolve_device
from mexify.runtime import EarlyExitRuntime
from mexify.runtime.results import BatchPrediction
from mexify.tools.bench import _batches

__all__ = ["ENGINES", "OnnxEngine", "EngineReport", "compare_engines", "make_engine", "time_policies"]

ENGINES = ("torch", "onnxruntime")


class OnnxEngine:
    """:class:`mexify.deploy.Runner` answering like the torch runtime (tensors in and out).

    Args:
        path: an ONNX export (``mexify export --format onnx``).
        exit: force every image to this exit (index, negative from the end, or name).
        threads: onnxruntime intra-op threads.
    """

    def __init__(self, path: Union[str, Path], exit: Union[int, str, None] = None, threads: Optional[int] = None):
        try:
            self.runner = Runner(path, exit=exit, threads=threads)
        except ImportError as e:
            raise ConfigError("the onnxruntime engine needs onnxruntime", "pip install 'mexify[deploy]'") from e
        config = read_config(path)
        e = len(config.exits) + 1
        self.model = types.SimpleNamespace(
            num_exits=e, exit_names=config.exit_names, num_classes=config.num_classes, original_flops=config.original_flops,
            input_size=tuple(config.trace.input_size),
        )
        self.policy = types.SimpleNamespace(name=self.runner.policy if self.runner.exit is None else "fixed-exit")
        self.active = list(self.runner.active)
        self.exit_flops = exit_flops([x.stage_flops for x in config.exits] + [config.final_flops],
                                     [x.head_flops for x in config.exits], self.active)
        self.exit_names = list(config.exit_names)

    def predict_batch(self, x: torch.Tensor) -> BatchPrediction:
        r = self.runner.predict(x.detach().to("cpu", torch.float32).numpy())
        idx = torch.from_numpy(r.exit_index)
        flops = torch.tensor(self.exit_flops, dtype=torch.long)[idx]
        return BatchPrediction(torch.from_numpy(r.masks), idx, torch.from_numpy(r.confidence), flops, self.exit_names)


def is_onnx_export(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a directory written by ``mexify export --format onnx``."""
    try:
        export = read_config(path).export
    except BundleError:
        return False
    return bool(export) and export.get("format") == "onnx"


def make_engine(engine: str, path: Union[str, Path], exit: Union[int, str, None] = None, device: Any = None,
                trust: Trust = Trust(), threads: Optional[int] = None, final_confidence: bool = False) -> Any:
    """The runtime of ``engine`` over ``path``: a bundle or pt2 export for ``torch``, an ONNX export for ``onnxruntime``.

    For ``torch`` on an ONNX export, the bundle it was exported from (recorded in it) is used.

    Raises:
        ConfigError: an unknown engine, or a directory the engine cannot run.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}", f"choose one of {', '.join(ENGINES)}")
    onnx = is_onnx_export(path)
    if engine == "onnxruntime":
        if not onnx:
            raise ConfigError(f"{path} is not an ONNX export", f"run `mexify export {path} -o OUT --format onnx` and pass OUT")
        return OnnxEngine(path, exit=exit, threads=threads)
    if onnx:
        source = Path(read_config(path).export.get("source", ""))
        if not (source / "config.yaml").is_file():
            raise BundleError(f"{path} is an ONNX export and the bundle it was exported from ({source}) is not here",
                              "pass the bundle (or a pt2 export) for --engine torch")
        path = source
    model = load(path, device=resolve_device(device), trust=trust)
    forced = exit
    if exit is None and (model.config is None or model.config.policy is None):
        forced = -1
    return EarlyExitRuntime(model, exit=forced, final_confidence=final_confidence)


@dataclasses.dataclass
class EngineReport:
    """One row per engine: what ``mexify bench --engine A --engine B`` prints."""

    device: str
    images: int
    batch_size: int
    image_size: tuple
    repeats: int
    rows: List[Dict[str, Any]]
    notes: List[str]

    def to_dict(self) -> Dict[str, Any]:
        return json_safe(dataclasses.asdict(self))


def _timed_pass(predict: Callable[[torch.Tensor], Any], batches: Sequence[Any], dev: torch.device) -> tuple:
    """Seconds for one pass over ``batches`` (each batch waited for) and the predictions."""
    outs, total = [], 0.0
    for x, _ in batches:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = predict(x)
        out.masks.cpu()  # wait for the batch
        total += time.perf_counter() - t0
        outs.append(out)
    return total, outs


def _median_pass(rt: Any, batches: Sequence[Any], dev: torch.device, warmup: int, repeats: int) -> tuple:
    """Median seconds of ``repeats`` timed passes after ``warmup`` untimed batches, and the last pass's predictions."""
    for x, _ in batches[: max(warmup, 0)]:
        rt.predict_batch(x)
    runs, outs = [], []
    for _ in range(max(repeats, 1)):
        seconds, outs = _timed_pass(rt.predict_batch, batches, dev)
        runs.append(seconds)
    return statistics.median(runs), outs


def compare_engines(
    path: Union[str, Path],
    data: Any,
    engines: Sequence[str] = ENGINES,
    limit: Optional[int] = 32,
    batch_size: int = 1,
    warmup: int = 2,
    repeats: int = 5,
    threads: Optional[int] = None,
    trust: Trust = Trust(),
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> EngineReport:
    """Run the same images through each engine (CPU): latency with the policy and with every exit off,
    the speed-up between the two, the exit mix, mIoU (when labelled) and agreement with the first engine.

    Raises:
        ConfigError: an unknown engine or one that cannot run ``path``. DataError: no image.
    """
    dev = torch.device("cpu")
    batches = _batches(data, batch_size, limit, dev)
    n = sum(int(x.shape[0]) for x, _ in batches)
    rows: List[Dict[str, Any]] = []
    reference = None
    notes = ["original: every exit off, the stages run back to back by the same engine",
             "agreement: with the first engine's exit and mask for each image"]
    for k, engine in enumerate(engines):
        runtimes = {"policy": make_engine(engine, path, trust=trust, threads=threads),
                    "original": make_engine(engine, path, exit=-1, trust=trust, threads=threads)}
        times: Dict[str, float] = {}
        preds = None
        for what, rt in runtimes.items():
            times[what], outs = _median_pass(rt, batches, dev, warmup, repeats)
            if what == "policy":
                preds = outs
            if progress is not None:
                progress("engines", 2 * k + (1 if what == "policy" else 2), 2 * len(engines))
        rt = runtimes["policy"]
        exit_index = torch.cat([p.exit_index for p in preds])
        masks = torch.cat([p.masks.cpu() for p in preds])
        flops = torch.cat([p.flops for p in preds]).double()
        counts = torch.bincount(exit_index, minlength=rt.model.num_exits).tolist()
        row: Dict[str, Any] = {
            "engine": engine,
            "policy": getattr(rt.policy, "name", type(rt.policy).__name__),
            "ms_per_image": 1000 * times["policy"] / n,
            "original_ms_per_image": 1000 * times["original"] / n,
            "measured_speedup": times["original"] / times["policy"] if times["policy"] else None,
            "flops_speedup": float(rt.model.original_flops * n / flops.sum()) if float(flops.sum()) else None,
            "exit_counts": dict(zip(rt.model.exit_names, counts)),
        }
        labels = [y for _, y in batches]
        if all(y is not None for y in labels):
            cm = ConfusionMatrix(rt.model.num_classes)
            cm.update(masks, torch.cat(labels))
            row["miou"] = cm.miou()
        if reference is None:
            reference = (exit_index, masks)
            row["same_exit"], row["same_pixels"] = 1.0, 1.0
        else:
            row["same_exit"] = float((exit_index == reference[0]).double().mean())
            row["same_pixels"] = float((masks == reference[1]).double().mean())
        rows.append(row)
    x0 = batches[0][0]
    return EngineReport(device_name(dev), n, int(x0.shape[0]), (int(x0.shape[-2]), int(x0.shape[-1])), int(repeats), rows, notes)


def time_policies(model: Any, data: Any, policies: Dict[str, Any], limit: Optional[int] = None, batch_size: int = 1,
                  warmup: int = 1, repeats: int = 3, progress: Optional[Callable[[str, int, int], None]] = None) -> Dict[str, float]:
    """Milliseconds per image of the torch runtime over the first ``limit`` images of ``data`` for each
    policy, and for ``"original"``: every exit off (the stages back to back, run the same way).
    Median of ``repeats`` passes, each batch waited for."""
    dev = module_device(model)
    batches = _batches(data, batch_size, limit, dev)
    runtimes = {"original": EarlyExitRuntime(model, exit=-1)}
    runtimes.update({name: EarlyExitRuntime(model, policy) for name, policy in policies.items()})
    n = sum(int(x.shape[0]) for x, _ in batches)
    out = {}
    for k, (name, rt) in enumerate(runtimes.items()):
        out[name] = 1000 * _median_pass(rt, batches, dev, warmup, repeats)[0] / n
        if progress is not None:
            progress("timing", k + 1, len(runtimes))
    return out
