"""mexify.graph.placement: which nodes can carry an exit (find_candidates) and which N to use
(select_exit_points), on hand-built graphs prepared as ``prepare.trace_for_exits`` does (trace, logits
only, profile, batch analysis) and on hand-made candidate lists."""
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mexify.errors import PlacementError
from mexify.graph.adapt import prepare_graph
from mexify.graph.batching import analyze_batch
from mexify.graph.placement import ExitPoint, PlacementConfig, find_candidates, output_stride, select_exit_points
from mexify.graph.flops import profile_graph


def _prepared(module, size):
    """What trace_for_exits does before placement: trace, keep the logits, profile at batch 1, analyse the batch."""
    gm = prepare_graph(fx.symbolic_trace(module.eval()))
    report = profile_graph(gm, torch.zeros(1, 3, *size))
    analyze_batch(gm, size)
    return gm, report.total


def _block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU())


class Blocks(nn.Module):
    """Three conv-ReLU blocks and a skip from the first block's output to the end."""

    def __init__(self):
        super().__init__()
        self.layer1 = _block(3, 4)
        self.layer2 = _block(4, 8, 2)
        self.layer3 = _block(8, 8)
        self.cls = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        f1 = self.layer1(x)
        f3 = self.layer3(self.layer2(f1))
        return self.cls(f3 + F.avg_pool2d(f1, 2).repeat(1, 2, 1, 1))


