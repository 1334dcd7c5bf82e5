"""Fixtures for training tests: small converted bundles and tiny recipe overrides."""
import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TINY_SPEC = str(HERE / "tiny_seg.py") + ":tiny"
TINY_DATA = "synthetic:scenes?classes=4&size=48&n=48&n_eval=16"


@pytest.fixture(scope="session")
def tiny_bundle_src(tmp_path_factory):
    """TinySegNet (4 classes) converted with 3 early exits at 48x48."""
    import mexify

    out = tmp_path_factory.mktemp("tiny") / "tiny.mex"
    mexify.convert(TINY_SPEC, args={"num_classes": 4, "width": 8}, exits=3, trace=mexify.TraceConfig((48, 48)), out=str(out))
    return out


@pytest.fixture
def tiny_bundle(tiny_bundle_src, tmp_path):
    """A private copy of the tiny bundle (training rewrites bundles)."""
    dst = tmp_path / "tiny.mex"
    shutil.copytree(tiny_bundle_src, dst)
    return dst


def _quick(**kw):
    base = {"stage1_iters": 6, "stage2_iters": 4, "batch_size": 4, "crop_size": 48, "checkpoint_every": 3,
            "log_every": 1, "num_workers": 0}
    base.update(kw)
    return base


@pytest.fixture
def quick():
    """Recipe overrides for a few-second tiny run: ``quick(stage1_iters=2)``."""
    return _quick


@pytest.fixture
def tiny_data():
    return TINY_DATA


@pytest.fixture
def tiny_spec():
    return TINY_SPEC
