"""Batch shrinking never mixes or crashes rows: batch-dependent ints, sizes, token layouts, and cuts that cannot shrink."""
import sys
from pathlib import Path

import pytest
import torch

import mexify
from mexify.errors import PlacementError
from mexify.graph.batching import BatchDim, classify
from mexify.prepare import check_shrinking

FIXTURES = Path(__file__).parent / "fixture_models.py"
sys.path.insert(0, str(FIXTURES.parent))
from fixture_models import rows_agree_with_single_images  # noqa: E402


@pytest.mark.parametrize("name", ["BatchSizeNet", "TokenNet", "SequenceFirstNet"])
def test_batch_dependent_values_follow_a_shrinking_batch(name, tmp_path):
    torch.manual_seed(0)
    result = mexify.convert(f"{FIXTURES}:{name}", trace=mexify.TraceConfig((32, 32)), exits=3, out=str(tmp_path / "b"))
    live = {k: v for e in result.config.exits for k, v in (e.batch_dims or {}).items()}
    assert "int" in live.values() or "dim:1" in live.values() or any(v.startswith("size") for v in live.values())
    rows_agree_with_single_images(result.model, 32, n=5)
    rows_agree_with_single_images(mexify.load(tmp_path / "b"), 32, n=5)  # read back from the bundle


def test_sequence_first_tokens_are_sliced_along_the_batch_dimension():
    result = mexify.convert(f"{FIXTURES}:SequenceFirstNet", trace=mexify.TraceConfig((32, 32)), exits=3)
    dims = {k: v for e in result.config.exits for k, v in (e.batch_dims or {}).items()}
    assert dims["permute"] == "dim:1" or dims.get("proj") == "dim:1"


def test_cuts_where_the_batch_cannot_shrink_are_avoided_and_explained():
    inspected = mexify.inspect(f"{FIXTURES}:MixedBatchNet", trace=mexify.TraceConfig((32, 32)))
    unsafe = [c for c in inspected.candidates if c.shrink_issue]
    assert unsafe and all("reshape" in c.shrink_issue and "cannot follow a shrinking batch" in c.shrink_issue for c in unsafe)
    result = mexify.convert(f"{FIXTURES}:MixedBatchNet", trace=mexify.TraceConfig((32, 32)), exits=3)
    assert not {e.name for e in result.exits} & {c.name for c in unsafe}
    rows_agree_with_single_images(result.model, 32, n=5)
    with pytest.raises(PlacementError, match="cannot follow a shrinking batch"):
        mexify.convert(f"{FIXTURES}:MixedBatchNet", trace=mexify.TraceConfig((32, 32)), at=[unsafe[0].name])


def test_self_check_refuses_a_cut_that_would_mix_rows():
    result = mexify.convert(f"{FIXTURES}:TokenNet", trace=mexify.TraceConfig((32, 32)), exits=3)
    model = result.model
    # forget what the analysis found: the tokens are then sliced but the unpacked batch size is not
    model._batch_dims = [None] * model.num_exits
    with pytest.raises(PlacementError, match="batch cannot shrink after exit") as exc:
        check_shrinking(model, (32, 32))
    assert "values alive there" in exc.value.hint


def test_classify_by_two_batch_sizes():
    t = lambda *s: ("tensor", s)  # noqa: E731
    assert str(classify(t(2, 8, 4), t(5, 8, 4))) == "dim:0"
    assert str(classify(t(16, 2, 8), t(16, 5, 8))) == "dim:1"
    assert str(classify(t(2, 8), t(2, 8))) == "none"  # e.g. a (C, K) constant that happens to start with 2
    assert not classify(t(4, 8), t(10, 8)).safe  # batch folded into a dimension
    assert str(classify(("int", 2), ("int", 5))) == "int"
    assert not classify(("int", 4), ("int", 10)).safe
    assert str(classify(("ints", (2, 3, 8, 8)), ("ints", (5, 3, 8, 8)))) == "size:0"
    assert BatchDim.parse("size:2") == BatchDim("size", 2)
