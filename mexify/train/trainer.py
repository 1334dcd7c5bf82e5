"""The two-stage MESS trainer.

Stage 1 trains backbone, final exit and every early head jointly on the weighted sum of
per-exit cross-entropies. Stage 2 freezes the backbone and final exit (``requires_grad``
off, BatchNorm in eval mode), runs them under ``no_grad`` and trains only the early heads
with cross-entropy plus distillation from the final exit (positive filtering by default).
The final exit is therefore bit-identical before and after stage 2.

Runs are resumable: checkpoints are atomic and hold model, optimizer, scheduler, RNG states,
stage and iteration; the data order and augmentation of every iteration are a function of
``(seed, stage, iteration)`` (see :mod:`mexify.train.stream`), so a resumed CPU run
reproduces the uninterrupted run's losses exactly.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mexify._version import __version__
from mexify.config import IGNORE_INDEX
from mexify.data import check_classes
from mexify.errors import ConfigError, TrainingError
from mexify.files import atomic_file
from mexify.nn import MultiExitModel, resolve_device, run_head
from mexify.spec import load_state_dict_file
from mexify.train import checkpoint as ckpt_mod
from mexify.train.distributed import DistInfo, all_reduce_mean, barrier, cleanup_distributed, init_distributed
from mexify.train.losses import cross_entropy, early_exits_loss, multi_exit_ce
from mexify.train.recipe import Recipe, load_recipe
from mexify.train.schedule import PolyLR
from mexify.train.stream import BatchStream, derive_seed

__all__ = ["train_model", "TrainReport", "StageReport", "TrainEvent", "default_run_dir", "load_backbone_weights", "LOG_NAME"]

log = logging.getLogger(__name__)

LOG_NAME = "train_log.csv"
_WINDOW = 50  # iterations averaged into the reported final losses


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class TrainEvent:
    """What the trainer tells a ``progress`` callback.

    ``kind`` is ``"stage_start"``, ``"step"`` or ``"stage_end"``; ``iteration`` counts completed
    iterations of ``stage`` (of ``total``); ``losses`` maps ``ce/<exit>`` and ``kd/<exit>`` to values.
    """

    kind: str
    stage: int
    iteration: int
    total: int
    start: int = 0
    lr: float = 0.0
    loss: float = 0.0
    losses: Dict[str, float] = field(default_factory=dict)
    it_per_s: float = 0.0


@dataclass(frozen=True)
class StageReport:
    stage: int
    iterations: int
    start_iteration: int
    wall_s: float
    it_per_s: float
    final_losses: Dict[str, float]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainReport:
    """Result of :func:`train`: where things were written and what the losses ended at."""

    run_dir: str
    recipe: Dict[str, Any]
    device: str
    world_size: int
    stages: List[StageReport]
    resumed_from: Optional[Dict[str, int]]
    wall_s: float
    checkpoint: str
    log: str
    bundle: str = ""
    out: str = ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stages"] = [s.to_dict() for s in self.stages]
        return d


def default_run_dir(out: Union[str, os.PathLike]) -> Path:
    """Checkpoints and logs of a run writing bundle ``out`` go to ``<out>.train/`` beside it,
    so rewriting the bundle never touches them."""
    out = Path(out)
    return out.with_name(out.name + ".train")


# --------------------------------------------------------------------------- helpers
def _resolve_device(device: Optional[Union[str, torch.device]], info: DistInfo) -> torch.device:
    dev = resolve_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"device {device!r} asked for but CUDA is not available", "use --device cpu")
        if info.enabled and dev.index is None:
            dev = torch.device("cuda", info.local_rank)
    return dev


def load_backbone_weights(model: nn.Module, path: Union[str, os.PathLike]) -> int:
    """Load the original model's trained weights (state_dict or safetensors) into the stages.

    Stage parameters keep the original model's qualified names under ``stages.<i>.``; a key
    that does not match exactly is matched with dots and underscores treated alike (fx
    flattens attribute names that way). Early heads are new and keep their initialisation.

    Returns:
        The number of tensors loaded.

    Raises:
        TrainingError: stage tensors that the file does not provide, or shape mismatches.
    """
    src = load_state_dict_file(str(path))
    norm = {}
    for k in src:
        norm.setdefault(k.replace(".", "_"), []).append(k)
    own = model.stages.state_dict()
    new_state, missing, wrong = {}, [], []
    for key, value in own.items():
        local = key.split(".", 1)[1] if "." in key else key  # drop the stage index
        cand = local if local in src else None
        if cand is None:
            alts = norm.get(local.replace(".", "_"), [])
            cand = alts[0] if len(alts) == 1 else None
        if cand is None:
            if key.endswith("num_batches_tracked"):
                continue
            missing.append(key)
            continue
        if tuple(src[cand].shape) != tuple(value.shape):
            wrong.append(f"{key} {tuple(src[cand].shape)} vs {tuple(value.shape)}")
            continue
        new_state[key] = src[cand].to(dtype=value.dtype)
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} backbone tensor(s) not in the file, e.g. {', '.join(missing[:3])}")
        if wrong:
            parts.append(f"shape mismatch: {', '.join(wrong[:3])}")
        raise TrainingError(
            f"weights in {os.path.basename(str(path))} do not fit the converted model: " + "; ".join(parts),
            "give the state_dict of the exact model (and --arg settings) the bundle was converted from",
        )
    model.stages.load_state_dict(new_state, strict=False)
    log.info("loaded %d backbone tensors from %s", len(new_state), path)
    return len(new_state)


class _StageForward(nn.Module):
    """What one training iteration runs, as a module so DDP can wrap it.

    Stage 1: every exit's logits with gradients. Stage 2: stages (backbone and final exit)
    under ``no_grad``, each early head on the detached features with gradients; returns the
    early logits followed by the final logits (the teacher, without a graph).
    """

    def __init__(self, model: nn.Module, stage: int):
        super().__init__()
        self.model = model
        self.stage = stage

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        m = self.model
        candidates = getattr(m, "candidates", None)
        if self.stage == 1 and candidates is None:
            return list(m.forward_all(x))
        n = len(m.exit_names)
        backbone = nullcontext if self.stage == 1 else torch.no_grad
        outs = []
        with backbone():
            state = m.start(x)
        for i in range(n):
            with backbone():
                state = m.run_stage(i, state)
            if i == n - 1:
                with backbone():
                    outs.append(m.exit_logits(i, state))
            elif candidates is None:
                outs.append(m.exit_logits(i, state, state.input_size))
            else:  # every candidate on the same features: the backbone ran once
                inputs = m.head_inputs(i, state)
                outs.extend(run_head(head, inputs, state.input_size) for head in candidates[m.exit_names[i]])
        return outs


def loss_names(model: nn.Module) -> Tuple[List[str], List[int]]:
    """One name per training output (``exit#k`` for head candidates, ``final`` last) and the exit each belongs to."""
    names, owner = [], []
    candidates = getattr(model, "candidates", None)
    for i, name in enumerate(model.exit_names[:-1]):
        k = len(candidates[name]) if candidates is not None and name in candidates else 1
        names += [f"{name}#{j}" for j in range(k)] if k > 1 else [name]
        owner += [i] * k
    return names + ["final"], owner + [len(model.exit_names) - 1]


def _set_stage_modes(model: nn.Module, stage: int) -> None:
    model.train()
    if stage == 2:
        model.freeze_backbone(True)
        # Keep frozen BatchNorm statistics untouched even if freeze_backbone does not override train().
        for s in model.stages:
            s.eval()


@contextmanager
def _sigint_flag():
    """First Ctrl-C sets a flag (the loop checkpoints and stops); a second one interrupts at once."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True
        log.warning("interrupt: finishing this iteration and writing a checkpoint (Ctrl-C again to abort now)")

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # pragma: no cover - not in the main interpreter
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class _CsvLog:
    """``train_log.csv``: one row per logged iteration; rewritten on resume up to the checkpoint."""

    def __init__(self, path: Path, loss_names: Sequence[str], enabled: bool):
        self.path = path
        self.enabled = enabled
        self.columns = ["stage", "iteration", "lr", "loss"] + [f"ce/{e}" for e in loss_names] + \
            [f"kd/{e}" for e in loss_names[:-1]] + ["it_per_s", "time"]
        self._fh = None
        self._writer = None

    def open(self, keep_until: Optional[tuple]) -> None:
        if not self.enabled:
            return
        rows = []
        if keep_until is not None and self.path.is_file():
            with open(self.path, newline="") as fh:
                for row in csv.DictReader(fh):
                    try:
                        pos = (int(row["stage"]), int(row["iteration"]))
                    except (KeyError, ValueError):
                        continue
                    if pos <= keep_until:
                        rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path, "w", newline="") as fh:  # a kill now keeps the old log
            head = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            head.writeheader()
            head.writerows(rows)
        self._fh = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.columns, extrasaction="ignore")

    def write(self, row: Mapping[str, Any]) -> None:
        if self._writer is not None:
            self._writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
            self._fh.flush()  # rows are every log_every iterations: cheap, and `tail -f` works

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _tensorboard(run_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"))


# --------------------------------------------------------------------------- trainer
class _Trainer:
    def __init__(self, model, dataset, recipe: Recipe, run_dir, weights, resume, device, progress, info, save, data_name):
        self.run_dir = Path(run_dir)
        self.recipe = recipe
        self.info = info
        self.device = _resolve_device(device, info)
        self.progress = progress
        self.weights = weights
        self.resume = resume
        self.data_name = data_name
        self.save = save
        self.model = model.to("cpu")
        # one loss per output: an exit's head, or each of its candidates (their exit in loss_owner)
        self.loss_names, self.loss_owner = loss_names(self.model)
        check_classes(dataset, self.model.num_classes)
        self.dataset = dataset
        self.ckpt_path = self.run_dir / ckpt_mod.CHECKPOINT_NAME
        self.csv = _CsvLog(self.run_dir / LOG_NAME, self.loss_names, info.is_main)
        self.windows: Dict[int, deque] = {}
        self.reports: List[StageReport] = []

        amp = recipe.amp
        if amp == "fp16" and self.device.type != "cuda":
            log.warning("fp16 autocast needs CUDA; training in float32 on %s", self.device)
            amp = "none"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.channels_last = recipe.channels_last and self.device.type == "cuda"
        if recipe.channels_last and not self.channels_last:
            log.info("channels_last is only used on CUDA; ignored on %s", self.device)

    # ------------------------------------------------------------------ main flow
    def run(self) -> TrainReport:
        if self.recipe.stage1_iters > 0 and getattr(self.model, "train_issue", ""):
            raise TrainingError(
                f"stage 1 (end-to-end) cannot train this bundle: {self.model.train_issue}",
                "train the exit heads only with --set stage1_iters=0 (stage 2 keeps the backbone frozen, "
                "in eval mode), or convert with --trace fx (with --leaf-module for the blocks fx cannot trace)",
            )
        t0 = time.perf_counter()
        state = None
        resumed_from = None
        if self.resume:
            state = ckpt_mod.load_checkpoint(self.ckpt_path)
            self._check_resume(state)
            self.model.load_state_dict(state["model"])
            resumed_from = {"stage": int(state["stage"]), "iteration": int(state["iteration"])}
            self.windows = {int(k): deque(v, maxlen=_WINDOW) for k, v in state.get("windows", {}).items()}
            log.info("resuming from %s: stage %d, iteration %d", self.ckpt_path, state["stage"], state["iteration"])
        else:
            if self.ckpt_path.exists() and self.info.is_main:
                log.warning("%s exists and --resume was not given: starting over and overwriting it", self.ckpt_path)
            if self.weights is not None:
                load_backbone_weights(self.model, self.weights)
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv.open(keep_until=(resumed_from["stage"], resumed_from["iteration"]) if resumed_from else None)
        self.tb = _tensorboard(self.run_dir, self.info.is_main)
        try:
            for stage in (1, 2):
                total = self.recipe.stage1_iters if stage == 1 else self.recipe.stage2_iters
                if state is not None and stage < int(state["stage"]):
                    if total and self.windows.get(stage):  # finished before the checkpoint: report its losses
                        self.reports.append(StageReport(stage, total, total, 0.0, 0.0, self._mean_window(stage)))
                    continue
                stage_state = state if (state is not None and stage == int(state["stage"])) else None
                if total == 0:
                    continue
                self._run_stage(stage, total, stage_state)
        finally:
            self.csv.close()
            if self.tb is not None:
                self.tb.close()
        wall = time.perf_counter() - t0
        if self.info.is_main:
            self._finish(wall)
        barrier()
        return TrainReport(
            run_dir=str(self.run_dir), recipe=self.recipe.to_dict(),
            device=str(self.device), world_size=self.info.world_size, stages=list(self.reports),
            resumed_from=resumed_from, wall_s=wall, checkpoint=str(self.ckpt_path), log=str(self.csv.path),
        )

    def _check_resume(self, state: dict) -> None:
        saved = state.get("recipe", {})
        diffs = [k for k, v in self.recipe.to_dict().items() if k in saved and saved[k] != v and k != "log_every"]
        if diffs:
            log.warning("resuming with a recipe that differs from the checkpoint's in %s; "
                        "the run will not reproduce the uninterrupted one", ", ".join(diffs))
        if state.get("exit_names") and list(state["exit_names"]) != self.loss_names:
            raise TrainingError(
                f"checkpoint {self.ckpt_path} belongs to a model with exits {state['exit_names']}, "
                f"not {self.loss_names}", "resume with the bundle the run started from, or drop --resume")
        if int(state.get("world_size", 1)) != self.info.world_size:
            log.warning("checkpoint was written by %s process(es), resuming with %d: data order differs",
                        state.get("world_size"), self.info.world_size)

    # ------------------------------------------------------------------ one stage
    def _run_stage(self, stage: int, total: int, state: Optional[dict]) -> None:
        model = self.model
        _set_stage_modes(model, stage)
        if stage == 1:
            model.freeze_backbone(False)
            model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt, sched, scaler, start = self._optimizer(stage, total, params, state)
        window = self.windows.setdefault(stage, deque(maxlen=_WINDOW))
        if start >= total:
            self.reports.append(StageReport(stage, total, start, 0.0, 0.0, self._mean_window(stage)))
            return
        net = self._stage_net(stage)
        r = self.recipe
        stream = BatchStream(self.dataset, r.batch_size, r.seed, stage, self.info.rank, self.info.world_size,
                             r.num_workers, pin_memory=self.device.type == "cuda")
        batches = stream.iterate(start)
        self._emit(TrainEvent("stage_start", stage, start, total, start=start, lr=opt.param_groups[0]["lr"]))
        log.info("stage %d: iterations %d..%d of %d on %s", stage, start, total, total, self.device)

        t_start = time.perf_counter()
        done_here = 0
        with _sigint_flag() as sigint:
            for it in range(start, total):
                cur_lr = opt.param_groups[0]["lr"]
                loss, values, with_kd = self._losses(net, next(batches), stage, it, sigint["set"])
                stop = bool(values[-1] > 0)
                self._step(loss, opt, sched, scaler, params)
                done_here += 1
                row = self._row(stage, it + 1, cur_lr, values, self.loss_names, with_kd)
                window.append([float(v) for v in values[:-1]])
                elapsed = time.perf_counter() - t_start
                row["it_per_s"] = done_here / elapsed if elapsed > 0 else 0.0
                last = it + 1 == total
                self._log_step(stage, it, total, start, cur_lr, row, write=(it + 1) % r.log_every == 0 or last or stop)
                if last and r.precise_bn_iters:
                    self._precise_bn(net, batches, r.precise_bn_iters)
                if (it + 1) % r.checkpoint_every == 0 or last or stop:
                    self.csv.flush()
                    self._checkpoint(stage, it + 1, opt, sched, scaler)
                if stop:
                    raise KeyboardInterrupt(f"interrupted at stage {stage} iteration {it + 1}; checkpoint written")
        wall = time.perf_counter() - t_start
        rep = StageReport(stage, total, start, wall, done_here / wall if wall > 0 else 0.0, self._mean_window(stage))
        self.reports.append(rep)
        self._emit(TrainEvent("stage_end", stage, total, total, start=start, loss=rep.final_losses.get("loss", 0.0),
                              losses=rep.final_losses, it_per_s=rep.it_per_s))
        log.info("stage %d done: %d iterations in %.1f s (%.2f it/s)", stage, done_here, wall, rep.it_per_s)

    def _optimizer(self, stage: int, total: int, params: List[nn.Parameter], state: Optional[dict]):
        """Optimizer, poly schedule and (fp16) grad scaler of a stage, restored from ``state`` when resuming."""
        r = self.recipe
        lr = r.lr if stage == 1 else r.lr_stage2
        if r.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=r.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=lr, momentum=r.momentum, weight_decay=r.weight_decay, nesterov=r.nesterov)
        sched = PolyLR(opt, total, r.lr_power)
        scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        start = 0
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            ckpt_mod.set_rng_state(state["rng"])
            start = int(state["iteration"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        return opt, sched, scaler, start

    def _stage_net(self, stage: int) -> nn.Module:
        """What an iteration runs (DDP-wrapped under torchrun); checks the recipe's exit weights first."""
        weights, names = self.recipe.exit_weights, list(self.model.exit_names)
        if weights is not None and len(weights) != len(names):
            raise ConfigError(
                f"exit_weights has {len(weights)} entries but the model has {len(names)} exits ({', '.join(names)})",
                "give one weight per exit, early exits first, final last")
        net: nn.Module = _StageForward(self.model, stage)
        if self.info.enabled:
            net = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return net

    def _losses(self, net: nn.Module, batch, stage: int, it: int, interrupted: bool):
        """Forward one batch; returns (loss, [loss, ce..., kd..., stop flag] averaged over ranks, has kd)."""
        r = self.recipe
        x, y = batch
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Dropout and other model randomness depend on the iteration only.
        torch.manual_seed(derive_seed(r.seed, stage, it, self.info.rank))
        with (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()):
            outs = net(x)
        kds: List[torch.Tensor] = []
        if stage == 1:
            weights = ([r.exit_weights[o] for o in self.loss_owner] if r.exit_weights is not None
                       else [r.early_weight] * (len(outs) - 1) + [1.0])
            loss, ces = multi_exit_ce(outs, y, weights, IGNORE_INDEX)
        else:
            teacher = outs[-1]
            loss, ces, kds = early_exits_loss(outs[:-1], teacher, y, r.distill, r.kd_weight, r.kd_temperature, IGNORE_INDEX)
            with torch.no_grad():
                ces.append(cross_entropy(teacher, y, IGNORE_INDEX))
        stop_flag = torch.tensor([1.0 if interrupted else 0.0], device=loss.device)
        values = torch.cat([loss.detach().reshape(1), torch.stack([c.detach() for c in ces]),
                            torch.stack([k.detach() for k in kds]) if kds else loss.new_zeros(0), stop_flag])
        values = all_reduce_mean(values).cpu()
        if not torch.isfinite(values[:-1]).all():
            self._nan(stage, it, values, self.loss_names, kds)
        return loss, values, bool(kds)

    def _step(self, loss: torch.Tensor, opt, sched, scaler, params: List[nn.Parameter]) -> None:
        clip = self.recipe.grad_clip
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, clip)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
        sched.step()

    def _log_step(self, stage: int, it: int, total: int, start: int, lr: float, row: Dict[str, Any], write: bool) -> None:
        row["time"] = time.time()
        if write:
            self.csv.write(row)
            if self.tb is not None:
                step = it + 1 + (self.recipe.stage1_iters if stage == 2 else 0)
                for k, v in row.items():
                    if k not in ("stage", "iteration", "time") and v != "":
                        self.tb.add_scalar(f"stage{stage}/{k}", v, step)
        self._emit(TrainEvent("step", stage, it + 1, total, start=start, lr=lr, loss=row["loss"],
                              losses={k: v for k, v in row.items() if k.startswith(("ce/", "kd/")) and v != ""},
                              it_per_s=row["it_per_s"]))

    # ------------------------------------------------------------------ pieces
    def _precise_bn(self, net: nn.Module, batches, iters: int) -> None:
        """Recompute the statistics of the BatchNorm layers being trained (fvcore's precise BN).

        Short runs leave running statistics far behind the weights (torchvision's MobileNetV3 uses
        momentum 0.01), and the frozen backbone of stage 2 and inference both use them. Ranks
        average their statistics so that every process ends with the same buffers.
        """
        # imported here: fvcore.nn's import scripts a loss with torch.jit, which warns on every mexify start
        from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats

        bns = get_bn_modules(net)
        if not bns:
            return

        def inputs():
            while True:
                x, _ = next(batches)
                x = x.to(self.device, non_blocking=True)
                yield x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

        with torch.no_grad():
            update_bn_stats(net, inputs(), iters)
            if self.info.enabled:
                for bn in bns:
                    bn.running_mean.copy_(all_reduce_mean(bn.running_mean))
                    bn.running_var.copy_(all_reduce_mean(bn.running_var))
        log.info("recomputed statistics of %d BatchNorm layers over %d batches", len(bns), iters)

    def _columns(self, with_kd: bool) -> List[str]:
        cols = ["loss"] + [f"ce/{e}" for e in self.loss_names]
        if with_kd:
            cols += [f"kd/{e}" for e in self.loss_names[:-1]]
        return cols

    def _row(self, stage, iteration, lr, values, names, with_kd) -> Dict[str, Any]:
        row: Dict[str, Any] = {"stage": stage, "iteration": iteration, "lr": float(lr)}
        for col, v in zip(self._columns(with_kd), values[:-1].tolist()):
            row[col] = float(v)
        return row

    def _mean_window(self, stage: int) -> Dict[str, float]:
        win = self.windows.get(stage)
        if not win:
            return {}
        cols = self._columns(len(win[0]) > 1 + len(self.loss_names))
        t = torch.tensor(list(win), dtype=torch.float64).mean(0)
        return {c: float(v) for c, v in zip(cols, t)}

    def _nan(self, stage, it, values, names, kds) -> None:
        cols = self._columns(bool(kds))
        bad = [c for c, v in zip(cols, values[:-1].tolist()) if not math.isfinite(v)]
        last = "no checkpoint yet"
        if self.ckpt_path.exists():
            try:
                st = ckpt_mod.load_checkpoint(self.ckpt_path)
                last = f"last good checkpoint: stage {st['stage']} iteration {st['iteration']} in {self.ckpt_path}"
            except TrainingError:
                pass
        self.csv.flush()
        raise TrainingError(
            f"non-finite loss at stage {stage} iteration {it + 1} ({', '.join(bad)}); training stopped, {last}",
            "lower the learning rate (--set lr=...), set grad_clip, use bf16 instead of fp16, or check the data "
            "for NaN/inf; then continue with --resume",
        )

    def _checkpoint(self, stage, iteration, opt, sched, scaler) -> None:
        if not self.info.is_main:
            return
        state = {
            "stage": stage,
            "iteration": iteration,
            "model": self.model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "rng": ckpt_mod.rng_state(),
            "recipe": self.recipe.to_dict(),
            "exit_names": list(self.loss_names),
            "world_size": self.info.world_size,
            "windows": {str(k): [list(v) for v in w] for k, w in self.windows.items()},
        }
        ckpt_mod.save_checkpoint(state, self.ckpt_path)

    def _emit(self, event: TrainEvent) -> None:
        if self.progress is not None and self.info.is_main:
            self.progress(event)

    def _finish(self, wall: float) -> None:
        """Hand the trained model (CPU, eval mode) and the run's record to ``save``."""
        self.model.freeze_backbone(False)
        self.model.eval()
        if self.channels_last:
            self.model.to(memory_format=torch.contiguous_format)
        record = {
            "recipe": self.recipe.to_dict(),
            "data": str(self.data_name),
            "iterations": {"stage1": self.recipe.stage1_iters, "stage2": self.recipe.stage2_iters},
            "final_losses": {f"stage{r.stage}": r.final_losses for r in self.reports},
            "it_per_s": {f"stage{r.stage}": r.it_per_s for r in self.reports},
            "weights": str(self.weights) if self.weights is not None else None,
            "device": str(self.device),
            "world_size": self.info.world_size,
            "wall_s": round(wall, 3),
            "mexify_version": __version__,
            "torch_version": str(torch.__version__),
        }
        model = self.model.to("cpu")
        if self.save is not None:
            self.save(model, record)
        model.to(self.device)


