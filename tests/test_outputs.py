"""Nothing lost, nothing half-written: outputs checked before any work, atomic writes, stale
temporaries of killed runs swept, one writer per bundle (``mexify.files``)."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import mexify
from mexify import api
from mexify import files as files_mod
from mexify.cli import app
from mexify.errors import BundleError
from mexify.files import bundle_lock, lock_path, replace_dir, sweep_stale

TINY = str(Path(__file__).parent / "train" / "tiny_seg.py") + ":tiny"
DATA = "synthetic:scenes?classes=4&size=48&n=16&n_eval=8"
CALIBRATE = ["--data", DATA, "--limit", "8", "--max-drop", "5"]
TRAIN = ["--data", DATA, "--device", "cpu"] + [
    a for kv in ("stage1_iters=1", "stage2_iters=1", "batch_size=4", "crop_size=48", "num_workers=0", "precise_bn_iters=0")
    for a in ("--set", kv)]


@pytest.fixture(scope="module")
def plain_src(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "src.mex"
    mexify.convert(TINY, args={"num_classes": 4, "width": 8}, exits=3, trace=mexify.TraceConfig((48, 48)), out=str(out))
    return out


@pytest.fixture(scope="module")
def calibrated_src(plain_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "src.mex"
    shutil.copytree(plain_src, out)
    api.calibrate(out, DATA, policy="maxprob", limit=8, budget=api.Budget.max_drop(5.0), means_limit=8)
    return out


@pytest.fixture
def bundle(plain_src, tmp_path):
    dst = tmp_path / "b.mex"
    shutil.copytree(plain_src, dst)
    return dst


@pytest.fixture
def calibrated(calibrated_src, tmp_path):
    dst = tmp_path / "b.mex"
    shutil.copytree(calibrated_src, dst)
    return dst


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _litter(directory: Path) -> list:
    """Temporaries and lock files left in ``directory`` (and below)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if ".tmp-" in p.name or p.name.endswith(".lock"))


def _one_error_line(res, *needles):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    for n in needles:
        assert n in errors[0], res.output
    return errors[0]


def _refuse_work(monkeypatch):
    """Make any model load or calibration/training work fail the test: a refusal must come first."""
    def forbidden(*a, **k):
        raise AssertionError("work started before the output was checked")

    for name in ("load", "fit_policy", "train_model", "predict_images", "export_bundle", "compare_policies"):
        monkeypatch.setattr(api, name, forbidden)


def _unwritable(monkeypatch, *paths):
    """Make the write probe fail in ``paths`` (what chmod does for a user who is not root)."""
    real = files_mod._probe
    refused = {os.path.abspath(p) for p in paths}
    monkeypatch.setattr(files_mod, "_probe", lambda d, name: "Permission denied" if os.path.abspath(d) in refused else real(d, name))


def _image(path: Path, seed: int = 0) -> Path:
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


# =============================================================================== predict
def test_failed_predict_keeps_the_previous_results(calibrated, tmp_path):
    a, b = _image(tmp_path / "a.png"), _image(tmp_path / "b.png", 1)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "pred"
    assert CliRunner().invoke(app, ["predict", str(calibrated), str(a), "-o", str(out)]).exit_code == 0
    before = _snapshot(out)
    assert set(before) == {"a.png", "predictions.jsonl"}

    res = CliRunner().invoke(app, ["predict", str(calibrated), str(b), str(bad), "-o", str(out)])
    _one_error_line(res, "bad.png")
    assert _snapshot(out) == before  # byte-identical, nothing half-written
    assert _litter(tmp_path) == []

    # a run that succeeds replaces the folder as a whole
    assert CliRunner().invoke(app, ["predict", str(calibrated), str(b), "-o", str(out)]).exit_code == 0
    assert set(_snapshot(out)) == {"b.png", "predictions.jsonl"}
    assert _litter(tmp_path) == []


