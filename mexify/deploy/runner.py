"""The onnxruntime early-exit runner (see :mod:`mexify.deploy`)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import yaml

from mexify.config import EXPORT_SCHEMA
from mexify.errors import BundleError, ConfigError, DataError
from mexify.files import inside

__all__ = ["Runner", "Result", "Step"]


@dataclasses.dataclass
class Result:
    """A batch's results in input order: masks ``(N, H, W)`` int64, the exit each image left by,
    its confidence there (NaN at the final exit, where nothing is decided)."""

    masks: np.ndarray
    exit_index: np.ndarray
    confidence: np.ndarray
    exit_names: List[str]

    def exit_counts(self) -> Dict[str, int]:
        counts = np.bincount(self.exit_index, minlength=len(self.exit_names))
        return {n: int(c) for n, c in zip(self.exit_names, counts)}


@dataclasses.dataclass
class Step:
    """What one stage did to a batch (:meth:`Runner.step`): the rows that left at this exit (ascending), their
    masks and confidence (NaN at the final exit), and the state of the rows that go on (None when all left;
    ``stay``: which rows those are, None when none left)."""

    index: int
    leave: np.ndarray
    masks: Optional[np.ndarray]
    confidence: Optional[np.ndarray]
    state: Optional[Dict[str, np.ndarray]]
    stay: Optional[np.ndarray]


def _session(root: Path, name: object, what: str, providers: Optional[Sequence[str]], threads: Optional[int]) -> Any:
    """An onnxruntime session over the graph file ``name`` of the export ``root`` (refused unless inside it)."""
    import onnxruntime as ort

    path = inside(root, name, what)
    if not path.is_file():
        raise BundleError(f"{root} is incomplete: {path.name} is missing", "export the bundle again")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    # one session per stage and head run one after another: a session's threads must not spin-wait
    # for more work after its run (the default), or they take the cores from the next session's
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types (InvalidProtobuf, Fail) for a bad file
        lines = str(e).strip().splitlines()
        text = lines[0] if lines else type(e).__name__
        raise BundleError(f"cannot read the ONNX graph {path}: {text if len(text) <= 200 else text[:197] + '...'}",
                          "the file is truncated or damaged; export the bundle again") from None


class Runner:
    """Early-exit inference over an ONNX export with onnxruntime and numpy.

    Args:
        path: the directory written by ``mexify export --format onnx``.
        exit: send every image to this exit (index, negative from the end, or name) instead of
            following the policy (the export's only mode when the bundle had no policy).
        providers: onnxruntime execution providers (default: CPU).
        threads: onnxruntime intra-op threads (default: onnxruntime's).

    Raises:
        BundleError: not an ONNX export, an export from a newer mexify, or missing files.
    """

    def __init__(self, path: Union[str, Path], exit: Union[int, str, None] = None, providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None):
        self.path = Path(path)
        config = _read(self.path)
        manifest = config["export"]
        self.config = config
        self.manifest = manifest
        self.exit_names: List[str] = [e["name"] for e in config.get("exits", [])] + ["final"]
        self.num_classes = int(config["num_classes"])
        self.input_size = tuple(manifest["input_size"])
        self.static_size = tuple(manifest["static_size"]) if manifest.get("static_size") else None
        self.mean = np.asarray(manifest["normalize"]["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(manifest["normalize"]["std"], dtype=np.float32).reshape(1, 3, 1, 1)
        self._stages = [_session(self.path, s["onnx"], f"stage{i} onnx", providers, threads) for i, s in enumerate(manifest["stages"])]
        self._heads = [_session(self.path, h["onnx"], f"head{i} onnx", providers, threads) for i, h in enumerate(manifest["heads"])]
        self._scored = bool(manifest["heads"]) and "score" in manifest["heads"][0]["outputs"]
        self._mask = _session(self.path, manifest["mask"]["onnx"], "mask onnx", providers, threads)
        self.policy = manifest.get("policy")
        self.exit = None if exit is None else self._exit_index(exit)
        if self.exit is None and not self._scored:
            raise ConfigError(f"{self.path} was exported without an exit policy", "pass exit=N (or calibrate the bundle and export again)")
        self.thresholds = self._thresholds()
        self.active = self._active()

    # ------------------------------------------------------------------ setup
    def _exit_index(self, exit: Union[int, str]) -> int:
        e = len(self.exit_names)
        if isinstance(exit, str) and not exit.lstrip("-").isdigit():
            if exit not in self.exit_names:
                raise ConfigError(f"no exit named {exit!r}", f"exits: {', '.join(self.exit_names)}")
            return self.exit_names.index(exit)
        i = int(exit)
        i = i + e if i < 0 else i
        if not 0 <= i < e:
            raise ConfigError(f"exit {exit} does not exist: the model has exits 0..{e - 1}", "pass an index in range or an exit name")
        return i

    def _thresholds(self) -> List[float]:
        policy = self.config.get("policy") or {}
        th = policy.get("thresholds")
        names = self.exit_names[:-1]
        if isinstance(th, dict):
            values = [th.get(n) for n in names]
        elif isinstance(th, list) and len(th) == len(names):
            values = th
        else:
            values = [None] * len(names)
        return [math.inf if v is None else float(v) for v in values]

    def _active(self) -> List[int]:
        last = len(self.exit_names) - 1
        if self.exit is not None:
            return [self.exit]
        return [i for i, t in enumerate(self.thresholds) if not math.isinf(t)] + [last]

    # ---------------------------------------------------------------- running
    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB images ``(N, H, W, 3)`` (or one ``(H, W, 3)``) -> the model's float32 ``(N, 3, H, W)`` input
        (ImageNet mean and std, as the bundle was trained with). Resizing is the caller's."""
        a = np.asarray(images)
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[-1] != 3:
            raise DataError(f"normalize expects RGB images (N, H, W, 3), got shape {a.shape}")
        x = a.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
        return np.ascontiguousarray((x - self.mean) / self.std, dtype=np.float32)

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise DataError(f"predict expects images (N, 3, H, W), got shape {x.shape}", "use runner.normalize(images) first")
        if self.static_size is not None and tuple(x.shape[-2:]) != self.static_size:
            h, w = self.static_size
            raise DataError(f"this export accepts {h}x{w} inputs only, got {x.shape[2]}x{x.shape[3]}", f"resize the images to {h}x{w}")
        return x

    def _run_stage(self, i: int, state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        entry, sess = self.manifest["stages"][i], self._stages[i]
        feeds = {inp.name: state[n] for inp, n in zip(sess.get_inputs(), entry["inputs"])}
        return dict(zip(entry["outputs"], sess.run(None, feeds)))

    def _run_head(self, i: int, state: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """Exit ``i``'s head on the values it reads from ``state`` (the exit's features, and a fused head's skip)."""
        sess, entry = self._heads[i], self.manifest["heads"][i]
        names = entry.get("inputs") or [self.manifest["stages"][i]["exit_value"]]
        return sess.run(None, {inp.name: state[n] for inp, n in zip(sess.get_inputs(), names)})

    def _masks(self, scores: np.ndarray, size: Sequence[int]) -> np.ndarray:
        if tuple(scores.shape[-2:]) == tuple(size):  # the final exit's logits are at the input size already
            return scores.argmax(1)
        inputs = self._mask.get_inputs()
        carrier = np.empty((0, int(size[0]), int(size[1])), dtype=np.float32)
        return self._mask.run(None, {inputs[0].name: np.ascontiguousarray(scores, dtype=np.float32), inputs[1].name: carrier})[0]

    def _batch_axis(self, i: int, name: str, v: np.ndarray, batch: int) -> Optional[int]:
        """The axis value ``name`` carries the batch along after stage ``i`` (-1: the input), None when shared."""
        dims = (self.manifest["stages"][i].get("batch_dims") or {}) if i >= 0 else {}
        dim = dims.get(name)
        if dim is not None:
            return int(dim[4:]) if dim.startswith("dim:") else None
        return 0 if v.ndim > 0 and v.shape[0] == batch else None

    def select(self, i: int, state: Dict[str, np.ndarray], stay: np.ndarray, batch: int) -> Dict[str, np.ndarray]:
        """Rows ``stay`` of a state of ``batch`` rows after stage ``i`` (-1: before stage 0)."""
        out = {}
        for name, v in state.items():
            axis = self._batch_axis(i, name, v, batch)
            out[name] = v if axis is None else np.take(v, stay, axis=axis)
        return out

    def start(self, x: np.ndarray) -> Dict[str, np.ndarray]:
        """The state before stage 0 of a normalised batch ``(N, 3, H, W)``."""
        return {self.manifest["stages"][0]["inputs"][0]: self._check_input(x)}

    def join(self, i: int, states: Sequence[Dict[str, np.ndarray]], sizes: Sequence[int]) -> Dict[str, np.ndarray]:
        """The rows of several states after stage ``i`` (-1: before stage 0), in order, as one batch."""
        if len(states) == 1:
            return states[0]
        out = {}
        for name, v in states[0].items():
            axis = self._batch_axis(i, name, v, int(sizes[0]))
            out[name] = v if axis is None else np.concatenate([s[name] for s in states], axis=axis)
        return out

    def step(self, i: int, state: Dict[str, np.ndarray], batch: int, size: Sequence[int]) -> Step:
        """Run stage ``i`` on a batch of ``batch`` rows and decide its exit (the one rule of :meth:`predict`
        and of the stage scheduler); ``size`` is the input size masks are made at."""
        state = self._run_stage(i, state)
        none = np.zeros(0, dtype=np.int64)
        if i not in self.active:
            return Step(i, none, None, None, state, None)
        if i == len(self.exit_names) - 1:
            masks = self._masks(state[self.manifest["stages"][i]["outputs"][0]], size)
            return Step(i, np.arange(batch), masks, np.full(batch, np.nan, np.float32), None, None)
        outs = self._run_head(i, state)
        scores = outs[0]
        if self.exit == i:
            go = np.ones(batch, dtype=bool)
            conf = outs[1].astype(np.float32).reshape(-1) if len(outs) > 1 else np.full(batch, np.nan, np.float32)
        else:
            conf = outs[1].astype(np.float32).reshape(-1)
            go = conf >= np.float32(self.thresholds[i])  # compared in float32, as the torch runtime does
        leave = np.flatnonzero(go)
        if leave.size == 0:
            return Step(i, none, None, None, state, None)
        masks = self._masks(scores if leave.size == batch else scores[leave], size)
        if leave.size == batch:
            return Step(i, leave, masks, conf, None, None)
        stay = np.flatnonzero(~go)
        return Step(i, leave, masks, conf[leave], self.select(i, state, stay, batch), stay)

    def predict(self, x: np.ndarray) -> Result:
        """Run a normalised batch ``(N, 3, H, W)`` with early exits; results in input order."""
        state: Optional[Dict[str, np.ndarray]] = self.start(x)
        n, size = x.shape[0], x.shape[-2:]
        e = len(self.exit_names)
        masks = np.zeros((n, *size), dtype=np.int64)
        exit_index = np.full(n, e - 1, dtype=np.int64)
        confidence = np.full(n, np.nan, dtype=np.float32)
        alive = np.arange(n)
        for i in range(e):
            step = self.step(i, state, alive.size, size)
            if step.leave.size:
                rows = alive[step.leave]
                masks[rows] = step.masks
                exit_index[rows] = i
                confidence[rows] = step.confidence
            state = step.state
            if state is None:
                break
            if step.stay is not None:
                alive = alive[step.stay]
        return Result(masks, exit_index, confidence, list(self.exit_names))

    def exit_outputs(self, x: np.ndarray) -> List[np.ndarray]:
        """Every exit's output on the whole batch (no early exit): each early exit's mask scores at its
        own resolution (the logits, for policies that take their mask from them), then the final logits."""
        x = self._check_input(x)
        state = {self.manifest["stages"][0]["inputs"][0]: x}
        outs = []
        for i in range(len(self.exit_names)):
            state = self._run_stage(i, state)
            entry = self.manifest["stages"][i]
            if i == len(self.exit_names) - 1:
                outs.append(state[entry["outputs"][0]])
            else:
                outs.append(self._run_head(i, state)[0])
        return outs


def _read(path: Path) -> Dict[str, Any]:
    cfg = path / "config.yaml"
    if not cfg.is_file():
        raise BundleError(f"{path} is not an export: config.yaml is missing", "give the directory written by `mexify export --format onnx`")
    try:
        config = yaml.safe_load(cfg.read_text()) or {}
    except yaml.YAMLError as e:
        raise BundleError(f"{cfg} is not valid YAML: {e}") from e
    manifest = config.get("export")
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} is a bundle, not an export", f"run `mexify export {path} -o OUT --format onnx` first")
    if int(manifest.get("schema", 0)) > EXPORT_SCHEMA:
        raise BundleError(
            f"{path} was exported with export schema {manifest.get('schema')}, newer than this mexify reads ({EXPORT_SCHEMA})",
            "upgrade mexify on this machine, or export again with its version",
        )
    if manifest.get("format") != "onnx":
        raise BundleError(f"{path} is a {manifest.get('format')} export", "the onnxruntime runner needs `mexify export --format onnx`")
    return config
