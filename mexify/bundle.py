"""Bundles: a directory with ``config.yaml`` and ``weights.safetensors``.

Loading re-traces the recorded spec (:func:`mexify.prepare.rebuild`) and loads the weights;
nothing is unpickled. Every write builds a complete new bundle directory next to the old one
and swaps it into place, so a reader sees the old bundle or the new one, never a mix of a new
config with old weights, and a failure leaves the old bundle as it was. The mechanisms (output
checks, atomic writes, the directory swap, the bundle lock) live in :mod:`mexify.files`; this
module re-exports ``check_writable``, ``write_text_atomic`` and ``replace_dir`` from there.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import yaml
from safetensors.torch import load_model, save_model

from mexify.config import BundleConfig
from mexify.errors import BundleError, ConfigError
from mexify.files import atomic_path, bundle_lock, check_writable, replace_dir, write_text_atomic
from mexify.graph.split import Stage
from mexify.nn import MultiExitModel
from mexify.nn.programs import ProgramHead, ProgramModule, load_program
from mexify.prepare import rebuild
from mexify.trust import Trust

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "save_bundle",
    "load",
    "read_config",
    "update_bundle",
    "check_writable",
    "write_text_atomic",
    "config_text",
    "replace_dir",
]

CONFIG_FILE = "config.yaml"
_OPTIONAL_KEYS = ("num_batches_tracked",)
WEIGHTS_FILE = "weights.safetensors"


def config_text(config: BundleConfig) -> str:
    """``config.yaml``'s text: a header comment and the config as plain YAML."""
    if config.export is not None:
        header = (f"# mexify export ({config.export['format']}): the programs listed under `export`"
                  " run without the model's code; FLOPs count one multiply-add as one FLOP.\n")
    else:
        header = "# mexify bundle: rebuilt by re-tracing `spec`; FLOPs count one multiply-add as one FLOP.\n"
    return header + yaml.safe_dump(config.to_dict(), sort_keys=False)


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    state_model = model.module if hasattr(model, "module") else model
    with atomic_path(path) as tmp:
        save_model(state_model, str(tmp))


def save_bundle(model: Any, out: Union[str, Path], config: Optional[BundleConfig] = None, overwrite: bool = False) -> Path:
    """Write ``model`` (a MultiExitModel) and its config as a bundle directory at ``out``.

    Raises:
        BundleError: ``out`` exists and may not be replaced.
    """
    out = Path(out)
    config = config or model.config
    if config is None:
        raise BundleError("the model has no bundle config to save")
    check_writable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with bundle_lock(out):
        check_writable(out, overwrite)  # again, now that no other mexify process can write it
        replace_dir(out, lambda tmp: _write_files(tmp, model, config))
    return out


def _write_files(directory: Path, model: Any, config: BundleConfig) -> None:
    _save_weights(model, directory / WEIGHTS_FILE)
    write_text_atomic(directory / CONFIG_FILE, config_text(config))


DAMAGED = "the bundle is damaged; convert again"


