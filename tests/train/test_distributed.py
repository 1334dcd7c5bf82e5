"""torchrun --nproc-per-node 2 with gloo on CPU: parameters stay identical, only rank 0 writes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_torchrun_two_ranks(tiny_bundle, tiny_data, tmp_path):
    out = tmp_path / "ddp.mex"
    dump = str(tmp_path / "rank{rank}.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "_ddp_worker.py"), str(tiny_bundle), tiny_data, str(out), dump]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(dump.format(rank=r), weights_only=True) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    for k, v in r0["state"].items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        assert torch.equal(v, r1["state"][k]), k
    # Only rank 0 wrote: one bundle, one run dir with one log and checkpoint, no temp files.
    run_dir = tmp_path / "ddp.mex.train"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "train_log.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.mex", "ddp.mex.train", "rank0.pt", "rank1.pt", "tiny.mex"]
    rows = (run_dir / "train_log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 + 2
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ck["world_size"] == 2 and (ck["stage"], ck["iteration"]) == (2, 2)
