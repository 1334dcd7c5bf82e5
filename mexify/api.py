"""The verbs of mexify, one function per CLI command: ``from mexify import api``.

This is the one place that turns paths and spec strings into objects (bundles, datasets,
image files) and writes bundles; everything below it takes and returns objects. Each
``mexify`` command parses its options, calls one of these functions and renders the result.

Example::

    from mexify import api

    api.convert("torchvision.models.segmentation:lraspp_mobilenet_v3_large",
                args={"num_classes": 8, "weights": None, "weights_backbone": None},
                trace=api.TraceConfig(input_size=(128, 128)), out="lraspp.mex")
    api.train("lraspp.mex", recipe="quick-synthetic")          # the recipe names its dataset
    api.calibrate("lraspp.mex", "synthetic:scenes?classes=8&size=128", budget=api.Budget.max_drop(1.0))
    report = api.evaluate("lraspp.mex", split="test")
    print(report.final.miou, report.policies[0].flops_speedup)
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import yaml
from torch.utils.data import Dataset

from mexify._version import __version__
from mexify.bundle import read_config, save_bundle, update_bundle
from mexify.bundle import load as _load_bundle
from mexify.calibrate import (
    COST_MODELS,
    Budget,
    CalibrationReport,
    ConfigurationReport,
    PolicyComparison,
    apply_configuration,
    compare_policies,
    fit_policy,
    parse_budget,
    parse_cost,
    DEFAULT_CONFIDENCE,
    parse_confidence,
    parse_max_disagree,
    parse_max_drop,
    search_configuration,
    small_set_note,
)
from mexify.config import (
    TRACE_METHODS,
    TraceConfig,
    json_safe,
    parse_assignment,
    parse_choice,
    parse_count,
    parse_counts,
    parse_number,
    parse_range,
    parse_head_settings,
    parse_image_size,
    parse_input_size,
    parse_size,
    parse_trace_method,
    parse_yaml_assignment,
)
from mexify.data import as_loader, build_dataset, check_classes, parse_dataset_spec, take, to_rgb
from mexify.errors import BudgetError, ConfigError, DataError, Interrupted, MexifyError
from mexify.files import check_dir_writable, updating, writing
from mexify.graph.placement import PlacementConfig, fuse_stride
from mexify.nn import MultiExitModel, device_name, head_space, module_device, parse_device, resolve_device
from mexify.nn.heads import HEAD_TEMPLATES, parse_head_template
from mexify.policies import Policy, available_policies, policy_options
from mexify.prepare import ConvertResult, TracedModel
from mexify.prepare import convert as _convert
from mexify.prepare import inspect as _inspect
from mexify.runtime import DTYPES, EarlyExitRuntime, StreamMonitor, drift_report, parse_dtype
from mexify.tools import (
    ENGINES,
    BenchReport,
    EngineReport,
    ExportResult,
    EvalReport,
    LatencyProfile,
    PolicyResult,
    PredictReport,
    ProfileReport,
    collect_images,
    predictions_out,
    export_bundle,
    make_engine,
    predict_images,
    profile_latency,
    save_comparison,
    save_pareto,
    select_profile,
    time_policies,
)
from mexify.tools import bench as _bench
from mexify.tools import compare_engines as _compare_engines
from mexify.tools import evaluate as _evaluate
from mexify.tools import evaluate_policy as _evaluate_policy
from mexify.tools.export import FORMATS
from mexify.tools.loadtest import LoadReport, LoadtestReport, check_target
from mexify.tools.loadtest import loadtest as _loadtest
from mexify.tools.ray_serving import RayConfig, run_ray
from mexify.tools.serving import ServeConfig, bodies_of, build_service, run_server
from mexify.train import Recipe, TrainReport, default_run_dir, load_recipe, train_model
from mexify.train.checkpoint import CHECKPOINT_NAME
from mexify.trust import Trust, register_builder

__all__ = [
    "convert",
    "inspect",
    "fuse_stride",
    "load",
    "read_config",
    "train",
    "calibrate",
    "search",
    "evaluate",
    "evaluate_policy",
    "predict",
    "bench",
    "compare_engines",
    "profile",
    "export",
    "compare",
    "serve",
    "loadtest",
    # the option objects: one value each
    "Budget",
    "TraceConfig",
    "Trust",
    "ServeConfig",
    "RayConfig",
    # records and errors the CLI renders
    "ConvertResult",
    "TracedModel",
    "TrainReport",
    "CalibrationReport",
    "EvalReport",
    "PolicyResult",
    "BenchReport",
    "EngineReport",
    "PolicyComparison",
    "ConfigurationReport",
    "ExportResult",
    "LoadReport",
    "LoadtestReport",
    "ENGINES",
    "LatencyProfile",
    "PredictReport",
    "ProfileReport",
    "MexifyError",
    "ConfigError",
    "DataError",
    "BudgetError",
    "available_policies",
    "register_builder",
    "json_safe",
    "Interrupted",
    # the parsers of every value a user types: the CLI's option types call these, the functions above check with them
    "parse_size",
    "parse_input_size",
    "parse_image_size",
    "parse_count",
    "parse_counts",
    "parse_number",
    "parse_range",
    "parse_assignment",
    "parse_yaml_assignment",
    "parse_head_settings",
    "parse_head_template",
    "parse_head_space",
    "parse_trace_method",
    "parse_choice",
    "parse_budget",
    "parse_max_drop",
    "parse_max_disagree",
    "parse_confidence",
    "DEFAULT_CONFIDENCE",
    "parse_cost",
    "parse_device",
    "parse_dtype",
    "parse_dataset_spec",
    "parse_recipe_override",
    "parse_policy",
    "policy_options",
    "TRACE_METHODS",
    "COST_MODELS",
    "DTYPES",
    "FORMATS",
    "HEAD_TEMPLATES",
    "__version__",
]

PathLike = Union[str, os.PathLike]
Model = Union[PathLike, MultiExitModel]
Data = Union[str, Dataset, Any]
StageProgress = Optional[Callable[[str, int, int], None]]
MIN_OPSET = 18  # the torch.export -> ONNX exporter's own opset; older ones go through a lossy converter
MAX_OPSET = 23  # the newest opset the pinned torch's ONNX exporter knows (torch.onnx._constants.ONNX_MAX_OPSET)


# =============================================================================== helpers
def load(path: PathLike, *, device: Optional[Union[str, torch.device]] = None, trust: Trust = Trust()) -> MultiExitModel:
    """Rebuild a bundle's :class:`~mexify.nn.MultiExitModel` in eval mode (``mexify.load``; see :func:`mexify.bundle.load`)."""
    return _load_bundle(path, device=device, trust=trust)


def _model(bundle: Model, device: Any = None, trust: Trust = Trust()) -> Tuple[MultiExitModel, Optional[Path]]:
    """A model and its bundle directory (None when given a model)."""
    if isinstance(bundle, (str, os.PathLike)):
        return load(bundle, device=device, trust=trust), Path(bundle)
    if device is not None:
        bundle.to(device)
    return bundle, None


