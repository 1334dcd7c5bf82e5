"""``mexify export``: a bundle as self-contained programs, ``torch.export`` (pt2) or ONNX, per stage and per head.

Both formats run one example batch (2 images at the bundle's input size) through the source
bundle and export every piece from what it saw: each stage with its live values as inputs and
outputs (ints and sizes as shape carriers, :mod:`mexify.nn.programs`), each exit head, every
dimension left dynamic where the graph allows it (``Dim.AUTO``: the batch always, spatial sizes
unless the trace fixed them). Each exported piece is run on the example batch and compared with
the source before anything is written.

* ``pt2``: ``<piece>.json`` (the graph, ``torch.export``'s schema) + ``<piece>.safetensors``;
  :func:`mexify.load` rebuilds a :class:`~mexify.nn.MultiExitModel` from them without the
  model's package and without unpickling.
* ``onnx``: ``stage<i>.onnx``; ``exit<i>.onnx`` is the head *and the policy's image score*
  (outputs ``mask_scores``, ``score``); ``mask.onnx`` resizes scores to the image and takes the
  argmax. :mod:`mexify.deploy` runs them with onnxruntime and numpy.

Writing is atomic: the output directory appears complete or not at all.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import linecache
import logging
import re
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from mexify.trust import Trust
from mexify.bundle import CONFIG_FILE, config_text, load
from mexify.config import EXPORT_SCHEMA
from mexify.data import IMAGENET_MEAN, IMAGENET_STD
from mexify.errors import BundleError, ConfigError
from mexify.files import check_writable, replace_dir, write_text_atomic
from mexify.nn import MultiExitModel, run_head
from mexify.nn.programs import TENSOR, CarrierModule, carrier_batch_dim, dynamic_dims, save_program, to_carrier, value_kind
from mexify.runtime.policy import resolve_policy

__all__ = ["FORMATS", "ExportResult", "export_bundle", "DEFAULT_OPSET"]

log = logging.getLogger(__name__)

FORMATS = ("pt2", "onnx")
DEFAULT_OPSET = 18
_TOLERANCE = 1e-4  # max |exported - source| relative to the source's largest value, per piece


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_bundle` wrote: the directory, its files and the per-piece check."""

    out: Path
    format: str
    files: List[str]
    max_abs_diff: Dict[str, float]
    dynamic: Dict[str, bool]
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


class _Head(nn.Module):
    """Exit ``i``'s head as a program: ``features[, skip] -> logits`` (the skip positional, as programs take inputs)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        return run_head(self.head, (features,) if skip is None else (features, skip))


class _ExitScore(nn.Module):
    """Exit ``i``'s head and the policy's image score: ``features[, skip] -> (mask_scores, score)``."""

    def __init__(self, head: nn.Module, policy: Any, index: int):
        super().__init__()
        self.head, self.policy, self.index = head, policy, index

    def forward(self, features: torch.Tensor, skip: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = run_head(self.head, (features,) if skip is None else (features, skip))
        score = self.policy.scores(self.index, logits, features).float()
        mask_scores = getattr(self.policy, "mask_scores", None)
        return (mask_scores(self.index, logits, features) if mask_scores else logits).float(), score


class _Mask(nn.Module):
    """``(scores, size carrier) -> labels``: bilinear resize to the image, then the first argmax (the runtime's masks)."""

    def forward(self, scores: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        resized = F.interpolate(scores.float(), size=(size.shape[1], size.shape[2]), mode="bilinear", align_corners=False)
        return resized.max(1).indices


def export_bundle(
    bundle: Union[str, Path],
    out: Union[str, Path],
    format: str = "pt2",
    opset: Optional[int] = None,
    overwrite: bool = False,
    trust: Trust = Trust(),
    progress: Any = None,
) -> ExportResult:
    """Export ``bundle`` to ``out`` as per-stage and per-head programs (see the module docstring).

    Raises:
        ConfigError: an unknown format, or ONNX without the ``onnx`` extra installed.
        BundleError: a piece that cannot be exported (named, with the operation where it failed),
            or an exported piece that does not reproduce the source.
    """
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}", f"choose one of {', '.join(FORMATS)}")
    if not hasattr(torch.export, "Dim") or not hasattr(torch.export.Dim, "AUTO"):
        raise ConfigError(f"export needs torch >= 2.6 (this is {torch.__version__})", "upgrade torch")
    if format == "onnx":
        _require_onnx()
    out = Path(out)
    if out.exists() and out.resolve() == Path(bundle).resolve():
        raise BundleError(f"{out} is the bundle being exported", "write the export to another directory with -o")
    check_writable(out, overwrite)
    model = load(bundle, trust=trust)
    config = model.config
    policy = _policy(model) if format == "onnx" else None
    pieces = _pieces(model, policy, format == "onnx")
    manifest: Dict[str, Any] = {
        "schema": EXPORT_SCHEMA,
        "format": format,
        "torch": torch.__version__.split("+")[0],
        "input_size": list(config.trace.input_size),
        "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "source": str(Path(bundle).resolve()),
    }
    diffs: Dict[str, float] = {}
    dynamic: Dict[str, bool] = {}

    def fill(tmp: Path) -> None:
        stages, heads = [], []
        for n, piece in enumerate(pieces):
            if progress is not None:
                progress("export", n, len(pieces))
            program = _export(piece.module, piece.args, piece.kinds, piece.what)
            diffs[piece.name] = _check(program, piece)
            entry = _write(program, piece, tmp, format, opset)
            if piece.name == "stage0":
                dynamic.update(_dynamic_input(program))
            (stages if piece.name.startswith("stage") else heads if piece.name.startswith(("head", "exit")) else []).append(entry)
            if piece.name == "mask":
                manifest["mask"] = entry
        if progress is not None:
            progress("export", len(pieces), len(pieces))
        manifest["stages"], manifest["heads"] = stages, heads
        manifest["static_size"] = None if dynamic.get("spatial", True) else list(config.trace.input_size)
        if format == "onnx":
            manifest["opset"] = int(opset or DEFAULT_OPSET)
            manifest["policy"] = getattr(policy, "name", None)
        manifest["max_abs_diff"] = dict(diffs)
        exported = dataclasses.replace(config, export=manifest)
        write_text_atomic(tmp / CONFIG_FILE, config_text(exported))

    out.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(out, fill)
    files = sorted(p.name for p in out.iterdir())
    return ExportResult(out, format, files, diffs, dynamic, time.perf_counter() - t0)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"ONNX export needs the onnx and onnxscript packages ({e.name} is missing)",
                          "pip install 'mexify[deploy]'") from e