def read_config(path: Union[str, Path]) -> BundleConfig:
    """Read and validate a bundle's ``config.yaml`` (``yaml.safe_load``).

    Raises:
        BundleError: missing directory or file, or invalid YAML/config.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle not found: {path}", "give the directory written by `mexify convert -o`")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise BundleError(f"{path} is not a bundle: {CONFIG_FILE} is missing", "give the directory written by `mexify convert -o`")
    try:
        data = yaml.safe_load(cfg_file.read_text())
        return BundleConfig.from_dict(data or {})
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise BundleError(f"{cfg_file} is not valid YAML ({where}{problem})", DAMAGED) from None
    except UnicodeDecodeError as e:
        raise BundleError(f"{cfg_file} is not text ({e.reason} at byte {e.start})", DAMAGED) from None
    except ConfigError as e:  # a field missing, unknown or of the wrong type; or a newer schema (keeps its hint)
        raise BundleError(f"{cfg_file}: {e.message}", e.hint if "schema" in e.message else DAMAGED) from None
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{cfg_file} is malformed: {e}", DAMAGED) from None


def load(path: Union[str, Path], device: Optional[Union[str, torch.device]] = None, trust: Trust = Trust()) -> MultiExitModel:
    """Rebuild a bundle's :class:`~mexify.nn.MultiExitModel` (eval mode).

    A bundle written by ``mexify export --format pt2`` is rebuilt from its programs: neither the
    model's package nor its code is imported, and nothing is unpickled.

    Args:
        path: the bundle directory.
        device: where to put the model (default: CPU).
        trust: what the bundle may run (:class:`~mexify.trust.Trust`): ``code`` for a factory that is not
            a known or registered model builder, ``pickle`` for a bundle converted from a pickled module
            (not for its pt2 export).

    Raises:
        BundleError: missing/invalid files, or weights that do not match the rebuilt model.
    """
    path = Path(path)
    config = read_config(path)
    if config.export is not None:
        model = _from_programs(path, config)
        return model.to(device) if device is not None else model
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{path} has no {WEIGHTS_FILE}", "the bundle is incomplete; convert again")
    model = rebuild(config, trust, where=f"{path}/{CONFIG_FILE}")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except Exception as e:  # noqa: BLE001 - safetensors raises RuntimeError on shape mismatches
        raise BundleError(f"weights in {weights} do not match the rebuilt model: {str(e).splitlines()[0]}") from e
    # BatchNorm step counters exist only where a train-mode graph uses them (an exported stage with
    # its train graph); they do not change what the model computes
    missing = [k for k in missing if not k.endswith(_OPTIONAL_KEYS)]
    unexpected = [k for k in unexpected if not k.endswith(_OPTIONAL_KEYS)]
    if missing or unexpected:
        what = "; ".join(f"{n} {len(ks)} key(s), e.g. {ks[0]}" for n, ks in (("missing", missing), ("unexpected", unexpected)) if ks)
        raise BundleError(f"weights in {weights} do not match the rebuilt model: {what}", "convert the model again")
    model.eval()
    if device is not None:
        model.to(device)
    return model


EXPORTED_TRAIN_ISSUE = "an exported bundle holds inference programs only; train the bundle it was exported from"


def _from_programs(path: Path, config: BundleConfig) -> MultiExitModel:
    """A :class:`MultiExitModel` over the programs of a pt2 export (eval mode, inference only)."""
    manifest = config.export
    if manifest.get("format") != "pt2":
        raise BundleError(
            f"{path} is an {manifest.get('format')} export: it runs with onnxruntime, not as a torch model",
            "use mexify.deploy.Runner, or --engine onnxruntime on predict and bench",
        )
    stages = []
    for i, entry in enumerate(manifest["stages"]):
        module = ProgramModule(load_program(path, entry["program"], f"stage{i}"), f"stage{i}")
        stages.append(Stage(module, list(entry["inputs"]), list(entry["outputs"]), entry.get("exit_value") or "",
                            dict(entry.get("batch_dims") or {})))
    heads = {e["exit"]: ProgramHead(load_program(path, e["program"], f"head{i}"), f"head{i}", len(e.get("inputs") or ()) > 1)
             for i, e in enumerate(manifest["heads"])}
    model = MultiExitModel(
        stages, heads, config.num_classes, tuple(config.trace.input_size), [e.stage_flops for e in config.exits] + [config.final_flops],
        [e.head_flops for e in config.exits], config.original_flops, skips=[e.skip for e in config.exits],
    )
    model.static_size = tuple(manifest["static_size"]) if manifest.get("static_size") else None
    model.train_issue = EXPORTED_TRAIN_ISSUE
    model.config = config
    return model.eval()


def update_bundle(path: Union[str, Path], model: Any = None, extra: Optional[Callable[[Path], Any]] = None,
                  **fields: Any) -> BundleConfig:
    """Rewrite a bundle's config fields (e.g. ``policy=...``) and, if given, its weights, in one atomic step.

    A complete new bundle directory (the other files copied over) is written beside the old
    one and swapped in, so config and weights always belong together; the bundle's lock
    (:func:`mexify.files.bundle_lock`) is held from reading the config to the swap.

    Args:
        extra: ``extra(new_dir)`` writes further files (e.g. ``calibration/`` plots) into the new
            directory before the swap, so they change together with the config.
    """
    path = Path(path)
    with bundle_lock(path):
        config = read_config(path)
        if fields:
            unknown = [k for k in fields if k not in {f.name for f in dataclasses.fields(BundleConfig)}]
            if unknown:
                raise ConfigError(f"unknown bundle config field(s): {', '.join(unknown)}")
            config = dataclasses.replace(config, **fields)

        def fill(tmp: Path) -> None:
            if model is not None:
                _save_weights(model, tmp / WEIGHTS_FILE)
            write_text_atomic(tmp / CONFIG_FILE, config_text(config))
            if extra is not None:
                extra(tmp)

        replace_dir(path, fill, keep_from=path)
    if model is not None and hasattr(model, "config"):
        model.config = config
    return config
