"""Each policy's decision against a direct reference computation on hand-made logits."""
import math
import os
import sys

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from toy_models import NoisyExits, make_scenes  # noqa: E402

from mexify.calibrate import collect_cache  # noqa: E402
from mexify.errors import ConfigError  # noqa: E402
from mexify.policies import (  # noqa: E402
    PROB_EDGES,
    available_policies,
    boundary_mask,
    build_policy,
    class_thresholds_from_means,
    policy_from_dict,
    snap_to_edge,
)




def _logits(n=2, k=3, h=6, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, h, w, generator=g) * 3


def _ref_boundary(pred, r):
    n, h, w = pred.shape
    out = np.zeros((n, h, w), dtype=bool)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                win = pred[b, max(0, i - r): i + r + 1, max(0, j - r): j + r + 1]
                out[b, i, j] = bool((win != pred[b, i, j]).any())
    return out


def test_registry_lists_every_policy_and_suggests_names():
    assert {"mess", "entropy", "maxprob", "cbt", "class-means", "oracle"} <= set(available_policies())
    with pytest.raises(ConfigError, match="mess"):
        build_policy("mes")


def test_boundary_mask_matches_window_reference():
    pred = torch.randint(0, 3, (2, 9, 11))
    for r in (0, 1, 2):
        assert np.array_equal(boundary_mask(pred, r).numpy(), _ref_boundary(pred.numpy(), r))


@pytest.mark.parametrize("edge_weight", [0.0, 0.5, 1.0])
def test_mess_matches_reference_with_edge_discount(edge_weight):
    z = _logits()
    pol = build_policy("mess", pixel_threshold=0.8, edge_radius=1, edge_weight=edge_weight).with_thresholds([0.4])
    p = torch.softmax(z, 1).numpy()
    top1, pred = p.max(1), p.argmax(1)
    edge = _ref_boundary(pred, 1)
    tau = snap_to_edge(0.8)[0]
    w = np.where(edge, edge_weight, 1.0)
    above = (top1 >= np.float32(tau)).astype(float)
    ref = np.array([(w[b] * above[b]).sum() / w[b].sum() if w[b].sum() > 0 else above[b].mean() for b in range(2)])
    exit_now, conf = pol.decide(0, z)
    assert np.allclose(conf.numpy(), ref, atol=1e-6)
    assert exit_now.tolist() == (ref >= 0.4).tolist()


def test_edge_discount_raises_confidence_when_boundary_pixels_are_the_unsure_ones():
    # two classes split down the middle: confident inside, unsure within one pixel of the boundary
    z = torch.zeros(1, 2, 8, 8)
    z[0, 0, :, :4], z[0, 1, :, 4:] = 8.0, 8.0
    z[0, 0, :, 3], z[0, 1, :, 4] = 0.2, 0.2
    plain = build_policy("mess", pixel_threshold=0.9, edge_radius=1, edge_weight=1.0).with_thresholds([0.5])
    discounted = build_policy("mess", pixel_threshold=0.9, edge_radius=1, edge_weight=0.0).with_thresholds([0.5])
    conf_plain, conf_discounted = plain.decide(0, z)[1], discounted.decide(0, z)[1]
    assert conf_plain.item() == pytest.approx(0.75)  # the two boundary columns of eight are below 0.9
    assert conf_discounted.item() == pytest.approx(1.0)  # and they no longer count


def test_entropy_and_maxprob_match_reference():
    z = _logits(k=4)
    p = torch.softmax(z, 1).double().numpy()
    h = -(p * np.log(p)).sum(1).reshape(2, -1).mean(1)
    ent = build_policy("entropy").with_thresholds([0.5])
    _, conf = ent.decide(0, z)
    assert np.allclose(conf.numpy(), 1 - h / math.log(4), atol=1e-6)
    mp = build_policy("maxprob").with_thresholds([0.7])
    ex, conf = mp.decide(0, z)
    ref = p.max(1).reshape(2, -1).mean(1)
    assert np.allclose(conf.numpy(), ref, atol=1e-6)
    assert ex.tolist() == (ref >= 0.7).tolist()