def _policy(model: MultiExitModel) -> Any:
    """The bundle's policy for the exit graphs' scores (None: the export holds logits and fixed exits only)."""
    if model.config is None or model.config.policy is None:
        log.warning("the bundle has no exit policy: the ONNX exits hold no score (the runner then takes fixed exits only)")
        return None
    return resolve_policy(model)


@dataclasses.dataclass
class _Piece:
    name: str  # stage<i> | head<i> | exit<i> | mask
    what: str  # how errors name it
    module: nn.Module
    args: Tuple[torch.Tensor, ...]
    kinds: List[str]
    expected: Tuple[torch.Tensor, ...]
    io: Dict[str, Any]


def _pieces(model: MultiExitModel, policy: Any, onnx: bool) -> List[_Piece]:
    """Every stage and head (ONNX: head and score, plus the mask graph) with example inputs and the source's outputs."""
    h, w = model.config.trace.input_size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    pieces: List[_Piece] = []
    last = model.num_exits - 1
    with torch.no_grad():
        state = model.start(x)
        for i in range(model.num_exits):
            inputs, outputs, exit_value = model.stage_io(i)
            ins = [state.values[n] for n in inputs]
            state = model.run_stage(i, state)
            outs = [state.values[n] for n in outputs]
            what = f"stage {i} (up to exit {model.exit_names[i]!r})" if i < last else f"stage {i} (the final stage)"
            in_kinds, out_kinds = _kinds(ins, inputs, what, "input"), _kinds(outs, outputs, what, "output")
            given = model.stage_batch_dims(i)
            dims = {n: carrier_batch_dim(str(given[n]), k) for n, k in zip(outputs, out_kinds) if n in given}
            io = {"inputs": list(inputs), "input_kinds": in_kinds, "outputs": list(outputs), "output_kinds": out_kinds,
                  "exit_value": exit_value, "batch_dims": dims}
            pieces.append(_Piece(f"stage{i}", what, CarrierModule(model.stages[i], in_kinds, out_kinds, i < last),
                                 tuple(to_carrier(v, k) for v, k in zip(ins, in_kinds)), in_kinds,
                                 tuple(to_carrier(v, k) for v, k in zip(outs, out_kinds)), io))
            if i == last:
                break
            head, name = model.heads[model.exit_names[i]], model.exit_names[i]
            # a fused head reads the skip feature too (carried to this exit by the stages)
            names = [exit_value] + ([model.skips[i]] if head.fused else [])
            args = model.head_inputs(i, state)[: len(names)]
            if policy is None:
                pieces.append(_Piece(f"head{i}", f"the head of exit {i} ({name})", _Head(head), args, [TENSOR] * len(args), (run_head(head, args),),
                                     {"exit": name, "inputs": names, "outputs": ["logits"]}))
            else:
                module = _ExitScore(head, policy, i)
                pieces.append(_Piece(f"exit{i}", f"exit {i} ({name}: head and {policy.name} score)", module, args, [TENSOR] * len(args),
                                     module(*args), {"exit": name, "inputs": names, "outputs": ["mask_scores", "score"]}))
        if onnx:
            scores = model.exit_logits(last, state)[:, :, ::4, ::4].contiguous()  # a smaller map, as early exits give
            size, mask = torch.empty((0, h, w)), _Mask()
            pieces.append(_Piece("mask", "the mask graph (resize and argmax)", mask, (scores, size), [TENSOR, "size:Size:2"],
                                 (mask(scores, size),), {"outputs": ["labels"]}))
    return pieces