# --------------------------------------------------------------------------- entry point
def train_model(
    model: MultiExitModel,
    dataset: Any,
    recipe: Union[str, os.PathLike, Recipe, Mapping[str, Any], None] = "quick-synthetic",
    run_dir: Union[str, os.PathLike] = "mexify.train",
    overrides: Optional[Mapping[str, Any]] = None,
    weights: Optional[Union[str, os.PathLike]] = None,
    resume: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    progress: Optional[Callable[[TrainEvent], None]] = None,
    save: Optional[Callable[[MultiExitModel, Dict[str, Any]], None]] = None,
    data_name: str = "",
) -> TrainReport:
    """Train a multi-exit model in two stages (MESS): end-to-end, then frozen backbone with distillation.

    Objects in, objects out: :func:`mexify.api.train` reads the bundle and the dataset spec
    and writes the trained bundle through ``save``.

    Args:
        model: the converted model (trained in place).
        dataset: yields ``(image, mask)``, with the recipe's augmentations already applied.
        recipe: recipe name (see :func:`~mexify.train.recipe.available_recipes`), YAML path,
            mapping or :class:`Recipe`.
        run_dir: checkpoints, ``train_log.csv`` and TensorBoard logs.
        overrides: recipe fields to change (``{"lr": 0.01}``; strings are parsed).
        weights: the original model's trained weights (state_dict or safetensors), loaded
            into the backbone before stage 1; early heads start from their initialisation.
        resume: continue from the checkpoint in ``run_dir``.
        device: ``cpu``, ``cuda``, ``cuda:1``; default CUDA when available. Under torchrun
            each rank uses ``cuda:LOCAL_RANK``.
        progress: called on rank 0 with a :class:`TrainEvent` at stage start, every
            iteration and stage end.
        save: called once on rank 0 (before the final barrier) with the trained model (CPU,
            eval mode) and the run's record (recipe, data, losses, speeds, versions).
        data_name: how the record names the dataset (its spec).

    Returns:
        A :class:`TrainReport`.

    Raises:
        ConfigError: bad recipe or overrides. DataError: dataset does not fit the model.
        TrainingError: non-finite loss (the last good checkpoint is kept), unreadable
        checkpoint. KeyboardInterrupt: Ctrl-C, after a checkpoint of the last finished iteration.
    """
    rec = load_recipe(recipe, overrides)
    info = init_distributed(resolve_device(device))
    try:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            trainer = _Trainer(model, dataset, rec, run_dir, weights, resume, device, progress, info, save, data_name)
            return trainer.run()
    finally:
        cleanup_distributed(info)
