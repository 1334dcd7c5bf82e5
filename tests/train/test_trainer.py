"""The trainer on a tiny network: bundle written back, resume reproduces losses exactly,
interruption and NaN keep the last checkpoint, --weights fills the backbone."""
import csv
import functools
import os
import signal

import pytest
import torch
import yaml

import mexify
from mexify.errors import ConfigError, DataError, TrainingError
from mexify.api import train
from mexify.train import load_checkpoint
from mexify.train.trainer import LOG_NAME, default_run_dir



def _rows(run_dir):
    with open(run_dir / LOG_NAME, newline="") as fh:
        return list(csv.DictReader(fh))


def _losses(rows):
    skip = {"it_per_s", "time"}
    return [{k: v for k, v in r.items() if k not in skip} for r in rows]


def test_train_writes_bundle_log_and_record(tiny_bundle, tmp_path, tiny_data, quick):
    out = tmp_path / "trained.mex"
    events = []
    rep = train(tiny_bundle, tiny_data, overrides=quick(), out=out, device="cpu", progress=events.append)
    assert [s.stage for s in rep.stages] == [1, 2]
    assert rep.run_dir == str(default_run_dir(out))
    rows = _rows(default_run_dir(out))
    assert [(int(r["stage"]), int(r["iteration"])) for r in rows] == [(1, i) for i in range(1, 7)] + [(2, i) for i in range(1, 5)]
    assert rows[-1]["kd/" + mexify.load(out).exit_names[0]] != ""
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    rec = cfg["training"]
    assert rec["recipe"]["name"] == "quick-synthetic" and rec["iterations"] == {"stage1": 6, "stage2": 4}
    assert set(rec["final_losses"]) == {"stage1", "stage2"}
    kinds = [e.kind for e in events]
    assert kinds[0] == "stage_start" and kinds.count("step") == 10 and kinds[-1] == "stage_end"
    # The input bundle is untouched when -o is given; the trained one differs from it.
    a, b = mexify.load(tiny_bundle).state_dict(), mexify.load(out).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_crash_reproduces_losses(tiny_bundle, tmp_path, tiny_data, quick, workers):
    quick = functools.partial(quick, num_workers=workers)
    ref = train(tiny_bundle, tiny_data, overrides=quick(), out=tmp_path / "a.mex", device="cpu")
    ref_rows = _losses(_rows(default_run_dir(tmp_path / "a.mex")))

    class Crash(Exception):
        pass

    def crash_at(stage, it):
        def cb(ev):
            if ev.kind == "step" and (ev.stage, ev.iteration) == (stage, it):
                raise Crash

        return cb

    out = tmp_path / "b.mex"
    with pytest.raises(Crash):  # after stage 1 iteration 5; the checkpoint holds iteration 3
        train(tiny_bundle, tiny_data, overrides=quick(), out=out, device="cpu", progress=crash_at(1, 5))
    assert load_checkpoint(default_run_dir(out) / "checkpoint.pt")["iteration"] == 3
    with pytest.raises(Crash):  # resumed, crash again in stage 2
        train(tiny_bundle, tiny_data, overrides=quick(), out=out, device="cpu", resume=True, progress=crash_at(2, 2))
    rep = train(tiny_bundle, tiny_data, overrides=quick(), out=out, device="cpu", resume=True)
    assert rep.resumed_from == {"stage": 2, "iteration": 0} or rep.resumed_from == {"stage": 1, "iteration": 6}
    assert _losses(_rows(default_run_dir(out))) == ref_rows
    a, b = mexify.load(tmp_path / "a.mex").state_dict(), mexify.load(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rep.stages[-1].final_losses == ref.stages[-1].final_losses


def test_sigint_checkpoints_and_stops(tiny_bundle, tmp_path, tiny_data, quick):
    out = tmp_path / "c.mex"
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN when run in the background by a shell

    def interrupt(ev):
        if ev.kind == "step" and (ev.stage, ev.iteration) == (1, 4):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_bundle, tiny_data, overrides=quick(checkpoint_every=100), out=out, device="cpu", progress=interrupt)
    # The flag is seen in the next iteration, which finishes and is checkpointed.
    st = load_checkpoint(default_run_dir(out) / "checkpoint.pt")
    assert (st["stage"], st["iteration"]) == (1, 5)
    assert signal.getsignal(signal.SIGINT) is before  # the trainer's handler is gone, the caller's is back
    assert not out.exists()
    train(tiny_bundle, tiny_data, overrides=quick(checkpoint_every=100), out=out, device="cpu", resume=True)
    assert (out / "config.yaml").is_file()