def _kinds(values: Sequence[Any], names: Sequence[str], what: str, side: str) -> List[str]:
    kinds = [value_kind(v) for v in values]
    for name, v, k in zip(names, values, kinds):
        if not k:
            raise BundleError(
                f"{what} cannot be exported: its {side} {name!r} is a {type(v).__name__}, and only tensors, ints and sizes can cross a program boundary",
                "choose exit points where no such value is alive (--at, see `mexify inspect`), or keep the source bundle",
            )
    return kinds


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch.export and the ONNX exporter log warnings (0/1 specialisation) and print the partial
    graph of a failed export on stderr; the error, if any, is ours to report in one line."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _export(module: nn.Module, args: Tuple[torch.Tensor, ...], kinds: Sequence[str], what: str) -> Any:
    try:
        with torch.no_grad(), _quiet_torch():
            dims = dynamic_dims(args, kinds)
            # a CarrierModule takes *carriers: one spec for the varargs tuple; other modules, one per argument
            return torch.export.export(module, args, dynamic_shapes=(dims,) if isinstance(module, CarrierModule) else dims,
                                       strict=False)
    except Exception as e:  # noqa: BLE001 - torch.export raises many types; all are reported with where they arose
        raise BundleError(f"{what} cannot be exported with torch.export: {_where(e)}",
                          "make that operation traceable (e.g. no data-dependent Python control flow), move the exit points "
                          "(--at), or keep the source bundle") from e


def _where(e: BaseException) -> str:
    """The error's first line and the operation it arose in: the generated stage code's line
    (which node) and the deepest frame of the model's own code."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()  # the ONNX exporter colours its messages
    message = next((line for line in text if line.strip()), type(e).__name__)[:300]
    frames = traceback.extract_tb(e.__traceback__)
    graph_line = user = None
    for f in frames:
        if f.filename.startswith("<eval_with_key>"):
            graph_line = (linecache.getline(f.filename, f.lineno) or f.line or "").strip()
        elif "/torch/" not in f.filename and "/mexify/" not in f.filename and not f.filename.startswith("<"):
            user = f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    op = _ONNX_OP.findall(str(e))
    parts = [message]
    if op:
        parts.append("operation " + ", ".join(dict.fromkeys(op)))
    if graph_line:
        parts.append(f"at graph node `{graph_line}`")
    if user:
        parts.append(f"in {user}")
    return "; ".join(parts)


_ONNX_OP = re.compile(r"\baten(?:::|\.)[A-Za-z_][\w.]*")


def _check(program: Any, piece: _Piece) -> float:
    """Largest |exported - source| over the piece's outputs on the example batch.

    Raises:
        BundleError: shapes differ, or a difference above the tolerance.
    """
    with torch.no_grad():
        got = program.module()(*piece.args)
    got = got if isinstance(got, tuple) else (got,)
    worst = 0.0
    for a, b in zip(got, piece.expected):
        if a.shape != b.shape:
            raise BundleError(f"{piece.what}: the exported program gives shape {tuple(a.shape)} instead of {tuple(b.shape)}")
        if a.numel() and a.is_floating_point():
            diff = float((a.float() - b.float()).abs().max())
            scale = max(float(b.float().abs().max()), 1.0)
            if diff > _TOLERANCE * scale:
                raise BundleError(f"{piece.what}: the exported program differs from the source by {diff:.3g}", "report this model")
            worst = max(worst, diff)
        elif a.numel() and not torch.equal(a, b):
            raise BundleError(f"{piece.what}: the exported program gives other values than the source", "report this model")
    return worst


def _dynamic_input(program: Any) -> Dict[str, bool]:
    """Whether the first stage's image input kept a dynamic batch and spatial size."""
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs)
    shape = node.meta["val"].shape
    symbolic = [not isinstance(s, int) for s in shape]
    return {"batch": symbolic[0], "spatial": symbolic[2] and symbolic[3]}


def _write(program: Any, piece: _Piece, directory: Path, format: str, opset: Optional[int]) -> Dict[str, Any]:
    entry = dict(piece.io)
    if format == "pt2":
        entry["program"] = save_program(program, directory, piece.name)
        return entry
    entry["onnx"] = _write_onnx(program, piece, directory / f"{piece.name}.onnx", opset or DEFAULT_OPSET)
    return entry


def _write_onnx(program: Any, piece: _Piece, path: Path, opset: int) -> str:
    import warnings

    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_torch():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, piece.args, dynamo=True, opset_version=opset, verbose=False, optimize=True)
    except Exception as e:  # noqa: BLE001 - the exporter's errors name the unsupported aten operation
        raise BundleError(f"{piece.what} cannot be exported to ONNX (opset {opset}): {_where(e)}",
                          "try another --opset, or export --format pt2") from e
    onnx_program.save(str(path))
    return path.name