def test_temperature_divides_logits():
    z = _logits()
    pol = build_policy("maxprob", temperatures=[2.0, 1.0]).with_thresholds([0.5])
    _, conf = pol.decide(0, z)
    ref = torch.softmax(z / 2.0, 1).max(1).values.flatten(1).double().mean(1)
    assert torch.allclose(conf.double(), ref, atol=1e-6)


def test_final_exit_always_exits():
    z = torch.zeros(3, 4, 5, 5)  # uniform: the least confident map there is
    for name in ("mess", "entropy", "maxprob"):
        pol = build_policy(name).with_thresholds([0.99, 0.99])
        assert not pol.decide(0, z)[0].any()
        assert pol.decide(2, z)[0].all()


def test_cbt_thresholds_order_classes_by_gap():
    # class 0: clear winner (easy), class 1: middling, class 2: near tie (hard), class 3 unseen
    mean = np.array([[0.9, 0.05, 0.05, 0.0], [0.2, 0.6, 0.2, 0.0], [0.1, 0.45, 0.45, 0.0], [0.25] * 4])
    thr = class_thresholds_from_means(mean, np.array([True, True, True, False]), 0.9, 0.998)
    assert thr[0] == pytest.approx(0.9) and thr[2] == pytest.approx(0.998) and thr[3] == pytest.approx(0.998)
    assert thr[0] < thr[1] < thr[2]
    gap1 = (0.4 - 0.0) / (0.85 - 0.0)
    assert thr[1] == pytest.approx(0.998 - (0.998 - 0.9) * gap1)


def test_cbt_settled_fraction_matches_reference():
    z = _logits(k=3)
    pol = build_policy("cbt", class_thresholds=[0.5, 0.9, 0.99]).with_thresholds([0.3])
    p = torch.softmax(z, 1).numpy()
    top1, pred = p.max(1), p.argmax(1)
    thr = np.array(pol.class_thresholds, dtype=np.float32)
    ref = (top1 >= thr[pred]).reshape(2, -1).mean(1)
    ex, conf = pol.decide(0, z)
    assert np.allclose(conf.numpy(), ref, atol=1e-7)
    assert ex.tolist() == (ref >= 0.3).tolist()


