"""Decisions do not depend on batch neighbours: images of different sizes are never computed padded."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mexify
from mexify.calibrate import collect_cache
from mexify.data import build_dataset, build_loader, unpadded
from mexify.policies import build_policy
from mexify.tools import evaluate_policy

FIXTURES = Path(__file__).parent / "fixture_models.py"


def _folder(root: Path) -> str:
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(32, 48), (48, 32), (32, 48), (48, 48)]):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(rng.integers(0, 3, (h, w), dtype=np.uint8)).save(root / "masks" / f"s{i}.png")
    return f"folder:{root}?classes=3"


def test_padded_batches_are_split_by_size_and_cropped(tmp_path):
    ds = build_dataset(_folder(tmp_path), split="train")
    batch = next(iter(build_loader(ds, batch_size=4, shuffle=False, num_workers=0)))
    assert len(batch) == 3 and batch[2].tolist() == [[32, 48], [48, 32], [32, 48], [48, 48]]
    groups = list(unpadded([batch]))
    assert [tuple(x.shape) for x, _ in groups] == [(2, 3, 32, 48), (1, 3, 48, 32), (1, 3, 48, 48)]
    assert torch.equal(groups[0][0][1], ds[2][0]) and torch.equal(groups[1][1][0], ds[1][1])


def test_same_statistics_and_exit_alone_and_in_a_padded_batch(tmp_path):
    spec = _folder(tmp_path)
    torch.manual_seed(0)
    model = mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 3}, trace=mexify.TraceConfig((32, 32)), exits=3).model.eval()
    ds = build_dataset(spec, split="train")
    alone = collect_cache(model, build_loader(ds, batch_size=1, shuffle=False, num_workers=0), thumb=0)
    batched = collect_cache(model, build_loader(ds, batch_size=4, shuffle=False, num_workers=0), thumb=0)
    order = [0, 2, 1, 3]  # batched statistics come in groups of equal size
    for name in ("class_hist", "edge_hist", "num_pixels", "tp", "pred_count"):
        np.testing.assert_array_equal(getattr(batched, name), getattr(alone, name)[order], err_msg=name)
    np.testing.assert_allclose(batched.mean_maxprob, alone.mean_maxprob[order], rtol=1e-6)
    policy = build_policy("maxprob").with_thresholds([0.4, 0.45, 0.5])
    policy.exit_names = list(model.exit_names)
    one = evaluate_policy(model, policy, ds, batch_size=1, device="cpu")
    four = evaluate_policy(model, policy, ds, batch_size=4, device="cpu")
    assert one.exit_rates == four.exit_rates and abs(one.miou - four.miou) < 1e-9
