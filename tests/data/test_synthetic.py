"""Synthetic scenes: deterministic, split-dependent, spanning difficulty, cheap."""
import time

import numpy as np
import pytest
import torch

from mexify.data import IGNORE_INDEX, build_dataset, build_loader
from mexify.errors import DataError

SPEC = "synthetic:scenes?classes=8&size=64&n=64"


def test_contract_shapes_and_names():
    ds = build_dataset("synthetic:scenes?classes=8&size=256&n=2000&seed=0")
    assert len(ds) == 2000 and ds.num_classes == 8 and len(ds.class_names) == 8
    assert ds.class_names[0] == "background" and len(set(ds.class_names)) == 8
    img, mask = ds[0]
    assert img.shape == (3, 256, 256) and img.dtype == torch.float32
    assert mask.shape == (256, 256) and mask.dtype == torch.int64
    assert int(mask.max()) < 8 and IGNORE_INDEX == 255
    assert -3 < float(img.mean()) < 3  # normalised


def test_deterministic_by_seed_and_index_order():
    a = build_dataset(SPEC)
    b = build_dataset(SPEC)
    for i in (5, 0, 3):  # any order gives the same sample
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    c = build_dataset(SPEC + "&seed=1")
    assert not torch.equal(a[0][0], c[0][0])


def test_splits_differ():
    imgs = {s: build_dataset(SPEC, split=s)[0][0] for s in ("train", "val", "calib", "test")}
    keys = list(imgs)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not torch.equal(imgs[keys[i]], imgs[keys[j]])
    assert len(build_dataset(SPEC, split="val")) == 16  # n // 4
    with pytest.raises(DataError, match="valid|use one of"):
        build_dataset(SPEC, split="vall")


def _components(mask):
    """Objects per class blob count, by flood fill (small masks only)."""
    seen = np.zeros_like(mask, dtype=bool)
    count = 0
    h, w = mask.shape
    for y in range(h):
        for x in range(w):
            if mask[y, x] == 0 or seen[y, x]:
                continue
            count += 1
            stack = [(y, x)]
            seen[y, x] = True
            while stack:
                cy, cx = stack.pop()
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and mask[ny, nx] == mask[cy, cx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
    return count


def test_difficulty_spans_easy_to_hard():
    ds = build_dataset("synthetic:scenes?classes=8&size=48&n=200")
    d = ds.difficulties()
    assert d.min() < 0.05 and d.max() > 0.95
    easy = [i for i in range(len(ds)) if d[i] < 0.1][:6]
    hard = [i for i in range(len(ds)) if d[i] > 0.9][:6]
    e_parts = [_components(ds.render(i)[1]) for i in easy]
    h_parts = [_components(ds.render(i)[1]) for i in hard]
    assert max(e_parts) == 1, e_parts  # one object on a plain background
    assert min(h_parts) >= 3 and np.mean(h_parts) > 5, h_parts
    # plain background at the easy end, noisy at the hard end
    bg_std = lambda i: ds.render(i)[0][ds.render(i)[1] == 0].std(0).mean()  # noqa: E731
    assert max(bg_std(i) for i in easy) < 0.02 < min(bg_std(i) for i in hard)


def test_difficulty_knobs():
    ds = build_dataset("synthetic:scenes?size=32&n=50&dmin=0.2&dmax=0.3")
    d = ds.difficulties()
    assert d.min() >= 0.2 and d.max() <= 0.3
    easy = build_dataset("synthetic:scenes?size=32&n=400&mix=easy").difficulties().mean()
    hard = build_dataset("synthetic:scenes?size=32&n=400&mix=hard").difficulties().mean()
    assert easy < 0.4 < 0.6 < hard
    with pytest.raises(DataError, match="dmin"):
        build_dataset("synthetic:scenes?dmin=0.8&dmax=0.2")
    with pytest.raises(DataError, match="mix"):
        build_dataset("synthetic:scenes?mix=medium")


def test_train_augmentation_and_loader():
    ds = build_dataset("synthetic:scenes?size=64&n=8", train=True, crop_size=48)
    img, mask = ds[0]
    assert img.shape == (3, 48, 48) and mask.shape == (48, 48)
    loader = build_loader(ds, batch_size=4, shuffle=True, num_workers=0)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 48, 48) and y.shape == (4, 48, 48) and y.dtype == torch.int64


def test_loader_with_workers_matches_serial():
    ds = build_dataset("synthetic:scenes?size=32&n=8", split="val")
    a = torch.cat([x for x, _ in build_loader(ds, batch_size=2, shuffle=False, num_workers=2)])
    b = torch.cat([x for x, _ in build_loader(ds, batch_size=2, shuffle=False, num_workers=0)])
    assert torch.equal(a, b)