def test_class_means_matches_reference():
    torch.manual_seed(1)
    feats = torch.randn(2, 5, 3, 4)
    means = [np.random.RandomState(0).randn(3, 5).astype(np.float32)]
    scales = [np.array([1.5, 2.0, 2.5], dtype=np.float32)]
    pol = build_policy("class-means", sharpness=4.0)
    pol.means, pol.scales = means, scales
    pol = pol.with_thresholds([0.6])
    logits = torch.zeros(2, 3, 3, 4)  # same size as the features: no resampling in the reference
    f = feats.permute(0, 2, 3, 1).numpy()
    d = np.linalg.norm(f[..., None, :] - means[0][None, None, None], axis=-1) / scales[0]
    z = -4.0 * d
    pr = np.exp(z - z.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    ref = pr.max(-1).reshape(2, -1).mean(1)
    ex, conf = pol.decide(0, logits, feats)
    assert np.allclose(conf.numpy(), ref, atol=1e-5)
    assert ex.tolist() == (ref >= 0.6).tolist()


def test_class_means_collects_means_without_trained_heads():
    model = NoisyExits()
    data = make_scenes(6)
    batches = [(torch.stack([d[0] for d in data]), torch.stack([d[1] for d in data]))]
    pol = build_policy("class-means").collect_means(model, batches, model.num_classes)
    assert len(pol.means) == len(model.exit_names) - 1
    # the first 4 feature channels are the one-hot label: each class mean has a 1 at its own class
    m = pol.means[0]
    seen = ~np.isnan(m[:, 0])
    assert np.allclose(m[seen][:, :4], np.eye(4)[seen], atol=0.3)


def test_oracle_cannot_decide():
    with pytest.raises(ConfigError, match="labels"):
        build_policy("oracle").decide(0, _logits())


@pytest.mark.parametrize("name", ["mess", "entropy", "maxprob", "cbt", "class-means", "oracle", "fft", "learned"])
def test_to_dict_from_dict_round_trip_through_yaml(name):
    pol = build_policy(name)
    if name == "cbt":
        pol = build_policy("cbt", alpha=0.8, class_thresholds=[0.8, 0.95, 0.99])
    if name == "class-means":
        pol.means = [np.arange(6, dtype=np.float32).reshape(2, 3)]
        pol.scales = [np.ones(2, dtype=np.float32)]
    pol = pol.with_thresholds([0.5, math.inf])
    pol.exit_names = ["layer1", "layer2", "final"]
    pol.temperatures = [1.5, 1.2, 1.0]
    pol.budget = {"kind": "speedup", "value": 2.0, "text": "2x"}
    d = yaml.safe_load(yaml.safe_dump(pol.to_dict(), sort_keys=False))
    assert d["thresholds"] == {"layer1": 0.5, "layer2": None}
    back = policy_from_dict(d)
    assert type(back) is type(pol)
    assert back.to_dict() == pol.to_dict()
    assert back.thresholds == [0.5, math.inf]
    if name == "class-means":
        assert np.array_equal(back.means[0], pol.means[0])


@pytest.fixture(scope="module")
def toy_cache():
    torch.manual_seed(0)
    model = NoisyExits()
    data = make_scenes(18)
    loader = torch.utils.data.DataLoader(data, batch_size=6)
    return model, data, collect_cache(model, loader, edge_radius=1)


@pytest.mark.parametrize("name,opts", [("mess", {"edge_radius": 1}), ("mess", {"edge_radius": 1, "edge_weight": 0.3}),
                                       ("entropy", {}), ("maxprob", {}), ("cbt", {}), ("fft", {"band": 2}),
                                       ("fft", {"band": 3}), ("learned", {"tolerance": 5.0})])
def test_cache_scores_equal_run_time_scores(toy_cache, name, opts):
    model, data, cache = toy_cache
    pol = build_policy(name, **opts)._fit_params(cache)
    cached = pol.cache_scores(cache)
    x = torch.stack([d[0] for d in data])
    logits = model.forward_all(x)
    for i in range(len(logits) - 1):
        live = pol.scores(i, logits[i]).double().numpy()
        assert np.allclose(cached[:, i], live, atol=1e-6), (name, i)


def test_prob_edges_are_ascending_and_fine_near_one():
    assert np.all(np.diff(PROB_EDGES) > 0)
    assert PROB_EDGES[0] == 0.0 and PROB_EDGES[-1] > 0.9999
    assert snap_to_edge(0.998)[0] <= 0.998


# ------------------------------------------------------------------------------- fft
def _ref_band_energy(top1, lo, hi):
    """numpy reference: mean |rfft2| (orthonormal) of the mean-removed map over bins with lo <= r/Nyquist < hi."""
    out = []
    for c in top1:
        c = c.astype(np.float64) - c.astype(np.float64).mean()
        mag = np.abs(np.fft.rfft2(c, norm="ortho"))
        fy, fx = np.fft.fftfreq(c.shape[0])[:, None], np.fft.rfftfreq(c.shape[1])[None, :]
        r = np.sqrt(fy ** 2 + fx ** 2) / 0.5
        sel = (r >= lo) & (r < hi)
        out.append(mag[sel].mean() if sel.any() else 0.0)
    return np.array(out)


def test_fft_band_energy_matches_numpy_and_hand_cases():
    from mexify.policies.fft import BANDS, band_energy

    g = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 12, 16, generator=g)
    got = band_energy(maps).numpy()
    for b, (lo, hi) in enumerate(BANDS):
        assert np.allclose(got[:, b], _ref_band_energy(maps.numpy(), lo, hi), rtol=1e-12, atol=1e-15), b
    # a flat map has no energy anywhere; a checkerboard only at the highest frequency (r = sqrt 2)
    flat = torch.full((1, 8, 8), 0.7)
    assert band_energy(flat).abs().max() < 1e-12
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float()[None]
    e = band_energy(checker)[0]
    assert e[0] == e[1] == e[2] == 0 and e[3] > 0 and e[5] > 0