def test_predict_refuses_a_folder_that_is_not_its_own(calibrated, tmp_path, monkeypatch):
    a = _image(tmp_path / "a.png")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    _refuse_work(monkeypatch)
    _one_error_line(CliRunner().invoke(app, ["predict", str(calibrated), str(a), "-o", str(mine)]), "not a predictions folder")
    _one_error_line(CliRunner().invoke(app, ["predict", str(calibrated), str(a), "-o", str(calibrated)]), "not a predictions folder")
    _one_error_line(CliRunner().invoke(app, ["predict", str(calibrated), str(a), "-o", str(a)]), "not a directory")
    assert (mine / "notes.txt").read_text() == "keep me" and _litter(tmp_path) == []


# =============================================================================== train / convert / export / compare
def test_train_onto_another_bundle_is_refused_before_any_work(bundle, plain_src, tmp_path, monkeypatch):
    other = tmp_path / "other.mex"
    shutil.copytree(plain_src, other)
    before = _snapshot(other)
    _refuse_work(monkeypatch)
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["train", str(bundle), "-o", str(other)] + TRAIN)
    assert time.perf_counter() - t0 < 1.0
    _one_error_line(res, "already exists", "--overwrite")
    assert _snapshot(other) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.mex", "other.mex"]  # no run directory, no lock


def test_train_into_a_non_bundle_directory_is_refused_before_any_work(bundle, tmp_path, monkeypatch):
    target = tmp_path / "results"
    target.mkdir()
    (target / "paper.tex").write_text("draft")
    _refuse_work(monkeypatch)
    for extra in ([], ["--overwrite"]):
        t0 = time.perf_counter()
        res = CliRunner().invoke(app, ["train", str(bundle), "-o", str(target)] + TRAIN + extra)
        assert time.perf_counter() - t0 < 1.0
        _one_error_line(res, "not a bundle")
    assert (target / "paper.tex").read_text() == "draft"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.mex", "results"]


def test_convert_export_and_compare_check_their_outputs_first(bundle, tmp_path, monkeypatch):
    target = tmp_path / "results"
    target.mkdir()
    (target / "paper.tex").write_text("draft")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    monkeypatch.setattr(api, "_convert", lambda *a, **k: pytest.fail("converted before the output was checked"))
    _refuse_work(monkeypatch)
    res = CliRunner().invoke(app, ["convert", TINY, "--arg", "num_classes=4", "-o", str(target), "--overwrite"])
    _one_error_line(res, "not a bundle")
    _one_error_line(CliRunner().invoke(app, ["export", str(bundle), "-o", str(target)]), "not a bundle")
    _one_error_line(CliRunner().invoke(app, ["compare", str(bundle), "--data", DATA, "-o", str(a_file)]), "not a directory")
    _unwritable(monkeypatch, tmp_path)
    _one_error_line(CliRunner().invoke(app, ["export", str(bundle), "-o", str(tmp_path / "new.mex")]), "not writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.mex", "file.txt", "results"]


# =============================================================================== read-only bundles
def test_read_only_bundle_is_refused_before_calibration(bundle, tmp_path, monkeypatch):
    before = _snapshot(bundle)
    os.chmod(bundle, 0o555)
    try:
        if files_mod._probe(bundle, "b.mex") is None:
            pytest.skip("chmod does not stop this user's writes (root)")
        _refuse_work(monkeypatch)
        _one_error_line(CliRunner().invoke(app, ["calibrate", str(bundle)] + CALIBRATE), "read-only")
        _one_error_line(CliRunner().invoke(app, ["train", str(bundle)] + TRAIN), "read-only")
    finally:
        os.chmod(bundle, 0o755)
    assert _snapshot(bundle) == before and _litter(tmp_path) == []


@pytest.mark.parametrize("where", ["bundle", "its directory"])
def test_unwritable_bundle_is_refused_before_any_work(bundle, tmp_path, monkeypatch, where):
    """The same check through the write probe, for any user (a read-only mount, an ACL, root's chmod)."""
    before = _snapshot(bundle)
    _unwritable(monkeypatch, bundle if where == "bundle" else tmp_path)
    _refuse_work(monkeypatch)
    for cmd in (["calibrate", str(bundle)] + CALIBRATE, ["train", str(bundle)] + TRAIN, ["profile", str(bundle)]):
        line = _one_error_line(CliRunner().invoke(app, cmd), str(bundle))
        assert ("read-only" in line) and ("Permission denied" in line)
    assert _snapshot(bundle) == before and _litter(tmp_path) == []