class Zoo(nn.Module):
    """Values that are no exit point: a zero-FLOP start, a map larger than the input, an NHWC view,
    integer maps, a 1/64 map, and the classifier block (a light one, after half of the FLOPs, or a heavy one)."""

    def __init__(self, heavy_head=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        width = 64 if heavy_head else 8
        self.head = nn.Sequential(nn.Conv2d(8, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2, 1))

    def forward(self, x):
        f = self.stem(x * 2)
        big = F.interpolate(f, scale_factor=2.0)
        nhwc = f.permute(0, 2, 3, 1).contiguous()
        mask = (f > 0).long()
        d = self.down(f)
        g = d * self.pool(d)
        return self.head(g) + (big.mean() + nhwc.mean() + mask.float().mean())


class FoldedBatch(nn.Module):
    """Folds the batch into ``(B * 2, C / 2, H, W)`` groups, alive across ``b`` and ``c``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.cls = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        s = self.a(x)
        B, C, H, W = s.shape
        g = s.reshape(B * 2, C // 2, H, W).sigmoid()
        y = self.c(self.b(s))
        return self.cls(y * g.reshape(B, C, H, W))


class SharedByAllRows(nn.Module):
    """A learned positional map resized to the input: a 4-D map with FLOPs that holds no image."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 4, 4, 4))
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.cls = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        pos = F.interpolate(self.pos, size=x.shape[-2:], mode="bilinear") * 2
        return self.cls(self.b(self.a(x) + pos))


# --------------------------------------------------------------------- find_candidates
def test_candidates_are_every_feature_map_before_the_classifier_with_its_cost_and_liveness():
    gm, total = _prepared(Blocks(), (16, 16))
    found = find_candidates(gm, (16, 16), num_classes=2)
    rows = [(c.name, c.position, c.channels, c.height, c.width, c.stride, c.block, c.live_tensors) for c in found]
    assert rows == [
        ("layer1_0", 1, 4, 16, 16, 1.0, "", 1),
        ("layer1_1", 2, 4, 16, 16, 1.0, "layer1", 1),  # the last node of a block closes it
        ("layer2_0", 3, 8, 8, 8, 2.0, "", 2),  # the skip (layer1_1) is alive from here on
        ("layer2_1", 4, 8, 8, 8, 2.0, "layer2", 2),
        ("layer3_0", 5, 8, 8, 8, 2.0, "", 2),
        ("layer3_1", 6, 8, 8, 8, 2.0, "layer3", 2),
        ("avg_pool2d", 7, 4, 8, 8, 2.0, "", 2),
        ("repeat", 8, 8, 8, 8, 2.0, "", 2),
        ("add", 9, 8, 8, 8, 2.0, "", 1),  # not the classifier (cls) nor anything after it
    ]
    assert found[0].cum_flops == 4 * 3 * 9 * 16 * 16  # the first 3x3 convolution
    assert [c.cum_flops for c in found] == sorted(c.cum_flops for c in found)
    assert all(c.fraction == c.cum_flops / total for c in found)
    assert all(not c.shrink_issue for c in found)


def test_values_that_are_no_feature_map_of_the_image_are_no_candidates():
    gm, _ = _prepared(Zoo(), (64, 64))
    found = find_candidates(gm, (64, 64), num_classes=2)
    # not mul (no FLOPs yet), interpolate (128x128 > the input), permute/contiguous (NHWC), gt/long
    # (not floating point), pool (1/64 of the input), head_0/head_1 (the classifier block starts
    # after half of the FLOPs), head_2 (the classifier)
    assert [(c.name, c.stride) for c in found] == [("stem", 1.0), ("down", 2.0), ("mul_1", 2.0)]
    assert found[1].live_tensors == 4  # interpolate, contiguous and long are kept for the end, with down


def test_a_heavy_classifier_block_is_open_to_exits_but_not_its_last_layer():
    gm, _ = _prepared(Zoo(heavy_head=True), (64, 64))
    names = [c.name for c in find_candidates(gm, (64, 64), num_classes=2)]
    assert names == ["stem", "down", "mul_1", "head_0", "head_1"]


def test_min_stride_bounds_how_coarse_a_candidate_may_be():
    gm, _ = _prepared(Zoo(), (64, 64))
    assert [c.name for c in find_candidates(gm, (64, 64), 2, PlacementConfig(min_stride=1))] == ["stem"]
    assert [c.name for c in find_candidates(gm, (64, 64), 2, PlacementConfig(min_stride=64))] == ["stem", "down", "pool", "mul_1"]


def test_cuts_where_a_folded_batch_is_alive_cannot_carry_an_exit():
    gm, _ = _prepared(FoldedBatch(), (16, 16))
    found = {c.name: c for c in find_candidates(gm, (16, 16), num_classes=2)}
    folded = ["reshape", "sigmoid", "b", "c"]  # the folded value itself, and the cuts it crosses
    assert [n for n, c in found.items() if c.shrink_issue] == folded
    assert found["reshape"].shrink_issue.startswith("value 'reshape' (a tensor of shape [4, 2, 16, 16] at batch 2")
    assert "value 'sigmoid'" in found["c"].shrink_issue and "cannot follow a shrinking batch" in found["c"].shrink_issue
    assert not found["a"].shrink_issue and not found["reshape_1"].shrink_issue and not found["mul_1"].shrink_issue
    chosen = select_exit_points(list(found.values()), num_exits=3)
    assert [c.name for c in chosen] == ["a", "reshape_1", "mul_1"]  # the only cuts where the batch can shrink
    with pytest.raises(PlacementError, match="exit point 'sigmoid' cannot be used: value 'sigmoid'"):
        select_exit_points(list(found.values()), at=["sigmoid"])
    with pytest.raises(PlacementError, match=r"only 3 candidate exit points where the batch can shrink \(4 more cannot"):
        select_exit_points(list(found.values()), num_exits=4)


def test_a_map_shared_by_all_rows_is_no_candidate():
    gm, _ = _prepared(SharedByAllRows(), (16, 16))
    names = [c.name for c in find_candidates(gm, (16, 16), num_classes=2)]
    assert names == ["a", "add", "b"]  # not interpolate and mul: the same map for every image


# --------------------------------------------------------------------- select_exit_points
def _point(i, fraction, block="block", live=1, issue=""):
    return ExitPoint(name=f"n{i}", position=i, channels=8, height=8, width=8, stride=4.0, cum_flops=int(fraction * 1200),
                     fraction=fraction, block=block, live_tensors=live, shrink_issue=issue)


def _twelfths():
    """Eleven block outputs at k/12 of the FLOPs, k = 1..11."""
    return [_point(k, k / 12) for k in range(1, 12)]


@pytest.mark.parametrize("n, expected", [(1, [6]), (2, [4, 8]), (3, [3, 6, 9]), (5, [2, 4, 6, 8, 10]), (11, list(range(1, 12)))])
def test_exits_land_at_evenly_spaced_flop_fractions(n, expected):
    chosen = select_exit_points(_twelfths(), num_exits=n)
    assert [c.position for c in chosen] == expected  # k / (n + 1) of the FLOPs


def test_a_heavy_classifier_spreads_the_exits_up_to_the_last_candidate():
    candidates = [_point(k, k / 40) for k in range(1, 17)]  # the last candidate at 40% of the FLOPs
    chosen = select_exit_points(candidates, num_exits=4)
    assert [c.fraction for c in chosen] == [0.1, 0.2, 0.3, 0.4]  # not 0.2, 0.4 and two bunched at the end


def test_block_outputs_and_few_live_tensors_are_preferred_within_their_penalties():
    def pick(*points):
        return select_exit_points(list(points), num_exits=1)[0].name

    assert pick(_point(1, 0.5, block=""), _point(2, 0.52)) == "n2"  # 0.02 off but a block output
    assert pick(_point(1, 0.5, block=""), _point(2, 0.54)) == "n1"  # 0.04 off costs more than the block penalty
    assert pick(_point(1, 0.5, live=4), _point(2, 0.52)) == "n2"  # three extra live tensors cost 0.03
    assert pick(_point(1, 0.5, live=2), _point(2, 0.52)) == "n1"
    no_penalty = PlacementConfig(block_penalty=0.0, live_penalty=0.0)
    assert select_exit_points([_point(1, 0.5, block="", live=9), _point(2, 0.52)], 1, config=no_penalty)[0].name == "n1"


def test_every_pick_leaves_room_for_the_ones_after_it():
    late = [_point(1, 0.9), _point(2, 0.95), _point(3, 0.99)]
    assert [c.name for c in select_exit_points(late, num_exits=3)] == ["n1", "n2", "n3"]


def test_candidates_where_the_batch_cannot_shrink_are_skipped():
    candidates = _twelfths()
    candidates[5] = _point(6, 6 / 12, issue="value 'x' is alive here")  # the exact target
    candidates[6] = _point(7, 7 / 12, block="")
    assert [c.position for c in select_exit_points(candidates, num_exits=1)] == [5]
    assert [c.position for c in select_exit_points(candidates, num_exits=10)] == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]