class _Poisoned(torch.utils.data.Dataset):
    """Wraps a dataset; once ``poison`` is set, images are NaN."""

    def __init__(self, base):
        self.base, self.poison, self.num_classes = base, False, base.num_classes

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (torch.full_like(x, float("nan")) if self.poison else x), y


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_bundle, tmp_path, tiny_data, quick):
    from mexify.data import build_dataset

    ds = _Poisoned(build_dataset(tiny_data, split="train", train=True, crop_size=48))

    def poison(ev):
        if ev.kind == "step" and (ev.stage, ev.iteration) == (1, 4):
            ds.poison = True

    out = tmp_path / "d.mex"
    with pytest.raises(TrainingError) as e:
        train(tiny_bundle, ds, overrides=quick(), out=out, device="cpu", progress=poison)
    msg = str(e.value)
    assert "non-finite loss at stage 1 iteration 5" in msg and "iteration 3" in msg
    st = load_checkpoint(default_run_dir(out) / "checkpoint.pt")
    assert st["iteration"] == 3 and all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())
    assert not out.exists()


def test_weights_fill_the_backbone(tiny_bundle, tmp_path, tiny_spec, tiny_data, quick):
    import importlib.util

    path, _, factory = tiny_spec.rpartition(":")
    spec = importlib.util.spec_from_file_location("tiny_seg_for_weights", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    original = getattr(mod, factory)(num_classes=4, width=8)
    with torch.no_grad():
        for i, p in enumerate(original.parameters()):
            p.copy_(torch.full_like(p, 0.01 * (i + 1)))
    wfile = tmp_path / "orig.pth"
    torch.save({"state_dict": original.state_dict()}, wfile)
    out = tmp_path / "w.mex"
    train(tiny_bundle, tiny_data, overrides=quick(stage1_iters=0, stage2_iters=0), out=out, weights=wfile, device="cpu")
    model = mexify.load(out)
    src = original.state_dict()
    stage_state = model.stages.state_dict()
    assert len(stage_state) == len(src)
    for key, value in stage_state.items():
        assert torch.equal(value, src[key.split(".", 1)[1]]), key
    x = torch.randn(1, 3, 48, 48)
    original.eval()
    assert torch.allclose(model.eval()(x), original(x), atol=1e-5)
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(TrainingError, match="do not fit"):
        train(tiny_bundle, tiny_data, overrides=quick(), out=tmp_path / "x.mex", weights=bad, device="cpu")


def test_bad_inputs(tiny_bundle, tmp_path, tiny_data, quick):
    with pytest.raises(ConfigError, match="did you mean 'stage2_iters'"):
        train(tiny_bundle, tiny_data, overrides={"stage2_iter": 3})
    with pytest.raises(ConfigError, match="exit_weights"):
        train(tiny_bundle, tiny_data, overrides=quick(exit_weights=[1, 1]), out=tmp_path / "e.mex", device="cpu")
    with pytest.raises(DataError, match="classes"):
        train(tiny_bundle, "synthetic:scenes?classes=5&size=48&n=8", overrides=quick(), out=tmp_path / "f.mex")
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(tiny_bundle, tiny_data, overrides=quick(), out=tmp_path / "g.mex", resume=True)


def test_bf16_autocast_and_channels_last_flags_on_cpu(tiny_bundle, tmp_path, tiny_data, quick):
    """bf16 autocast runs on CPU; channels_last is a CUDA-only option and is ignored here."""
    rep = train(tiny_bundle, tiny_data, overrides=quick(stage1_iters=2, stage2_iters=2, amp="bf16", channels_last=True),
                out=tmp_path / "bf16.mex", device="cpu")
    assert all(torch.isfinite(torch.tensor(list(s.final_losses.values()))).all() for s in rep.stages)
    w = mexify.load(tmp_path / "bf16.mex").state_dict()
    assert all(v.dtype != torch.bfloat16 for v in w.values())


def test_precise_bn_updates_trained_layers_only(tiny_bundle, tmp_path, tiny_data, quick):
    """Precise BN runs over exactly N extra batches at each stage end, and never touches the frozen
    backbone's statistics in stage 2."""
    def tracked(model):
        stage_bn = next(m for m in model.stages.modules() if isinstance(m, torch.nn.BatchNorm2d))
        head_bn = next(m for m in model.heads.modules() if isinstance(m, torch.nn.BatchNorm2d))
        return int(stage_bn.num_batches_tracked), int(head_bn.num_batches_tracked), stage_bn.running_mean.clone()

    base = tracked(mexify.load(tiny_bundle))
    out = tmp_path / "p.mex"
    train(tiny_bundle, tiny_data, overrides=quick(stage1_iters=2, stage2_iters=2, precise_bn_iters=3), out=out, device="cpu")
    stage_n, head_n, _ = tracked(mexify.load(out))
    assert stage_n - base[0] == 2 + 3  # stage 1 steps + precise BN; frozen in stage 2
    assert head_n - base[1] == (2 + 3) * 2  # heads train (and are re-estimated) in both stages
    plain = tmp_path / "n.mex"
    train(tiny_bundle, tiny_data, overrides=quick(stage1_iters=2, stage2_iters=2, precise_bn_iters=0), out=plain, device="cpu")
    assert not torch.equal(tracked(mexify.load(plain))[2], tracked(mexify.load(out))[2])
