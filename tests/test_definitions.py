"""One definition each (docs/internals.md, "Definitions"): exit FLOPs, and what costs exits agrees with it."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent / "policies"))
from toy_models import NoisyExits, make_scenes  # noqa: E402

from mexify.calibrate import collect_cache  # noqa: E402
from mexify.nn import exit_flops  # noqa: E402


def test_exit_flops_counts_stages_and_the_heads_that_run():
    stages, heads = [10, 20, 30, 40], [1, 2, 3]
    assert exit_flops(stages, heads) == [11, 33, 66, 106]  # every head on the way
    assert exit_flops(stages, heads, active=[0, 2]) == [11, 31, 64, 104]  # head 1 switched off costs nothing
    assert exit_flops(stages, heads, active=[]) == [10, 30, 60, 100]  # every exit off: the stages alone
    assert all(isinstance(v, int) for v in exit_flops(stages, heads))
    assert exit_flops([1.5, 2.5], [0.5]) == [2.0, 4.5]


def test_the_cache_costs_exits_by_exit_flops():
    model = NoisyExits(num_classes=4, num_exits=4)
    model.head_flops = [5, 7, 11]
    cache = collect_cache(model, torch.utils.data.DataLoader(make_scenes(4), batch_size=4))
    assert cache.exit_costs(None, "flops").tolist() == exit_flops(model.stage_flops, model.head_flops)
    assert cache.exit_costs([0.5, np.inf, 0.5], "flops").tolist() == exit_flops(model.stage_flops, model.head_flops, [0, 2])
