"""Engines: the torch runtime and the onnxruntime runner behind one interface, and their comparison.

``mexify predict --engine onnxruntime`` runs an ONNX export through :class:`OnnxEngine`, which
answers like :class:`~mexify.runtime.EarlyExitRuntime` (``predict_batch -> BatchPrediction``).
``mexify bench --engine torch --engine onnxruntime`` (:func:`compare_engines`) runs the same
images through each engine: latency with the policy and with every exit off (the stages back to
back, as that engine runs them), exit mix, mIoU, and agreement with the first engine (same exit
chosen, same mask pixel). Speed-ups are against the original model run the same way
(:func:`mexify.tools.benchmark.original_runner`: torch, eager, on the CPU, since an ONNX export holds
no graph of the original), as ``bench`` and ``compare`` measure them; every exit off is its own
figure, the exits-off overhead. All timing is :func:`mexify.tools.timing.time_calls`.
"""
from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

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
from mexify.tools.benchmark import _batches, original_runner
from mexify.tools.timing import time_calls, timed_pass

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
    the speed-up against the original model and the exits-off overhead, the exit mix, mIoU (when
    labelled) and agreement with the first engine. ``warmup`` untimed passes (at least one), then the
    median of ``repeats`` timed rounds, every engine's runs and the original's in each.

    Raises:
        ConfigError: an unknown engine or one that cannot run ``path``. DataError: no image.
    """
    dev = torch.device("cpu")
    batches = _batches(data, batch_size, limit, dev)
    n = sum(int(x.shape[0]) for x, _ in batches)
    runtimes = {(engine, what): make_engine(engine, path, exit=-1 if what == "exits_off" else None, trust=trust, threads=threads)
                for engine in engines for what in ("policy", "exits_off")}
    run_orig, orig_note = _original(path, runtimes, trust)
    preds: Dict[str, List[BatchPrediction]] = {engine: [] for engine in engines}
    calls = {f"{engine}/{what}": timed_pass(rt.predict_batch, batches, dev, preds[engine] if what == "policy" else None)
             for (engine, what), rt in runtimes.items()}
    if run_orig is not None:
        calls["original"] = timed_pass(run_orig, batches, dev)
    report = (lambda d, t: progress("engines", d, t)) if progress is not None else None
    seconds = time_calls(calls, dev, max(1, warmup), repeats, report)
    labels = [y for _, y in batches]
    rows: List[Dict[str, Any]] = []
    reference = None
    for engine in engines:
        row, got = _engine_row(engine, runtimes[engine, "policy"], preds[engine], seconds, n, labels, reference)
        rows.append(row)
        reference = reference or got
    notes = [f"original: {orig_note}", "exits off: every exit off, the stages run back to back by each engine",
             "agreement: with the first engine's exit and mask for each image"]
    x0 = batches[0][0]
    return EngineReport(device_name(dev), n, int(x0.shape[0]), (int(x0.shape[-2]), int(x0.shape[-1])), int(repeats), rows, notes)


def _original(path: Union[str, Path], runtimes: Dict[Any, Any], trust: Trust) -> tuple:
    """The baseline: the original model, run by torch on the CPU as the torch runtime runs; (None, why) when
    the bundle it comes from is not here."""
    rt = runtimes.get(("torch", "exits_off"))
    if rt is None:
        try:
            rt = make_engine("torch", path, exit=-1, trust=trust)
        except (BundleError, ConfigError) as e:
            return None, f"not measured ({e.message}): no speed-up, no exits-off overhead"
    run, note = original_runner(rt.model, rt)
    return (lambda x: run(x.to(rt.device)).cpu()), f"{note}, run by torch as the torch engine runs it, for every engine"


def _engine_row(engine: str, rt: Any, preds: List[BatchPrediction], seconds: Dict[str, float], n: int, labels: List[Any],
                reference: Optional[tuple]) -> tuple:
    """One engine's row (its latencies against the original's, exit mix, mIoU, agreement with ``reference``,
    the first engine's ``(exit_index, masks)``), and its own ``(exit_index, masks)``."""
    exit_index = torch.cat([p.exit_index for p in preds])
    masks = torch.cat([p.masks.cpu() for p in preds])
    flops = torch.cat([p.flops for p in preds]).double()
    policy_s, off_s, orig_s = seconds[f"{engine}/policy"], seconds[f"{engine}/exits_off"], seconds.get("original")
    row: Dict[str, Any] = {
        "engine": engine,
        "policy": getattr(rt.policy, "name", type(rt.policy).__name__),
        "ms_per_image": 1000 * policy_s / n,
        "original_ms_per_image": 1000 * orig_s / n if orig_s else None,
        "measured_speedup": orig_s / policy_s if orig_s and policy_s else None,
        "exits_off_ms_per_image": 1000 * off_s / n,
        "exits_off_overhead": off_s / orig_s - 1.0 if orig_s else None,
        "flops_speedup": float(rt.model.original_flops * n / flops.sum()) if float(flops.sum()) else None,
        "exit_counts": dict(zip(rt.model.exit_names, torch.bincount(exit_index, minlength=rt.model.num_exits).tolist())),
    }
    if all(y is not None for y in labels):
        row["miou"] = ConfusionMatrix(rt.model.num_classes).update(masks, torch.cat(labels)).miou()
    ref = reference if reference is not None else (exit_index, masks)
    row["same_exit"] = float((exit_index == ref[0]).double().mean())
    row["same_pixels"] = float((masks == ref[1]).double().mean())
    return row, (exit_index, masks)


def time_policies(model: Any, data: Any, policies: Dict[str, Any], limit: Optional[int] = None, batch_size: int = 1,
                  warmup: int = 1, repeats: int = 3, progress: Optional[Callable[[str, int, int], None]] = None,
                  notes: Optional[List[str]] = None) -> Dict[str, float]:
    """Milliseconds per image of the torch runtime over the first ``limit`` images of ``data`` for each
    policy; ``"original"``: the original model run the same way (the baseline of a measured speed-up,
    :func:`~mexify.tools.benchmark.original_runner`); ``"exits_off"``: the runtime with every exit off (the
    stages back to back). :func:`~mexify.tools.timing.time_calls` over passes, each batch waited for;
    what the original is goes to ``notes``."""
    dev = module_device(model)
    batches = _batches(data, batch_size, limit, dev)
    off = EarlyExitRuntime(model, exit=-1)
    run_orig, note = original_runner(model, off)
    if notes is not None:
        notes.append(f"original: {note}, run as the runtime runs ({'CUDA graphs' if off.cuda_graphs else 'eager'}, {off.dtype})")
    calls = {"original": timed_pass(lambda x: run_orig(x).clone(), batches, dev),  # a graph's output is overwritten by its next replay
             "exits_off": timed_pass(off.predict_batch, batches, dev)}
    calls.update({name: timed_pass(EarlyExitRuntime(model, policy).predict_batch, batches, dev) for name, policy in policies.items()})
    n = sum(int(x.shape[0]) for x, _ in batches)
    report = (lambda d, t: progress("timing", d, t)) if progress is not None else None
    return {name: 1000 * s / n for name, s in time_calls(calls, dev, max(1, warmup), repeats, report).items()}