def test_generation_is_cheap():
    ds = build_dataset("synthetic:scenes?size=128&n=64")
    ds[0]
    t = time.perf_counter()
    for i in range(20):
        ds[i]
    per_sample = (time.perf_counter() - t) / 20
    assert per_sample < 0.05, f"{per_sample * 1000:.1f} ms per 128x128 sample"


def _tiny_segmenter(k, c=16):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, padding=1, stride=2), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.Conv2d(2 * c, 2 * c, 3, padding=2, dilation=2), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.Conv2d(2 * c, k, 1), nn.Upsample(scale_factor=2, mode="bilinear"),
    )


def _stack(ds):
    pairs = [ds[i] for i in range(len(ds))]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@pytest.mark.slow
def test_small_cnn_learns_easy_scenes_better_than_hard_ones():
    """A small CNN trained briefly on the full mix is clearly better on easy scenes than hard ones."""
    from mexify.metrics import ConfusionMatrix

    k, size = 4, 48
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: one thread avoids pool contention on shared CPUs
    try:
        x, y = _stack(build_dataset(f"synthetic:scenes?classes={k}&size={size}&n=256"))
        model = _tiny_segmenter(k)
        opt = torch.optim.Adam(model.parameters(), 5e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(200):
            idx = torch.randint(0, len(x), (16,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx], ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        scores = {}
        for part, knobs in (("easy", "dmax=0.25"), ("hard", "dmin=0.75")):
            xe, ye = _stack(build_dataset(f"synthetic:scenes?classes={k}&size={size}&n=4&n_eval=48&{knobs}", split="val"))
            with torch.no_grad():
                scores[part] = ConfusionMatrix(k).update(model(xe), ye).miou()
    finally:
        torch.set_num_threads(threads)
    assert scores["easy"] > 85, scores  # points
    assert scores["easy"] - scores["hard"] > 10, scores


def test_distributed_loader_uses_distributed_sampler(tmp_path):
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ds = build_dataset("synthetic:scenes?size=32&n=6", split="val")
        loader = build_loader(ds, batch_size=2, shuffle=True, num_workers=0, distributed=True)
        assert isinstance(loader.sampler, DistributedSampler)
        loader.sampler.set_epoch(1)
        assert sum(x.shape[0] for x, _ in loader) == len(ds)
    finally:
        dist.destroy_process_group()


def test_context_pair_is_decided_by_the_background_tone():
    """The last two classes look alike; the scene's background tone, hidden near them, decides which."""
    from mexify.data.synthetic import context_classes

    ds = build_dataset("synthetic:scenes?classes=8&size=64&n=120")
    light, dark = context_classes(8)
    assert (light, dark) == (6, 7) and ds.class_names[6].endswith("on-light") and ds.class_names[7].endswith("on-dark")
    la, lb = ds.looks[light], ds.looks[dark]
    assert (la.rgb, la.texture, la.angle, la.period) == (lb.rgb, lb.texture, lb.angle, lb.period)
    assert context_classes(5) == () and len(build_dataset("synthetic:scenes?classes=4&size=32&n=4").class_names) == 4
    d = ds.difficulties()
    seen = set()
    for i in range(len(ds)):
        img, mask = ds.render(i)
        present = {int(c) for c in np.unique(mask)} & {light, dark}
        if d[i] < 0.3:
            assert not present, (i, d[i])  # easy scenes never need the cue
            continue
        if d[i] > 0.6:
            assert len(present) == 1, (i, d[i], present)  # every hard scene holds the pair, one class per scene
        if present:
            (c,) = present
            assert (img[mask == 0].mean() > 0.5) == (c == light), (i, c)
            seen.add(c)
    assert seen == {light, dark}


def test_scenes_written_as_a_folder_read_back_as_rendered(tmp_path):
    from mexify.data import build_dataset
    from mexify.data.synthetic import SceneConfig, SyntheticScenes, write_folder

    cfg = SceneConfig(classes=6, size=32, n=3, n_eval=2, seed=4)
    difficulty = write_folder(cfg, tmp_path)
    assert {k: len(v) for k, v in difficulty.items()} == {"train": 3, "val": 2}
    ds = build_dataset(f"folder:{tmp_path}", split="val")
    _, mask = ds[1]
    assert (mask.numpy() == SyntheticScenes(cfg, split="val").render(1)[1]).all()
    assert (tmp_path / "classes.txt").read_text().splitlines() == SyntheticScenes(cfg).class_names
