"""The conversion sweep over third-party segmenters (slow): 6 exits, the final exit equal to the original,
a batch that shrinks correctly at every cut, and a train mode that trains. A family is skipped only when
its package is missing."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mexify
from mexify.graph.adapt import adapt_output
from mexify.spec import build_model, parse_spec

ZOO = Path(__file__).with_name("zoo_models.py")
sys.path.insert(0, str(ZOO.parents[1]))
from fixture_models import rows_agree_with_single_images  # noqa: E402
MODELS = [
    ("smp_unet_resnet18", "segmentation_models_pytorch", 64),
    ("smp_fpn_efficientnet_b0", "segmentation_models_pytorch", 64),
    ("smp_deeplabv3plus_mobilenet_v2", "segmentation_models_pytorch", 64),
    ("smp_segformer_mit_b0", "segmentation_models_pytorch", 64),
    ("smp_unet_hrnet_w18_small", "segmentation_models_pytorch", 64),
    ("smp_pan_convnext_atto", "segmentation_models_pytorch", 128),
    ("smp_dpt_vit_tiny", "segmentation_models_pytorch", 64),
    ("hf_segformer", "transformers", 64),
    ("hf_upernet_convnext", "transformers", 64),
    ("hf_upernet_swin", "transformers", 64),
    ("hf_dpt", "transformers", 64),
    ("hf_beit", "transformers", 64),
    ("hf_mobilevit", "transformers", 64),
    ("hf_mask2former_resnet", "transformers", 64),
    ("hf_mask2former_swin", "transformers", 64),
    ("hf_maskformer_resnet", "transformers", 64),
    ("hf_oneformer_resnet", "transformers", 64),
]


@pytest.mark.slow
@pytest.mark.parametrize("factory,package,size", MODELS, ids=[m[0] for m in MODELS])
def test_zoo_model_converts_exactly_and_shrinks(factory, package, size, monkeypatch):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    monkeypatch.setenv("MEXIFY_TRACE_TIMEOUT", "20")  # a dynamic-shape export that hangs is given up quickly
    torch.manual_seed(0)
    original = build_model(parse_spec(f"{ZOO}:{factory}")).eval()
    result = mexify.convert(original, trace=mexify.TraceConfig((size, size)), exits=6)  # runs the shrink self-check
    model = result.model.eval()
    assert len(result.exits) == 6 and model.num_exits == 7
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = adapt_output(original(x))
        if want.shape[-2:] != x.shape[-2:]:
            want = F.interpolate(want, size=x.shape[-2:], mode="bilinear", align_corners=False)
        got = model(x)
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(want.abs().max())))
    rows_agree_with_single_images(model, size, n=3, agree=0.999)
    # stage 1 runs the model's own train mode: gradients reach the backbone and every head
    assert model.train_issue == "", model.train_issue
    model.train()
    sum(o.float().mean() for o in model.forward_all(x)).backward()
    stage_grads = [p.grad for p in model.stages.parameters() if p.requires_grad]
    assert stage_grads and any(g is not None and g.abs().sum() > 0 for g in stage_grads)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.heads.parameters())