def _dataset(data: Data, split: str, limit: Optional[int] = None, train: bool = False, **kw: Any) -> Any:
    """A dataset from a spec string (``synthetic:scenes``, ``voc:PATH``, ...), or ``data`` itself; first ``limit`` samples."""
    ds = build_dataset(data, split=split, train=train, **kw) if isinstance(data, str) else data
    return take(ds, limit) if isinstance(ds, Dataset) else ds


def _trained_on(model: MultiExitModel, bundle: Any) -> str:
    """The dataset spec the bundle was trained on (its training record)."""
    training = getattr(model.config, "training", None) or {}
    data = training.get("data") if isinstance(training, dict) else None
    if not data:
        raise DataError(f"no --data given and bundle {bundle} records no training dataset", "pass --data, e.g. --data synthetic:scenes")
    return str(data)


def _bundle_dir(bundle: Model) -> Optional[Path]:
    return Path(bundle) if isinstance(bundle, (str, os.PathLike)) else None


def _plots_at(out: Optional[PathLike], bundle_path: Optional[Path], default: str) -> Tuple[Optional[Path], Optional[str]]:
    """Where a command's plots go: ``(a folder outside the bundle, checked now, before any work, None)``
    or ``(None, a folder inside the bundle, relative)``, written into the bundle's new directory before its swap."""
    if out is None:
        return None, (default if bundle_path is not None else None)
    if bundle_path is not None:
        with contextlib.suppress(ValueError):
            return None, str(Path(out).resolve().relative_to(bundle_path.resolve()))
    check_dir_writable(out)
    return Path(out), None


def _write_outputs(bundle_path: Optional[Path], outside: Optional[Path], inside: Optional[str],
                   draw: Callable[[Path], Dict[str, str]], fields: Dict[str, Any], model: Any = None) -> Dict[str, str]:
    """Plots outside the bundle first; then the plots inside it, the config ``fields`` and the ``model``'s
    weights, in one swap of the bundle's directory (:func:`mexify.bundle.update_bundle`). Returns the plot files."""
    files = draw(outside) if outside is not None else {}
    if bundle_path is None or not (fields or inside is not None or model is not None):
        return files

    def extra(tmp: Path) -> None:
        if inside is not None:
            files.update({k: str(bundle_path / inside / Path(v).name) for k, v in draw(tmp / inside).items()})

    update_bundle(bundle_path, model=model, extra=extra, **fields)
    return files


# =============================================================================== parsers
def parse_head_space(text: Union[str, PathLike]) -> str:
    """``--heads``: a head space name (:data:`~mexify.nn.HEAD_SPACES`) or a YAML file of head settings
    (read by :func:`convert`); a name is checked here.

    Raises:
        ConfigError: an unknown space name that is no file either.
    """
    text = os.fspath(text)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return text
    head_space(text)
    return text


def parse_recipe_override(text: str) -> Tuple[str, str]:
    """``--set key=value``: a recipe field and a value it takes (:meth:`~mexify.train.Recipe.parse_override`)."""
    return Recipe.parse_override(text)


def parse_policy(name: str) -> str:
    """A registered policy name (``--policy``)."""
    return parse_choice(str(name).replace("_", "-"), available_policies(), "policy")


def _device(device: Any) -> Any:
    """``device`` checked to exist here (:func:`~mexify.nn.parse_device`); None stays None (the default)."""
    return None if device is None else parse_device(device)


def _counts(**values: Optional[int]) -> None:
    """Check integer arguments by name: ``limit`` (>= 1, or None), ``warmup`` (>= 0), the others >= 1."""
    for name, value in values.items():
        if value is not None:
            parse_count(value, f"--{name.replace('_', '-')}", lo=0 if name in ("warmup", "workers") else 1)


# =============================================================================== convert / inspect
def _head_space(heads: Union[str, PathLike, Sequence[Mapping[str, Any]]]) -> tuple:
    """Head candidates from a space name, a YAML file (a list of head settings, or ``candidates:`` holding one) or a list."""
    if isinstance(heads, (str, os.PathLike)) and (str(heads).endswith((".yaml", ".yml")) or Path(heads).is_file()):
        path = Path(heads)
        if not path.is_file():
            raise ConfigError(f"head space file not found: {path}", "give a YAML file listing head settings, or a space name")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        heads = data.get("candidates") if isinstance(data, dict) else data
        if not isinstance(heads, list):
            raise ConfigError(f"{path} lists no head candidates", "write a list: - {template: mess, blocks: 1}")
    return head_space(heads if not isinstance(heads, os.PathLike) else str(heads))


def _trace(trace: Any) -> TraceConfig:
    """``trace`` when it is a :class:`TraceConfig` with an input size convert accepts (sides from 32)."""
    if not isinstance(trace, TraceConfig):
        raise ConfigError(f"trace must be a TraceConfig, not {type(trace).__name__} {trace!r}",
                          "e.g. trace=TraceConfig(input_size=(512, 512), method='fx') (mexify.api.TraceConfig)")
    parse_input_size(trace.input_size, "--input-size")
    return trace


def convert(
    spec: Union[str, torch.nn.Module],
    *,
    out: Optional[PathLike] = None,
    overwrite: bool = False,
    trace: TraceConfig = TraceConfig(),
    args: Optional[Mapping[str, Any]] = None,
    weights: Optional[str] = None,
    exits: int = 6,
    at: Optional[Sequence[str]] = None,
    head: str = "mess",
    head_set: Optional[Mapping[str, Any]] = None,
    trust: Trust = Trust(),
    placement: PlacementConfig = PlacementConfig(),
    check: bool = True,
    heads: Union[None, str, PathLike, Sequence[Mapping[str, Any]]] = None,
) -> ConvertResult:
    """Convert a segmentation model into a multi-exit model (``mexify convert``) and write a bundle to ``out``.

    Args:
        spec: ``package.module:factory``, ``file.py:factory``, a ``.pt2`` archive, a pickled
            module (with ``trust=Trust(pickle=True)``), or an ``nn.Module`` (converted, but not reloadable).
        out: bundle directory to write atomically (None: nothing is written).
        overwrite: replace an existing bundle at ``out``.
        trace: how the model is traced (:class:`TraceConfig`): the input size (H, W) or ``"HxW"`` at
            which shapes and FLOPs are profiled (default 512x512), leaf modules and autowrapped functions
            kept as single graph nodes (also see :func:`mexify.register_leaf_module` /
            :func:`mexify.register_autowrap_function`), and the tracer: ``auto`` (torch.fx, then
            torch.export), ``fx`` or ``export``.
        args: keyword arguments of a factory spec.
        weights: a state_dict or ``.safetensors`` file loaded into the model first.
        exits: early exits placed by FLOPs (ignored when ``at`` is given).
        at: exit point node names, overriding placement.
        head, head_set: head template (``mess`` or ``fcn``) and overrides of its fields.
        placement: the placement strategy.
        check: verify at every cut that dropping rows there gives each kept image the output it
            gets alone (a few forward passes at a small size); refuse the conversion otherwise.
        heads: head candidates per exit instead of one head: a space name (``mess``, ``mess-fcn``),
            a YAML file listing head settings, or such a list (``calibrate --search`` keeps one).

    Raises:
        MexifyError: any user-facing problem, with a hint; nothing is written then.
    """
    trace = _trace(trace)  # the values first, then the output place, then the work
    parse_head_template(head)
    parse_head_settings(head_set)
    with writing(out, overwrite) if out is not None else contextlib.nullcontext():  # checked before any work, held
        result = _convert(
            spec, trace=trace, args=args, weights=weights, exits=exits, at=at, head=head, head_set=head_set, trust=trust,
            placement=placement, check=check, heads=_head_space(heads) if heads is not None else None,
        )
        if out is not None:
            save_bundle(result.model, out, overwrite=overwrite)
    return result


