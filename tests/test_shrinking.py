"""Batch shrinking never mixes or crashes rows: batch-dependent ints, sizes, token layouts, and cuts that cannot shrink."""
from pathlib import Path

import pytest
import torch

import mexify
from mexify.errors import PlacementError
from mexify.graph.batching import BatchDim, classify
from mexify.prepare import check_shrinking
from mexify.runtime import EarlyExitRuntime

FIXTURES = Path(__file__).parent / "fixture_models.py"


class _DropOddRows:
    """A policy stand-in: at every early exit, the odd rows still in the batch leave."""

    name = "drop-odd-rows"
    needs_features = False

    def decide(self, exit_index, logits, features=None):
        go = torch.zeros(logits.shape[0], dtype=torch.bool)
        go[1::2] = True
        return go, torch.ones(logits.shape[0])


def _rows_agree_with_single_images(model, size, n=5):
    """Masks from the shrinking runtime equal each image's masks run alone at the exit it took."""
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))
    batch = EarlyExitRuntime(model, _DropOddRows()).predict_batch(x)
    assert batch.exit_index.tolist()[:2] == [model.num_exits - 1, 0]  # rows really left at different exits
    with torch.no_grad():
        for i in range(n):
            alone = model.forward_all(x[i:i + 1])[int(batch.exit_index[i])].max(1).indices[0]
            assert torch.equal(batch.masks[i], alone), f"row {i}"


@pytest.mark.parametrize("name", ["BatchSizeNet", "TokenNet", "SequenceFirstNet"])
def test_batch_dependent_values_follow_a_shrinking_batch(name, tmp_path):
    torch.manual_seed(0)
    result = mexify.convert(f"{FIXTURES}:{name}", input_size=(32, 32), exits=3, out=str(tmp_path / "b"))
    live = {k: v for e in result.config.exits for k, v in (e.batch_dims or {}).items()}
    assert "int" in live.values() or "dim:1" in live.values() or any(v.startswith("size") for v in live.values())
    _rows_agree_with_single_images(result.model.eval(), 32)
    _rows_agree_with_single_images(mexify.load(tmp_path / "b"), 32)  # read back from the bundle


def test_sequence_first_tokens_are_sliced_along_the_batch_dimension():
    result = mexify.convert(f"{FIXTURES}:SequenceFirstNet", input_size=(32, 32), exits=3)
    dims = {k: v for e in result.config.exits for k, v in (e.batch_dims or {}).items()}
    assert dims["permute"] == "dim:1" or dims.get("proj") == "dim:1"


def test_cuts_where_the_batch_cannot_shrink_are_avoided_and_explained():
    inspected = mexify.inspect(f"{FIXTURES}:MixedBatchNet", input_size=(32, 32))
    unsafe = [c for c in inspected.candidates if c.shrink_issue]
    assert unsafe and all("reshape" in c.shrink_issue and "cannot follow a shrinking batch" in c.shrink_issue for c in unsafe)
    result = mexify.convert(f"{FIXTURES}:MixedBatchNet", input_size=(32, 32), exits=3)
    assert not {e.name for e in result.exits} & {c.name for c in unsafe}
    _rows_agree_with_single_images(result.model.eval(), 32)
    with pytest.raises(PlacementError, match="cannot follow a shrinking batch"):
        mexify.convert(f"{FIXTURES}:MixedBatchNet", input_size=(32, 32), at=[unsafe[0].name])


def test_self_check_refuses_a_cut_that_would_mix_rows():
    result = mexify.convert(f"{FIXTURES}:TokenNet", input_size=(32, 32), exits=3)
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