def test_a_read_only_copy_is_removed_after_a_failed_update(bundle, tmp_path):
    os.chmod(bundle, 0o555)
    try:
        def fail(tmp):
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            replace_dir(bundle, fail, keep_from=bundle)
    finally:
        os.chmod(bundle, 0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.mex"]


# =============================================================================== the lock
HOLD = textwrap.dedent("""
    import sys
    from mexify.files import bundle_lock
    with bundle_lock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
""")


def test_second_writer_fails_at_once_while_another_process_holds_the_bundle(calibrated, tmp_path, monkeypatch):
    before = _snapshot(calibrated)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(calibrated)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with monkeypatch.context() as m:
            _refuse_work(m)
            t0 = time.perf_counter()
            res = CliRunner().invoke(app, ["calibrate", str(calibrated), "--policy", "entropy"] + CALIBRATE)
            assert time.perf_counter() - t0 < 1.0
            line = _one_error_line(res, str(calibrated), "locked", "another mexify process", f"pid {holder.pid}")
            assert str(lock_path(calibrated)) in line
            for cmd in (["train", str(calibrated)] + TRAIN, ["profile", str(calibrated)]):
                _one_error_line(CliRunner().invoke(app, cmd), "locked")
        assert _snapshot(calibrated) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    res = CliRunner().invoke(app, ["calibrate", str(calibrated), "--policy", "entropy"] + CALIBRATE)
    assert res.exit_code == 0, res.output
    assert mexify.load(calibrated).config.policy["name"] == "entropy"
    assert _litter(tmp_path) == []


def test_lock_is_reentrant_per_thread_and_removed_on_release(bundle):
    import threading

    lock = lock_path(bundle)
    with bundle_lock(bundle):
        assert lock.is_file() and lock.read_text().strip() == str(os.getpid())
        with bundle_lock(bundle):  # a command holding it may call update_bundle
            api.profile(bundle, device="cpu", warmup=0, repeats=1)
        errors = []
        t = threading.Thread(target=lambda: errors.append(pytest.raises(BundleError, bundle_lock(bundle).__enter__)))
        t.start()
        t.join()
        assert "another thread" in str(errors[0].value)
    assert not lock.exists()
    lock.write_text("12345\n")  # left by a killed process: taken over, then removed
    with bundle_lock(bundle):
        pass
    assert not lock.exists()


# =============================================================================== stale temporaries
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_processes_are_swept_live_ones_kept(bundle, tmp_path):
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale_dir = tmp_path / f".b.mex.tmp-{dead}-abcd1234"
        stale_dir.mkdir()
        (stale_dir / "weights.safetensors").write_bytes(b"half")
        (tmp_path / f".b.mex.tmp-{dead}-probe").write_text("")
        live_dir = tmp_path / f".b.mex.tmp-{live.pid}-abcd1234"
        live_dir.mkdir()
        legacy = tmp_path / ".b.mex.tmp-k2j4h5g6"  # no pid: not ours to judge
        legacy.mkdir()
        other = tmp_path / f".c.mex.tmp-{dead}-abcd1234"  # another bundle's
        other.mkdir()
        (bundle / f".config.yaml.tmp-{dead}-abcd1234").write_text("half")  # not carried into the new bundle
        api.profile(bundle, device="cpu", warmup=0, repeats=1)  # any update of b.mex sweeps
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["b.mex", live_dir.name, legacy.name, other.name])
        assert _litter(bundle) == []
    finally:
        live.kill()
        live.wait()
    assert sweep_stale(tmp_path, "b.mex") == [live_dir]


def test_interrupted_two_rename_swap_is_put_back(bundle, tmp_path):
    before = _snapshot(bundle)
    old = tmp_path / f".b.mex.tmp-{_dead_pid()}-old"
    bundle.rename(old)  # killed between the two renames
    sweep_stale(tmp_path, "b.mex")
    assert _snapshot(bundle) == before and sorted(p.name for p in tmp_path.iterdir()) == ["b.mex"]