def test_exits_named_with_at_come_back_in_execution_order():
    chosen = select_exit_points(_twelfths(), num_exits=1, at=["n9", "n2", "n5"])  # num_exits is ignored
    assert [c.name for c in chosen] == ["n2", "n5", "n9"]


def test_an_unknown_name_names_the_nearest_valid_ones():
    with pytest.raises(PlacementError) as raised:
        select_exit_points(_twelfths(), at=["n3", "n99"])
    assert raised.value.message == "'n99' is not a valid exit point"
    assert raised.value.hint.startswith("nearest valid: n9")
    assert "see `mexify inspect` for all" in raised.value.hint
    with pytest.raises(PlacementError, match="'layer' is not a valid exit point") as raised:
        select_exit_points([], at=["layer"])
    assert raised.value.hint == "see `mexify inspect`"


def test_bad_requests_are_refused():
    with pytest.raises(PlacementError, match="named twice"):
        select_exit_points(_twelfths(), at=["n3", "n3"])
    with pytest.raises(PlacementError, match="--exits must be at least 1, got 0"):
        select_exit_points(_twelfths(), num_exits=0)
    with pytest.raises(PlacementError, match="asked for 12 exits but the model has only 11 candidate exit points") as raised:
        select_exit_points(_twelfths(), num_exits=12)
    assert raised.value.hint == "use --exits 11 or fewer"


def test_placement_on_a_traced_graph():
    gm, _ = _prepared(Blocks(), (16, 16))
    found = find_candidates(gm, (16, 16), num_classes=2)
    assert [c.name for c in select_exit_points(found, num_exits=1)] == ["layer2_1"]  # 0.55 of the FLOPs, a block
    assert [c.name for c in select_exit_points(found, num_exits=2)] == ["layer1_1", "layer2_1"]
    assert [c.name for c in select_exit_points(found, at=["layer3_1", "layer1_1"])] == ["layer1_1", "layer3_1"]
    with pytest.raises(PlacementError) as raised:
        select_exit_points(found, at=["layer2"])
    assert raised.value.hint.startswith("nearest valid: layer2_")


class QueryDecoder(nn.Module):
    """A toy mask classifier: per-pixel features at stride 4, then a "decoder" on queries whose per-query
    masks, upsampled past the input as Mask2Former's post-processing does, make the class map."""

    def __init__(self, queries=5, classes=3):
        super().__init__()
        self.pixel = nn.Sequential(_block(3, 8, 2), _block(8, 8, 2), _block(8, 8))
        self.decoder = nn.Conv2d(8, queries, 1)  # stands in for the transformer decoder: one map per query
        self.cls = nn.Parameter(torch.randn(queries, classes))

    def forward(self, x):
        masks = F.interpolate(self.decoder(self.pixel(x)), scale_factor=12.0, mode="bilinear").sigmoid()
        return torch.einsum("qc,bqhw->bchw", self.cls.softmax(-1), masks)


def test_candidates_stop_where_the_query_modules_start_and_the_detail_is_the_masks_stride():
    gm, _ = _prepared(QueryDecoder(), (16, 16))
    everything = [c.name for c in find_candidates(gm, (16, 16), num_classes=3)]
    per_pixel = [c.name for c in find_candidates(gm, (16, 16), num_classes=3, stop_modules=("decoder",))]
    assert "decoder" in everything and per_pixel == everything[: everything.index("decoder")]
    assert per_pixel[-1] == "pixel_2_1"
    # the 48x48 class map holds no detail finer than the stride-4 masks it is made of
    assert output_stride(gm, (16, 16), 3) == 4.0


class HeadsTwice(nn.Module):
    """``B * 2`` groups in an early block and again in a late one: torch.export computes the int once."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(cin, 4, 3, padding=1) for cin in (3, 4, 4))
        self.cls = nn.Conv2d(4, 2, 1)

    @staticmethod
    def grouped(s):
        B, C, H, W = s.shape
        return s.reshape(B * 2, C // 2, H, W).sigmoid().reshape(B, C, H, W)

    def forward(self, x):
        y = self.c(self.b(self.grouped(self.a(x))))
        return self.cls(self.grouped(y))


def test_int_arithmetic_is_recomputed_where_used_so_no_batch_times_heads_crosses_a_cut():
    from mexify import api

    traced = api.inspect(HeadsTwice().eval(), trace=api.TraceConfig((32, 32), method="export"))
    blocks = [c for c in traced.candidates if c.name.startswith("conv2d")]
    assert len(blocks) >= 2 and not any(c.shrink_issue for c in blocks)