def test_fft_confidence_is_higher_for_a_smooth_prediction():
    smooth = torch.zeros(1, 2, 16, 16)
    smooth[:, 0, :, :8] = 4.0
    smooth[:, 1, :, 8:] = 4.0  # two halves
    speckled = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0)) * 4
    pol = build_policy("fft", band=3).with_thresholds([0.0])
    assert float(pol.scores(0, smooth)) > float(pol.scores(0, speckled))


def test_fft_fit_keeps_the_band_that_reaches_the_budget_best(toy_cache):
    _, _, cache = toy_cache
    fitted = build_policy("fft").fit(cache, max_drop=2.0)
    costs = [build_policy("fft", band=b).fit(cache, max_drop=2.0).figures["mean_cost"] for b in range(6)]
    assert fitted.figures["mean_cost"] == min(costs) and costs[fitted.band] == min(costs)
    assert fitted.figures["drop"] <= 2.0 + 1e-9



def test_a_certified_fft_fit_chooses_its_band_on_the_proposing_half_only(toy_cache):
    """With a confidence the band is chosen by point fits on the images that propose thresholds, never by the
    certified figures (the half that certifies must not have chosen anything), then certified like any fit."""
    _, _, cache = toy_cache
    half = cache.proposal_half()
    assert half.num_images == cache.num_images // 2
    costs = [build_policy("fft", band=b).fit(half, max_drop=20.0).figures["mean_cost"] for b in range(6)]
    certified = build_policy("fft").fit(cache, max_drop=20.0, confidence=0.9)
    assert costs[certified.band] == min(costs)
    again = build_policy("fft", band=certified.band).fit(cache, max_drop=20.0, confidence=0.9)
    assert again.thresholds == certified.thresholds and again.figures["drop_bound"] == certified.figures["drop_bound"]


# ------------------------------------------------------------------------------- learned
def test_learned_features_match_a_reference_on_hand_made_logits():
    from mexify.policies.learned import exit_features

    logits = _logits(n=2, k=3, h=6, w=7)
    probs = torch.softmax(logits, 1)
    top1 = probs.max(1).values
    from mexify.policies import band_energy, mean_entropy, prob_bins

    bins = prob_bins(top1)
    counts = torch.stack([torch.bincount(bins[i].flatten(), minlength=len(PROB_EDGES)) for i in range(2)])
    feats = exit_features(counts, torch.full((2,), 42.0), top1.flatten(1).double().mean(1), mean_entropy(probs),
                          band_energy(top1), 3).numpy()
    t = top1.numpy().reshape(2, -1)
    groups = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 2.0]
    for i in range(2):
        ref_share = [np.mean((t[i] >= np.float32(groups[g])) & (t[i] < np.float32(groups[g + 1]))) for g in range(8)]
        ent = -(probs[i].double() * probs[i].double().log()).sum(0).mean() / math.log(3)
        assert np.isclose(feats[i, 0], t[i].astype(np.float64).mean())
        assert np.isclose(feats[i, 1], float(ent))
        assert np.allclose(feats[i, 2:10], ref_share)
    assert feats.shape == (2, 16) and np.isfinite(feats).all()


def test_learned_policy_separates_good_from_bad_images_and_round_trips(toy_cache):
    model, data, cache = toy_cache
    pol = build_policy("learned").fit(cache, max_drop=2.0)
    assert pol.tolerance == 2.0 and len(pol.nets) == cache.num_exits - 1
    # its score ranks images whose exit is good enough above the others (AUC above chance on its own data)
    scores = pol.cache_scores(cache)
    per_image = cache.per_image_miou()
    good = per_image[:, -1] - per_image[:, 0] <= 2.0
    if good.any() and (~good).any():
        s_good, s_bad = scores[good, 0], scores[~good, 0]
        auc = (s_good[:, None] > s_bad[None, :]).mean() + 0.5 * (s_good[:, None] == s_bad[None, :]).mean()
        assert auc > 0.7
    back = policy_from_dict(yaml.safe_load(yaml.safe_dump(pol.to_dict())))
    assert np.array_equal(back.cache_scores(cache), scores)
    assert back.thresholds == pol.thresholds