def inspect(
    spec: Union[str, torch.nn.Module],
    *,
    trace: TraceConfig = TraceConfig(),
    args: Optional[Mapping[str, Any]] = None,
    weights: Optional[str] = None,
    trust: Trust = Trust(),
) -> TracedModel:
    """Trace and profile a model and list its candidate exit points, converting nothing (``mexify inspect``).

    ``trace``, ``args``, ``weights`` and ``trust`` are as for :func:`convert`."""
    return _inspect(spec, trace=_trace(trace), args=args, weights=weights, trust=trust)


# =============================================================================== train
def train(
    bundle: PathLike,
    data: Optional[Data] = None,
    *,
    recipe: Any = "quick-synthetic",
    out: Optional[PathLike] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    weights: Optional[PathLike] = None,
    resume: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    progress: Optional[Callable[[Any], None]] = None,
    run_dir: Optional[PathLike] = None,
    trust: Trust = Trust(),
    overwrite: bool = False,
) -> TrainReport:
    """Train a bundle in two stages (``mexify train``) and write the trained bundle.

    Args:
        bundle: bundle directory made by :func:`convert`.
        data: dataset spec or dataset of ``(image, mask)``; default: the recipe's ``data``.
        recipe: recipe name (``quick-synthetic``, ...), YAML path, mapping or ``Recipe``.
        out: where to write the trained bundle (default: update ``bundle`` in place).
        overrides: recipe fields to change (``{"lr": 0.01}``).
        weights: the original model's trained weights, loaded into the backbone first.
        resume: continue from the checkpoint in ``run_dir``.
        device: ``cpu``, ``cuda``, ``cuda:1``; default CUDA when available.
        progress: called with a :class:`~mexify.train.TrainEvent` at stage start, every
            iteration and stage end.
        run_dir: checkpoints and logs (default ``<out>.train`` beside the bundle).
        overwrite: replace an existing bundle at ``out`` (another than ``bundle``; with ``resume``,
            the bundle the run being resumed wrote may be replaced without it).

    Before any work, ``out`` (or ``bundle``, trained in place) and ``run_dir`` are checked to be
    writable and ``out`` is locked against other mexify processes until the bundle is written.

    Raises:
        ConfigError: bad recipe, or no dataset anywhere. DataError: dataset does not fit.
        TrainingError: non-finite loss or unreadable checkpoint. BundleError: ``out`` may not be written.
    """
    rec = load_recipe(recipe, overrides)
    data = data if data is not None else rec.data
    if data is None:
        raise ConfigError(f"recipe {rec.name!r} names no dataset and no --data was given",
                          "pass --data SPEC, or add `data: SPEC` to the recipe")
    if isinstance(data, str):
        parse_dataset_spec(data)
    device = _device(device)
    bundle, out = Path(bundle), Path(out) if out is not None else Path(bundle)
    in_place = out.resolve() == bundle.resolve()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(out)
    main = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 writes
    claim = updating(bundle, "train it in place") if in_place else writing(out, overwrite or resume)
    with claim if main else contextlib.nullcontext():
        if main:
            check_dir_writable(run_dir, "--run-dir")
        model = load(bundle, device="cpu", trust=trust)
        if model.config is not None and model.config.export is not None:
            raise ConfigError(f"{bundle} is an export: its programs run inference only",
                              "train the bundle it was exported from, then export it again")
        dataset = _dataset(data, "train", train=True, crop_size=rec.crop_hw, base_size=rec.base_size)
        data_name = os.fspath(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__
        note = _trained_backbone_note(model, rec, overrides, weights, resume)
        if note and main:
            logging.getLogger("mexify").warning(note)

        def save(trained: MultiExitModel, record: Dict[str, Any]) -> None:
            if in_place:
                update_bundle(out, model=trained, training=record)
            else:
                cfg = dataclasses.replace(trained.config or read_config(bundle), training=record)
                save_bundle(trained, out, config=cfg, overwrite=True)

        started = time.time()
        try:
            report = train_model(model, dataset, rec, run_dir, weights=weights, resume=resume, device=device,
                                 progress=progress, save=save, data_name=data_name)
        except KeyboardInterrupt as e:
            raise Interrupted(_checkpoint_after(run_dir, None if resume else started)) from e
    return dataclasses.replace(report, bundle=str(bundle), out=str(out))


def _trained_backbone_note(model: MultiExitModel, rec: Any, overrides: Optional[Mapping[str, Any]],
                           weights: Optional[PathLike], resume: bool) -> Optional[str]:
    """A warning when a recipe's stage 1 is about to retrain a backbone the user already trained.

    Stage 1 trains every weight end to end, so the final exit stops being the user's model; for a trained
    model, stage 2 alone measures better (docs/train.md, "Which order for a trained model"). Said only
    when the user did not choose ``stage1_iters`` themselves."""
    spec = model.config.spec if model.config is not None else {}
    trained = weights is not None or bool((spec or {}).get("weights"))
    if resume or not trained or rec.stage1_iters <= 0 or "stage1_iters" in (overrides or {}):
        return None
    return (f"the backbone was given trained weights, and recipe {rec.name!r} runs stage 1 "
            f"({rec.stage1_iters} iterations end to end), which retrains it: the final exit will no longer "
            "be your model. To train only the exits, pass --set stage1_iters=0 (see docs/train.md, "
            "'Which order for a trained model')")


def _checkpoint_after(run_dir: Path, since: Optional[float]) -> Optional[str]:
    """The run's checkpoint, when there is one (written after ``since``, when given): what ``--resume`` reads."""
    ckpt = Path(run_dir) / CHECKPOINT_NAME
    if ckpt.is_file() and (since is None or ckpt.stat().st_mtime >= since - 1.0):
        return str(ckpt)
    return None


# =============================================================================== calibrate
def calibrate(
    bundle: Model,
    data: Data,
    *,
    policy: Union[str, Policy] = "mess",
    budget: Budget = Budget(),
    split: str = "calib",
    limit: Optional[int] = None,
    batch_size: int = 4,
    temperature: bool = False,
    policy_options: Optional[Dict[str, Any]] = None,
    means_split: str = "train",
    means_limit: Optional[int] = 200,
    edge_radius: Optional[int] = None,
    out: Optional[PathLike] = None,
    write: bool = True,
    device: Any = None,
    trust: Trust = Trust(),
    progress: StageProgress = None,
    warn: Optional[Callable[[str], None]] = None,
) -> CalibrationReport:
    """Fit an exit policy on a calibration split for a budget and write it into the bundle (``mexify calibrate``).

    Args:
        bundle: bundle directory (updated in place) or a ``MultiExitModel`` (only ``out`` is written).
        data: dataset spec (``synthetic:scenes``, ``voc:PATH``, ...) or a Dataset of ``(image, mask)``.
        policy: registry name or a :class:`~mexify.policies.Policy`.
        budget: what to fit for and how exits are costed (:class:`Budget`): ``Budget.parse("2x")`` (or
            ``"40%"``, ``"8ms"``) for the most accurate thresholds within that mean cost,
            ``Budget.max_drop(1.0)`` (the default) for the fastest within that many mIoU points of the
            final exit; its ``cost`` (default: latency when the bundle has a latency profile, else FLOPs)
            and ``profile`` (default: the calibration device's at batch 1, float32 where there is one).
        split, limit, batch_size: the calibration images (the first ``limit``) and images per pass.
        temperature: fit one temperature per exit first (needs labels).
        policy_options: keyword options of the policy (e.g. ``{"pixel_threshold": 0.95}``).
        means_split, means_limit: labelled data for class-means' class means.
        edge_radius: boundary half-width of the exit cache (default: the policy's).
        out: directory for ``pareto.csv``/``pareto.png`` (default ``BUNDLE/calibration``).
        write: write the fitted policy into the bundle's ``config.yaml``.
        progress: ``callback(stage, done, total)``.
        warn: receives a warning when the calibration set is small (fewer than 50 images; the
            report's notes say it too).

    The dataset's ``means_split`` is read only for policies that need class means (class-means):
    the others calibrate from ``split`` alone (a held-out folder is enough). Head candidates are
    chosen by :func:`search`.

    Raises:
        BudgetError: the budget is below the cheapest reachable cost (nothing is written).
        ConfigError: bad policy, budget or options.
    """
    with _calibration_run(bundle, data, policy, budget, policy_options, split=split, limit=limit, batch_size=batch_size,
                          write=write, out=out, device=device, trust=trust, warn=warn) as run:
        model, ds, device, bundle_path = run.model, run.images, run.device, run.bundle_path

        def means() -> Any:  # read only by policies that need class means
            return _dataset(data, means_split, means_limit) if isinstance(data, str) else _dataset(ds, split, means_limit)
        report = fit_policy(
            model,
            lambda: as_loader(ds, batch_size),
            policy=policy,
            budget=budget,
            latency=_latency_profile(model, budget),
            temperature=temperature,
            means_batches=lambda: as_loader(means(), batch_size),
            policy_options=policy_options,
            edge_radius=edge_radius,
            device=device,
            total=math.ceil(len(ds) / batch_size) if hasattr(ds, "__len__") else None,
            progress=progress,
        )
        seen = _calibrated_on(data, split, limit)
        fields = {"policy": {**report.policy.to_dict(), "calibrated_on": seen}} if write and bundle_path is not None else {}
        report.files = _write_outputs(bundle_path, run.outside, run.inside, lambda d: save_pareto(
            report.search, report.oracle_curve, report.figures, d, title=f"{report.policy.name} on {split}"), fields)
        if fields:
            report.files["config"] = str(bundle_path / "config.yaml")
        return _noted(report, run.small)


@dataclasses.dataclass
class _CalibrationRun:
    """What calibrate and search share: the model, the calibration images, where the outputs go."""

    model: MultiExitModel
    images: Any
    small: Optional[str]  # the small-set note, or None
    device: Any
    bundle_path: Optional[Path]
    outside: Any
    inside: Any


@contextlib.contextmanager
def _calibration_run(bundle: Model, data: Data, policy: Any, budget: Any, policy_options: Any, *, split: str,
                     limit: Optional[int], batch_size: int, write: bool, out: Optional[PathLike], device: Any,
                     trust: Trust, warn: Optional[Callable[[str], None]]) -> Iterator[_CalibrationRun]:
    """Every value and output checked before any work, the bundle locked, the model and the images loaded."""
    _check_fit_args(policy, budget, policy_options, data)
    _counts(batch_size=batch_size, limit=limit)
    device = _device(device)
    bundle_path = _bundle_dir(bundle)
    outside, inside = _plots_at(out, bundle_path, "calibration")
    with updating(bundle_path if write or inside is not None else None, "write the calibration into it"):
        model, _ = _model(bundle, device, trust=trust)
        images, small = _calibration_set(model, data, split, limit, warn)
        yield _CalibrationRun(model, images, small, device, bundle_path, outside, inside)


def _check_fit_args(policy: Any, budget: Any, options: Optional[Mapping[str, Any]], data: Any) -> None:
    """The values of a calibration checked before any work (each is checked again where it is used)."""
    if not isinstance(budget, Budget):
        raise ConfigError(f"budget must be a mexify.api.Budget, not {type(budget).__name__} {budget!r}",
                          "Budget.parse('2x'), Budget.max_drop(1.0) or Budget.from_options(budget=..., max_drop=..., cost=..., profile=...)")
    if isinstance(policy, str):
        policy_options(policy, options)
    if isinstance(data, str):
        parse_dataset_spec(data)


def _calibration_set(model: MultiExitModel, data: Data, split: str, limit: Optional[int],
                     warn: Optional[Callable[[str], None]]) -> Tuple[Any, Optional[str]]:
    """The calibration images, checked against the model's classes, and the small-set warning (given to ``warn``)."""
    ds = _dataset(data, split, limit, num_classes=model.num_classes)
    check_classes(ds, model.num_classes)
    small = small_set_note(len(ds)) if hasattr(ds, "__len__") else None
    if small and warn is not None:
        warn(small)
    return ds, small


def _calibrated_on(data: Data, split: str, limit: Optional[int]) -> Dict[str, Any]:
    """What a fitted policy records of the images it was fitted on."""
    return {"data": data if isinstance(data, str) else type(data).__name__, "split": split, "limit": limit}


def _latency_profile(model: MultiExitModel, budget: Budget) -> Optional[Dict[str, Any]]:
    """The bundle's latency profile that ``budget.profile`` names (default: the model's device at batch 1, or at its
    largest profiled batch for a ``batched`` budget: a throughput), or None."""
    table = getattr(getattr(model, "config", None), "latency", None)
    return select_profile(table, budget.profile, device_name(module_device(model)), largest_batch=budget.batched)


def _noted(report: Any, note: Optional[str]) -> Any:
    """``report`` with ``note`` first among its notes (when there is one)."""
    if note:
        report.notes.insert(0, note)
    return report


# =============================================================================== search
def search(
    bundle: Model,
    data: Data,
    *,
    policy: str = "mess",
    budget: Budget = Budget(),
    split: str = "calib",
    limit: Optional[int] = None,
    batch_size: int = 4,
    policy_options: Optional[Dict[str, Any]] = None,
    keep_candidates: bool = False,
    max_exits: Optional[int] = None,
    out: Optional[PathLike] = None,
    write: bool = True,
    device: Any = None,
    trust: Trust = Trust(),
    progress: StageProgress = None,
    warn: Optional[Callable[[str], None]] = None,
) -> ConfigurationReport:
    """Choose per exit off or one head candidate, and the thresholds, for a budget (``mexify calibrate --search``).

    The bundle was converted with head candidates (``convert --heads``); the configuration is searched
    on one exit cache (:func:`mexify.calibrate.search_configuration`), plotted against the uniform-FCN
    configuration (``search.png``), and written: the chosen heads, the policy, and the latency profiles
    that timed every candidate; the other candidates are dropped unless ``keep_candidates``.

    Args:
        policy: a policy whose parameters are not per exit (mess, entropy, maxprob, cbt, fft).
        max_exits: at most this many early exits on: the search moves them among the bundle's exit positions
            (convert with more positions than you keep, e.g. ``--exits 12`` for 6; one head per exit suffices).
        budget, split, limit, batch_size, policy_options, out, write, device, progress, warn:
            as for :func:`calibrate`.

    Raises:
        ConfigError: a bundle without candidates, a policy that cannot be searched, a bad budget.
        BudgetError: a budget below every configuration's cheapest cost (nothing is written).
    """
    with _calibration_run(bundle, data, policy, budget, policy_options, split=split, limit=limit, batch_size=batch_size,
                          write=write, out=out, device=device, trust=trust, warn=warn) as run:
        model, ds, device, bundle_path = run.model, run.images, run.device, run.bundle_path
        name = policy if isinstance(policy, str) else policy.name
        report = search_configuration(model, lambda: as_loader(ds, batch_size), policy=name, budget=budget,
                                      latency=_latency_profile(model, budget), policy_options=policy_options,
                                      device=device, progress=progress, max_exits=max_exits)
        fields = _searched_fields(model, report, keep_candidates, _calibrated_on(data, split, limit)) if write and bundle_path else {}
        report.files = _write_outputs(bundle_path, run.outside, run.inside, lambda d: _save_search(report, d, f"{name} on {split}"),
                                      fields, model=model if fields else None)
        if fields:
            report.files["config"] = str(bundle_path / "config.yaml")
        return _noted(report, run.small)


def _save_search(report: ConfigurationReport, folder: Path, title: str) -> Dict[str, str]:
    """The searched configuration's curve and point beside the uniform-FCN and uniform-mess ones (``search.png``)."""
    curves, points = {"searched": report.pareto}, {"searched": report.figures}
    if report.baseline is not None:
        curves["uniform fcn"], points["uniform fcn"] = report.baseline_pareto, report.baseline
    if report.default is not None:
        curves["uniform mess b1"], points["uniform mess b1"] = report.default_pareto, report.default
    unit = "ms" if any("measured latency" in n for n in report.notes) else "flops"
    return save_comparison(curves, points, [], folder, unit, title=f"{title}: searched heads vs uniform FCN", stem="search")


def _searched_fields(model: MultiExitModel, report: ConfigurationReport, keep: bool, seen: Dict[str, Any]) -> Dict[str, Any]:
    """The chosen heads made the model's (:func:`~mexify.calibrate.apply_configuration`), and the config fields
    the bundle gets: exits, the latency profiles kept for them, the policy."""
    tables = dict(model.config.latency or {})
    heads_change = model.candidates is not None  # a search over positions alone keeps every head (and its profiles)
    apply_configuration(model, report.choice, keep_candidates=keep)
    kept, dropped = _chosen_profiles(tables, model.config.exits, keep) if heads_change else (tables, [])
    if dropped:
        report.notes.append(f"the heads changed: latency profiles without every candidate's time were dropped "
                            f"({', '.join(dropped)}); run `mexify profile` again")
    return {"exits": model.config.exits, "latency": kept or None, "policy": {**report.policy.to_dict(), "calibrated_on": seen}}


def _chosen_profiles(tables: Dict[str, Any], exits: Sequence[Any], keep: bool) -> Tuple[Dict[str, Any], List[str]]:
    """The bundle's latency profiles for the chosen heads: profiles that timed every candidate take the chosen
    ones' times; the others no longer describe the model and are dropped."""
    kept, dropped = {}, []
    for key, entry in tables.items():
        cand = entry.get("candidate_head_ms")
        if not cand:
            dropped.append(key)
            continue
        entry = dict(entry, head_ms=[float(cand[e.name][e.chosen]) for e in exits])
        if not keep:
            entry.pop("candidate_head_ms")
        kept[key] = entry
    return kept, dropped


# =============================================================================== evaluate
def evaluate(
    bundle: Model,
    data: Optional[Data] = None,
    *,
    split: str = "val",
    batch_size: int = 8,
    limit: Optional[int] = None,
    workers: Optional[int] = None,
    device: Any = None,
    with_policy: bool = True,
    progress: StageProgress = None,
    trust: Trust = Trust(),
) -> EvalReport:
    """Accuracy and cost of every exit on a dataset, plus the bundle's policy row when it has one (``mexify eval``).

    Args:
        bundle: bundle directory or ``MultiExitModel``.
        data: dataset spec or Dataset; default: the dataset the bundle was trained on. A ``folder:`` spec
            without ``?classes=N`` or ``classes.txt`` takes the model's class count.
        split, batch_size, limit, workers: what is evaluated and how it is loaded.
        device: where to run (default: cuda if available).
        with_policy: also run the bundle's policy through the runtime (when calibrated), compare its masks
            with the final exit's (``disagreement``, ``agreement_miou``) and, when the policy records the
            budget it was calibrated for, say whether it held on these images (``report.budget_check``).
        progress: ``callback("eval" | "policy", done, total)``.

    Raises:
        DataError: no dataset anywhere, an empty dataset or classes that differ from the model's.
    """
    _counts(batch_size=batch_size, limit=limit, workers=workers)
    device = _device(device)
    if isinstance(data, str):
        parse_dataset_spec(data)
    model, _ = _model(bundle, trust=trust)
    data = data if data is not None else _trained_on(model, bundle)
    ds = _dataset(data, split, num_classes=model.num_classes)
    report = _evaluate(model, ds, device=device, batch_size=batch_size, limit=limit, num_workers=workers,
                       progress=progress)
    if with_policy and model.config is not None and model.config.policy is not None:
        report.policies.append(_evaluate_policy(model, None, ds, batch_size=batch_size, limit=limit, device=device,
                                                progress=progress, against_final=True))
        report.check_budget(model.config.policy, split)
    report.data = data if isinstance(data, str) else type(data).__name__
    report.notes.extend(_seen_in_calibration(model, report.data, split))
    return report


def _seen_in_calibration(model: MultiExitModel, data: str, split: str) -> list:
    """A warning when the bundle's policy was fitted on the very images it is now judged on."""
    policy = getattr(model.config, "policy", None) or {}
    seen = policy.get("calibrated_on") if isinstance(policy, dict) else None
    if isinstance(seen, dict) and seen.get("data") == data and seen.get("split") == split:
        return [f"the policy was calibrated on these images ({data}, split {split}): its figures here are "
                "optimistic; evaluate on a held-out split (e.g. --split test)"]
    return []


def evaluate_policy(
    bundle: Model,
    data: Optional[Data] = None,
    *,
    policy: Any = None,
    split: str = "val",
    batch_size: int = 8,
    limit: Optional[int] = None,
    device: Any = None,
    trust: Trust = Trust(),
) -> PolicyResult:
    """mIoU, mean FLOPs and exit rates of a policy (default: the bundle's) through the early-exit runtime."""
    _counts(batch_size=batch_size, limit=limit)
    device = _device(device)
    model, _ = _model(bundle, trust=trust)
    ds = _dataset(data if data is not None else _trained_on(model, bundle), split, num_classes=model.num_classes)
    return _evaluate_policy(model, policy, ds, batch_size=batch_size, limit=limit, device=device)


# =============================================================================== predict / bench
def predict(
    bundle: Model,
    images: Sequence[PathLike],
    *,
    out: PathLike,
    exit: Union[int, str, None] = None,
    size: Union[str, Tuple[int, int], None] = None,
    batch_size: int = 4,
    skip_bad: bool = False,
    device: Any = None,
    warn: Optional[Callable[[str], None]] = None,
    progress: StageProgress = None,
    trust: Trust = Trust(),
    engine: str = "torch",
) -> PredictReport:
    """Segment image files with early exits: a palette PNG per image and ``predictions.jsonl`` (``mexify predict``).

    Args:
        bundle: bundle directory (calibrated) or ``MultiExitModel``.
        images: image files or directories of images.
        out: output directory.
        exit: force every image to this exit (index, negative from the end, or name).
            Without it and without a policy, every image takes the final exit (with a warning).
        size: ``HxW`` (or N) the images are resized to (default: the bundle's input size).
        batch_size: images per forward pass.
        skip_bad: skip unreadable images with a warning instead of stopping.
        device: where to run (default: cuda if available).
        warn: receives warnings (default: the ``mexify`` logger).
        engine: ``torch`` (a bundle or pt2 export) or ``onnxruntime`` (an ONNX export; CPU
            unless onnxruntime has other providers; the final exit reports no confidence).

    Returns:
        a :class:`PredictReport`: images, exit counts, mean FLOPs and FLOPs speed-up, where the files are;
        and ``drift``: these images against what calibration saw (``{"stats", "compared", "tests",
        "warnings", ...}``, see :func:`mexify.runtime.drift_report`; None with a forced exit), each
        warning also sent to ``warn``. The onnxruntime engine compares the exit mix only.

    Raises:
        DataError: missing paths, no image, or an unreadable image without ``skip_bad``.
    """
    warn = warn or (lambda m: None)
    _counts(batch_size=batch_size)
    device = _device(device)
    parse_choice(engine, ENGINES, "engine")
    size = parse_image_size(size, "--size") if size else None
    with predictions_out(Path(out)):  # checked before any work, held until the new folder is swapped in
        files = collect_images([Path(p) for p in images], warn)
        forced: Union[int, str, None] = int(exit) if isinstance(exit, str) and exit.lstrip("-").isdigit() else exit
        if engine == "torch":
            model, _ = _model(bundle, resolve_device(device), trust=trust)
            config = model.config
        elif not isinstance(bundle, (str, os.PathLike)):
            raise ConfigError(f"--engine {engine} runs an exported directory, not a model object")
        else:
            config = read_config(bundle)
        if forced is None and (config is None or config.policy is None):
            warn("the bundle has no exit policy: every image uses the final exit (run `mexify calibrate` first, or pass --exit N)")
            forced = -1
        rt = (EarlyExitRuntime(model, exit=forced, final_confidence=True) if engine == "torch"
              else make_engine(engine, bundle, exit=forced, device=device, trust=trust, final_confidence=True))
        hw = tuple(rt.model.input_size) if not size else size
        report = predict_images(rt, files, Path(out), hw, batch_size=batch_size, skip_bad=skip_bad, warn=warn, progress=progress)
    report.drift = None if forced is not None else _predict_drift(rt, report, config, warn)
    return report


def _predict_drift(rt: Any, report: PredictReport, config: Any, warn: Callable[[str], None]) -> Dict[str, Any]:
    """The images just segmented against the policy's calibration record (``monitor:``); each finding to ``warn``."""
    stream = getattr(rt, "stream", None)
    if stream is None:  # the onnxruntime engine: the exit mix, from the counts
        stream = StreamMonitor(list(report.exit_counts))
        stream.count([i for i, c in enumerate(report.exit_counts.values()) for _ in range(c)])
    stats = stream.snapshot()
    record = getattr(rt.policy, "monitor", None) or ((getattr(config, "policy", None) or {}).get("monitor"))
    if not record:
        return {"stats": stats.to_dict(), "compared": False, "tests": [], "warnings": [],
                "note": "the policy carries no record of its calibration images (monitor:) to compare with"}
    try:
        found = drift_report(stats, record)
    except ConfigError as e:  # a damaged record costs the check, not the predictions
        warn(f"drift not checked: {e.message}")
        return {"stats": stats.to_dict(), "compared": False, "tests": [], "warnings": [], "note": e.message}
    for line in found.warnings:
        warn(line)
    return {"stats": stats.to_dict(), "compared": True, **found.to_dict()}


def bench(
    bundle: Model,
    data: Data,
    *,
    policy: Any = None,
    split: str = "val",
    limit: Optional[int] = 32,
    batch_size: int = 1,
    warmup: int = 2,
    repeats: int = 5,
    threads: Optional[int] = None,
    device: Any = None,
    cuda_graphs: Optional[bool] = None,
    dtype: Optional[str] = None,
    channels_last: Optional[bool] = None,
    trust: Trust = Trust(),
    progress: StageProgress = None,
) -> BenchReport:
    """Per-exit latency and FLOPs, the original model's latency and the policy's measured speed-up (``mexify bench``).

    On the same images, the policy's masks against the original model's (the share of pixels that differ,
    and with labels the drop in mIoU points), and whether the budget the policy was calibrated for held
    there (``report.budget_check``, named after ``split``).

    Args:
        bundle: bundle directory or ``MultiExitModel``.
        data: dataset spec or Dataset; ``split`` and the first ``limit`` images are used (a ``folder:`` spec
            without ``?classes=N`` or ``classes.txt`` takes the model's class count).
        policy: a policy object or dict (default: the bundle's; without one, exits only).
        batch_size: images per forward pass.
        warmup, repeats: untimed runs, then timed runs whose median is reported.
        threads: CPU threads for torch while it runs (default: torch's; restored afterwards).
        device: where to run (default: cuda if available).
        cuda_graphs, dtype, channels_last: how the runtime runs (see
            :class:`~mexify.runtime.EarlyExitRuntime`); the original model runs the same way.

    Engines (torch against onnxruntime) are compared by :func:`compare_engines`.

    Raises:
        DataError: no image. ConfigError: a policy fitted for another model.
    """
    _counts(limit=limit, batch_size=batch_size, warmup=warmup, repeats=repeats, threads=threads)
    device = _device(device)
    parse_dtype(dtype)
    if isinstance(data, str):
        parse_dataset_spec(data)
    with _threads(threads):
        model, _ = _model(bundle, device, trust=trust)
        ds = _dataset(data, split, limit, num_classes=model.num_classes)
        report = _bench(model, ds, policy=policy, limit=limit, batch_size=batch_size, warmup=warmup, repeats=repeats,
                        device=device, progress=progress, cuda_graphs=cuda_graphs, dtype=dtype, channels_last=channels_last)
    if report.budget_check is not None:
        report.budget_check = dataclasses.replace(report.budget_check, split=split)
    if policy is None and isinstance(data, str):
        report.notes.extend(_seen_in_calibration(model, data, split))
    return report


def compare_engines(
    export: PathLike,
    data: Data,
    *,
    engines: Sequence[str] = ENGINES,
    split: str = "val",
    limit: Optional[int] = 32,
    batch_size: int = 1,
    warmup: int = 2,
    repeats: int = 5,
    threads: Optional[int] = None,
    trust: Trust = Trust(),
    progress: StageProgress = None,
) -> EngineReport:
    """The same images through each engine on the CPU (``mexify bench --engine torch --engine onnxruntime``):
    one row each with measured speed-up, exit mix, mIoU and agreement with the first engine.

    Args:
        export: an ONNX export (``mexify export --format onnx``; the torch engine runs the bundle it was
            exported from) or, for ``("torch",)`` alone, any bundle or pt2 export.
        data: dataset spec or Dataset; ``split`` and the first ``limit`` images are used.
        engines: ``torch``, ``onnxruntime`` (:data:`ENGINES`), in the order of the rows.
        warmup, repeats, threads: as for :func:`bench`.

    Raises:
        ConfigError: an unknown engine or one that cannot run ``export``. DataError: no image.
    """
    _counts(limit=limit, batch_size=batch_size, warmup=warmup, repeats=repeats, threads=threads)
    for engine in engines:
        parse_choice(engine, ENGINES, "engine")
    if isinstance(data, str):
        parse_dataset_spec(data)
    if not isinstance(export, (str, os.PathLike)):
        raise ConfigError("--engine compares exported directories, not a model object")
    with _threads(threads):
        return _compare_engines(export, _dataset(data, split, limit), engines=engines, limit=limit, batch_size=batch_size,
                                warmup=warmup, repeats=repeats, threads=threads, trust=trust, progress=progress)


@contextlib.contextmanager
def _threads(threads: Optional[int]) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` (when given) for the block, then put back: a process-wide setting."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(before)


# =============================================================================== profile
def profile(
    bundle: Model,
    *,
    device: Any = None,
    batch_sizes: Sequence[int] = (1,),
    dtype: str = "float32",
    warmup: int = 3,
    repeats: int = 10,
    threads: Optional[int] = None,
    write: bool = True,
    progress: StageProgress = None,
    graphs: Optional[bool] = None,
    trust: Trust = Trust(),
) -> ProfileReport:
    """Measure each stage's, head's and policy step's latency on a device and keep it in the bundle (``mexify profile``).

    Args:
        bundle: bundle directory (its ``config.yaml`` gains the tables under ``latency``) or a
            ``MultiExitModel`` (nothing written).
        device: ``cpu``, ``cuda``, ... (default: cuda if available).
        batch_sizes: one table per batch size.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (GPU), run under autocast.
        warmup, repeats: untimed runs, then timed runs whose median is kept.
        threads: CPU threads for torch while it measures (default: torch's; restored afterwards).
        write: store the tables in the bundle, replacing those with the same key.
        graphs: time each piece replayed from a CUDA graph (default: on CUDA, as the runtime runs).

    Returns:
        a :class:`ProfileReport`: one :class:`~mexify.runtime.LatencyProfile` per batch size (``profiles``)
        and the bundle they were stored in.

    Raises:
        ConfigError: an unknown dtype or batch size below 1.
    """
    batch_sizes = parse_counts(batch_sizes, "--batch-size")
    _counts(warmup=warmup, repeats=repeats, threads=threads)
    device = _device(device)
    dtype = parse_dtype(dtype)
    with updating(_bundle_dir(bundle) if write else None, "store the latency profile in it"):  # before any work
        model, bundle_path = _model(bundle, trust=trust)
        with _threads(threads):
            profiles = profile_latency(model, resolve_device(device), batch_sizes, dtype, warmup, repeats, progress, graphs)
        if write and bundle_path is not None:
            tables = dict(read_config(bundle_path).latency or {})
            tables.update({p.key: p.to_dict() for p in profiles})
            update_bundle(bundle_path, latency=tables)
    return ProfileReport(profiles, str(bundle_path) if write and bundle_path is not None else None)


# =============================================================================== export
def export(
    bundle: PathLike,
    *,
    out: PathLike,
    format: str = "pt2",
    opset: Optional[int] = None,
    overwrite: bool = False,
    trust: Trust = Trust(),
    progress: StageProgress = None,
) -> ExportResult:
    """Write a self-contained export of a bundle (``mexify export``): every stage and head as a
    ``torch.export`` program (``pt2``: :func:`load` reads it without the model's code) or an ONNX
    graph with the policy's score (``onnx``: :class:`mexify.deploy.Runner` runs it without torch).

    Args:
        bundle: bundle directory.
        out: the export directory (refused if it exists, unless ``overwrite``).
        format: ``pt2`` or ``onnx``.
        opset: ONNX opset (default 18).
        trust: what the bundle may run (:class:`~mexify.trust.Trust`); a bundle converted from a pickled
            module needs ``Trust(pickle=True)``, its export then loads without trust.

    Raises:
        BundleError: a stage or head that cannot be exported (named, with the operation).
    """
    parse_choice(format, FORMATS, "export format")
    if opset is not None:
        parse_count(opset, "--opset", lo=MIN_OPSET, hi=MAX_OPSET)
    same = Path(out).resolve() == Path(bundle).resolve()  # export_bundle refuses it, saying why
    with writing(out, overwrite) if not same else contextlib.nullcontext():  # checked before any work, held
        return export_bundle(bundle, out, format=format, opset=opset, overwrite=overwrite, trust=trust,
                             progress=progress)


# =============================================================================== compare
def compare(
    bundle: Model,
    data: Data,
    *,
    budget: Budget = Budget(),
    policies: Optional[Sequence[str]] = None,
    fit_split: str = "calib",
    eval_split: str = "test",
    limit: Optional[int] = None,
    batch_size: int = 8,
    measure: bool = True,
    repeats: int = 3,
    out: Optional[PathLike] = None,
    device: Any = None,
    trust: Trust = Trust(),
    progress: StageProgress = None,
) -> PolicyComparison:
    """Fit every policy for one budget on ``fit_split`` and judge it on ``eval_split`` (``mexify compare``).

    One row per policy: mIoU and drop on the evaluation split, predicted speed-up (the bundle's
    latency profile, else FLOPs), FLOPs speed-up, measured speed-up (``measure``: the runtime over
    the evaluation images at batch 1 against the original model run the same way; the runtime with
    every exit off is ``report.measured``'s exits-off overhead), and the share of the oracle's saving
    on the same split; the oracle's row. Writes ``compare.png`` / ``compare.csv`` to ``out``
    (checked before any work), by default ``BUNDLE/compare``, added through the bundle's atomic
    swap with its lock held; nothing else in the bundle changes.

    Args:
        budget: as for :func:`calibrate` (:class:`Budget`; default ``Budget.max_drop(1.0)``).
        policies: registry names (default: every policy but the oracle, which is always a row).
        limit: images per split.

    Raises:
        ConfigError: bad policies or budget. DataError: datasets that do not fit the bundle.
    """
    _check_fit_args(None, budget, None, data)
    for name in policies or ():
        parse_policy(name)
    _counts(limit=limit, batch_size=batch_size, repeats=repeats)
    device = _device(device)
    bundle_path = _bundle_dir(bundle)
    outside, inside = _plots_at(out, bundle_path, "compare")  # checked before any work
    with updating(bundle_path if inside is not None else None, "write the comparison into it"):
        model, _ = _model(bundle, device, trust=trust)
        fit_ds, eval_ds = (_dataset(data, s, limit, num_classes=model.num_classes) for s in (fit_split, eval_split))
        check_classes(fit_ds, model.num_classes)
        report = compare_policies(model, lambda: as_loader(fit_ds, batch_size), lambda: as_loader(eval_ds, batch_size), budget=budget,
                                  latency=_latency_profile(model, budget), policies=policies, device=device, progress=progress)
        if measure:
            ms = time_policies(model, eval_ds, report.policies, limit=limit, repeats=repeats, progress=progress, notes=report.notes)
            for row in report.rows:
                row["eval"]["measured_ms"] = ms[row["policy"]]
                row["eval"]["measured_speedup"] = ms["original"] / ms[row["policy"]]
            report.measured = {"original_ms": ms["original"], "exits_off_ms": ms["exits_off"],
                               "exits_off_overhead": ms["exits_off"] / ms["original"] - 1.0}
            report.notes.append(f"measured: the runtime over the {eval_split} images at batch 1 against the original model run the "
                                f"same way ({ms['original']:.2f} ms/image), median of {repeats} passes; every exit off "
                                f"{ms['exits_off']:.2f} ms/image (exits-off overhead {100 * report.measured['exits_off_overhead']:+.0f}%)")
        points = {r["policy"]: r["eval"] for r in report.rows}
        unit = "ms" if report.cost == "latency" else "flops"
        report.files = _write_outputs(bundle_path, outside, inside,
                                      lambda d: save_comparison(report.curves, points, report.oracle_curve, d, unit), {})
        return report


# =============================================================================== serving
def serve(bundle: PathLike, *, host: str = "127.0.0.1", port: int = 8000, settings: ServeConfig = ServeConfig(),
          ray: Optional[RayConfig] = None, trust: Trust = Trust(), warn: Optional[Callable[[str], None]] = None,
          on_ready: Optional[Callable[[str], None]] = None) -> None:
    """Serve a bundle over HTTP with continuous batching across stages until SIGINT/SIGTERM, then drain (``mexify serve``).

    Args:
        bundle: a calibrated bundle or pt2 export (``settings.engine="torch"``), or an ONNX export (``"onnxruntime"``).
        host, port: where to listen (loopback by default; ``0.0.0.0`` for every interface).
        settings: batching, engine, ``original`` (serve the baseline the same way), forced exit, input size.
        ray: serve as Ray Serve replicas instead of the embedded server (:class:`RayConfig`).
        on_ready: called with the service's URL once the model is loaded.

    Raises:
        ConfigError: a bad setting, an engine that cannot run the directory, or a port already in use.
        BundleError: a bundle that cannot be loaded.
    """
    settings.check()
    parse_count(port, "--port", 0, 65535)
    _check_port_free(host, int(port))
    if ray is not None:
        run_ray(str(bundle), settings, ray, trust, host=host, port=int(port), on_ready=on_ready)
        return
    service = build_service(bundle, settings, trust, warn=warn or (lambda m: None))
    run_server(service, host=host, port=int(port), on_ready=on_ready)


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}", "pick another --port, or stop what holds it") from None


def loadtest(url: str, *, data: Optional[Data] = None, rate: Optional[float] = None, slo_ms: Optional[float] = None,
             baseline: Optional[str] = None, requests: Optional[int] = 200, duration_s: Optional[float] = None, limit: int = 32,
             seed: int = 0, timeout_s: float = 30.0, allow_remote: bool = False, warmup: int = 32,
             wait_s: float = 0.0) -> LoadtestReport:
    """Open-loop load test of a ``mexify serve`` service, and of a baseline served the same way (``mexify loadtest``).

    Args:
        url: the service's base URL (loopback or this machine unless ``allow_remote``).
        data: images to send: image files or a folder of them, or a dataset spec (its ``val`` images, encoded as
            PNG); default the synthetic scenes at the service's input size.
        rate: Poisson arrivals per second of one run; with ``slo_ms``, where the search starts.
        slo_ms: search the highest rate whose p99 latency stays within it.
        baseline: the original model served the same way (``mexify serve --original``): the same runs give the ratio.
        requests, duration_s: bound each run by count and/or time.
        limit: most distinct images sent (cycled).
        warmup: untimed requests sent to each service first (one by one, then at once).
        wait_s: wait up to this long for each service to answer ``/healthz`` (one that is still starting).

    Raises:
        ConfigError: a target that is neither loopback nor this machine, no service answering, bad values.
    """
    targets = [check_target(u, allow_remote) for u in [url] + ([baseline] if baseline else [])]
    infos = [_service_info(u, wait_s) for u in targets]
    _counts(limit=limit)
    bodies = _bodies(data, tuple(infos[0].get("input_size") or (256, 256)), limit)
    return _loadtest(targets[0], bodies, rate=rate, slo_ms=slo_ms, baseline=targets[1] if baseline else None, requests=requests,
                     duration_s=duration_s, seed=seed, timeout_s=timeout_s, warmup=warmup)


def _service_info(url: str, wait_s: float = 0.0) -> Dict[str, Any]:
    """The service's ``/healthz`` document (a load test starts only against a service that answers), polled for
    up to ``wait_s`` seconds."""
    import httpx

    deadline = time.monotonic() + float(wait_s)
    while True:
        try:
            r = httpx.get(f"{url}/healthz", timeout=10.0, trust_env=False)
            break
        except httpx.HTTPError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(f"no service answers at {url} ({type(e).__name__})", "start one with `mexify serve BUNDLE`") from None
            time.sleep(0.25)
    if r.status_code != 200:
        raise ConfigError(f"the service at {url} is not ready: /healthz answered {r.status_code}", "wait until it is up")
    try:
        return dict(r.json())
    except ValueError:
        return {}


def _bodies(data: Optional[Data], size: Tuple[int, int], limit: int) -> List[bytes]:
    """Encoded images to send: the files themselves, or a dataset's images as PNG."""
    if isinstance(data, (str, os.PathLike)) and Path(data).exists():
        files = collect_images([Path(data)], warn=lambda m: None)[:limit]
        return [f.read_bytes() for f in files]
    spec = data if data is not None else f"synthetic:scenes?size={max(size)}&n_eval={limit}"
    ds = _dataset(spec, "val", limit)
    arrays = [to_rgb(ds[i][0]) for i in range(len(ds))]
    if not arrays:
        raise DataError(f"{spec} has no images to send")
    return bodies_of(arrays)