# =============================================================================== plots inside the swap
def test_calibration_plots_are_written_inside_the_swap(calibrated, tmp_path, monkeypatch):
    before = _snapshot(calibrated)
    assert "calibration/pareto.png" in before
    seen = {}

    def interrupted(tmp, out):
        seen.update(_snapshot(tmp))
        raise KeyboardInterrupt  # killed after the plots, before the swap

    monkeypatch.setattr(files_mod, "_swap", interrupted)
    with pytest.raises(KeyboardInterrupt):
        api.calibrate(calibrated, DATA, policy="entropy", limit=8, budget=api.Budget.max_drop(5.0))
    assert {"config.yaml", "calibration/pareto.png", "calibration/pareto.csv"} <= set(seen)
    assert yaml.safe_load(seen["config.yaml"])["policy"]["name"] == "entropy"
    assert seen["calibration/pareto.png"] != before["calibration/pareto.png"]
    assert _snapshot(calibrated) == before  # old plots with the old policy
    assert _litter(tmp_path) == []
    monkeypatch.undo()
    report = api.calibrate(calibrated, DATA, policy="entropy", limit=8, budget=api.Budget.max_drop(5.0))
    assert report.files["pareto_png"] == str(calibrated / "calibration" / "pareto.png")
    assert _snapshot(calibrated)["calibration/pareto.png"] == seen["calibration/pareto.png"]


# =============================================================================== kill -9
PAUSE = textwrap.dedent("""
    import os, sys, time
    import mexify.files as files

    marker = sys.argv[1]

    def paused(tmp, out):  # the new directory is complete: stop here, as a kill -9 would
        with open(marker + ".part", "w") as fh:
            fh.write(str(tmp))
        os.rename(marker + ".part", marker)
        time.sleep(600)

    files._swap = paused
    from mexify.cli import main
    sys.argv = ["mexify"] + sys.argv[2:]
    main()
""")


def _kill_at_swap(tmp_path: Path, args: list) -> Path:
    """Run ``mexify ARGS`` in a process, SIGKILL it once its new directory is complete; returns that directory."""
    marker = tmp_path.parent / f"{tmp_path.name}-swap"
    env = dict(os.environ, MEXIFY_NO_PROGRESS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", PAUSE, str(marker)] + args, cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"exited with {proc.returncode} before its swap: {proc.stderr.read()[-3000:]}")
            assert time.time() < deadline, "no swap within 120 s"
            time.sleep(0.05)
        tmp = Path(marker.read_text())
        assert tmp.is_dir() and tmp.name.startswith(".b.mex.tmp-") and lock_path(tmp_path / "b.mex").is_file()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return tmp


def test_calibrate_killed_before_its_swap_leaves_the_bundle_and_the_rerun_cleans_up(calibrated, tmp_path, monkeypatch):
    before = _snapshot(calibrated)
    args = ["calibrate", "b.mex", "--policy", "entropy"] + CALIBRATE
    tmp = _kill_at_swap(tmp_path, args)
    assert (tmp / "calibration" / "pareto.png").is_file()  # the plots went into the new directory
    assert _snapshot(calibrated) == before  # old config, old plots
    assert _litter(tmp_path) != []
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert mexify.load(calibrated).config.policy["name"] == "entropy"
    assert _litter(tmp_path) == []


def test_train_killed_before_its_swap_leaves_the_bundle_and_the_rerun_cleans_up(bundle, tmp_path, monkeypatch):
    before = _snapshot(bundle)
    args = ["train", "b.mex"] + TRAIN
    tmp = _kill_at_swap(tmp_path, args)
    assert (tmp / "weights.safetensors").is_file() and _snapshot(bundle) == before
    assert _litter(tmp_path) != []
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    model = mexify.load(bundle)
    assert model.config.training["recipe"]["stage1_iters"] == 1
    assert _snapshot(bundle)["weights.safetensors"] != before["weights.safetensors"]
    assert _litter(tmp_path) == []
