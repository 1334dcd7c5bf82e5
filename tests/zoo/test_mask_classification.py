"""Mask-classification segmenters (class logits and a mask per query) convert: the final exit is the library's
semantic post-processing before its argmax, and a user's own query model converts once registered."""
import pytest
import torch
from torch import nn

import mexify
from mexify import api
from mexify.graph.adapt import ONEFORMER_SEMANTIC_TASK, MaskClassification, adapt_module, semantic_scores
from mexify.spec import ModelSpec, build_model

RESNET = {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1],
          "layer_type": "basic", "out_features": ["stage1", "stage2", "stage3", "stage4"]}
MASK2FORMER = {"backbone_config": RESNET, "num_labels": 5, "num_queries": 10, "feature_size": 32, "mask_feature_size": 32,
               "hidden_dim": 32, "encoder_feedforward_dim": 64, "dim_feedforward": 64, "encoder_layers": 1, "decoder_layers": 2,
               "num_attention_heads": 2}
MASKFORMER = {"backbone_config": RESNET, "decoder_config": {"model_type": "detr", "encoder_layers": 1, "decoder_layers": 1, "d_model": 32,
              "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
              "num_queries": 10}, "num_labels": 5, "fpn_feature_size": 32, "mask_feature_size": 32}


ONEFORMER = {"backbone_config": RESNET, "num_labels": 5, "num_queries": 10, "conv_dim": 32, "mask_dim": 32, "hidden_dim": 32,
             "encoder_feedforward_dim": 64, "dim_feedforward": 64, "encoder_layers": 1, "decoder_layers": 2, "num_attention_heads": 2,
             "query_dec_layers": 1, "text_encoder_width": 32, "text_encoder_context_length": 8, "text_encoder_num_layers": 1,
             "text_encoder_n_ctx": 2}


def _library_scores(model, x, processor):
    """transformers' own semantic post-processing at the input size, before its argmax."""
    inputs = {}
    if "OneFormer" in type(model).__name__:  # the task input its processor builds for "semantic", padding zeroed
        inputs["task_inputs"] = torch.tensor([list(ONEFORMER_SEMANTIC_TASK) + [0] * 70] * x.shape[0], dtype=torch.float32)
    with torch.no_grad():
        out = model(pixel_values=x, **inputs)
    size = [tuple(x.shape[-2:])] * x.shape[0]
    return torch.stack([r.segmentation_scores for r in processor.post_process_semantic_segmentation(
        out, target_sizes=size, return_segmentation_scores=True)])


@pytest.mark.slow
@pytest.mark.parametrize("cls, args, processor", [
    ("Mask2FormerForUniversalSegmentation", MASK2FORMER, "Mask2FormerImageProcessor"),
    ("MaskFormerForInstanceSegmentation", MASKFORMER, "MaskFormerImageProcessor"),
    ("OneFormerForUniversalSegmentation", ONEFORMER, "OneFormerImageProcessor"),
])
def test_hf_mask_classifier_converts_and_its_final_exit_is_the_library_post_processing(cls, args, processor, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("scipy")  # the models' constructors build their training matcher
    torch.manual_seed(0)
    res = api.convert(f"transformers:{cls}", args=args, trace=api.TraceConfig((128, 128), method="export"), exits=4,
                      out=str(tmp_path / "m.mex"))
    assert len(res.model.exit_names) == 5  # convert's shrink self-check passed
    model = mexify.load(tmp_path / "m.mex")
    # the original, rebuilt from the bundle's spec with the bundle's weights: a wrapped transformers model
    orig = build_model(ModelSpec.from_dict(model.config.spec))
    assert isinstance(orig, MaskClassification)
    weights = {k.split(".", 1)[1]: v for k, v in model.stages.state_dict().items() if "lifted_tensor" not in k}  # export's constants
    missing, unexpected = orig.load_state_dict(weights, strict=False)
    assert not unexpected and all("criterion" in k for k in missing)
    orig.eval()
    x = torch.randn(2, 3, 128, 128)
    ref = _library_scores(orig.model, x, getattr(transformers, processor)())
    with torch.no_grad():
        got = model(x)
    assert got.shape == ref.shape == (2, 5, 128, 128)
    assert (got.exp() - ref).abs().max() <= 1e-4  # the final exit is the log of the library's scores
    assert torch.equal(got.argmax(1), ref.argmax(1))
    with torch.no_grad():
        exits = model.forward_all(x)
    assert all(e.shape == (2, 5, 128, 128) for e in exits)


class QueryNet(nn.Module):
    """A user's own query-based segmenter: its outputs carry other names than transformers'."""

    def __init__(self, classes=3, queries=6):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.masks = nn.Conv2d(16, queries, 1)
        self.classes = nn.Linear(16, queries * (classes + 1))
        self.q, self.k = queries, classes

    def forward(self, pixel_values):
        f = self.body(pixel_values)
        logits = self.classes(f.mean((2, 3))).view(-1, self.q, self.k + 1)
        return {"cls": logits, "seg": self.masks(f)}


def test_a_users_query_model_converts_once_registered(tmp_path):
    mexify.register_mask_classifier(QueryNet, outputs=lambda out: (out["cls"], out["seg"]), queries=("decoder",))
    with pytest.raises(ValueError, match="QueryNet has no module 'decoder'"):
        adapt_module(QueryNet())
    mexify.register_mask_classifier(QueryNet, outputs=lambda out: (out["cls"], out["seg"]), queries=("masks",))
    net = QueryNet().eval()
    wrapped = adapt_module(net)
    assert isinstance(wrapped, MaskClassification) and adapt_module(wrapped) is wrapped
    res = api.convert(net, trace=api.TraceConfig((64, 64)), exits=2)
    assert "masks" not in res.model.exit_names  # exits stop before the query modules
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = net(x)
        ref = torch.nn.functional.interpolate(semantic_scores(out["cls"], out["seg"]), size=(64, 64), mode="bilinear",
                                              align_corners=False)
        assert torch.allclose(res.model(x).exp(), ref, atol=1e-6)
    # scores are probabilities summed over queries: in [0, queries]
    assert float(ref.min()) >= 0 and float(ref.max()) <= net.q


@pytest.mark.slow
def test_a_mask2former_trains_calibrates_evaluates_and_exports_from_the_cli(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("scipy")
    pytest.importorskip("onnxruntime")
    import json

    from typer.testing import CliRunner

    from mexify.cli import app
    from mexify.deploy import Runner
    from mexify.runtime import EarlyExitRuntime

    runner = CliRunner()
    data = "synthetic:scenes?size=64&classes=5&n=24&n_eval=24"
    bundle, onnx = str(tmp_path / "m2f.mex"), str(tmp_path / "m2f.onnx")

    def cli(*argv):
        res = runner.invoke(app, [*argv])
        assert res.exit_code == 0, res.output[-2000:]
        return res.output

    torch.manual_seed(0)
    cli("convert", "transformers:Mask2FormerForUniversalSegmentation", *[x for k, v in MASK2FORMER.items()
        for x in ("--arg", f"{k}={json.dumps(v)}")], "--input-size", "64", "--exits", "3", "-o", bundle)
    model = mexify.load(bundle)
    assert model.train_issue == ""  # both stages train: the pixel decoder's value check is traced in eval mode
    assert all(e["stride"] <= 32 for e in model.config.to_dict()["exits"])
    report = json.loads(cli("train", bundle, "--data", data, "--set", "stage1_iters=3", "--set", "stage2_iters=3",
                            "--set", "batch_size=4", "--set", "crop_size=64", "--set", "precise_bn_iters=0", "--device", "cpu", "--json"))
    assert [s["stage"] for s in report["stages"]] == [1, 2] and all(s["iterations"] == 3 for s in report["stages"])
    cli("calibrate", bundle, "--data", data, "--split", "calib", "--policy", "maxprob", "--budget", "2x", "--cost", "flops",
        "--confidence", "0", "--device", "cpu")
    evaluation = json.loads(cli("eval", bundle, "--data", data, "--split", "test", "--device", "cpu", "--json"))
    assert len(evaluation["exits"]) == 4 and evaluation["policies"]
    cli("export", bundle, "-o", onnx, "--format", "onnx")
    cli("export", bundle, "-o", str(tmp_path / "m2f.pt2.mex"), "--format", "pt2")
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ref = EarlyExitRuntime(mexify.load(bundle)).predict_batch(x)
    got = Runner(onnx).predict(x.numpy())
    assert (got.exit_index == ref.exit_index.numpy()).all()
    assert (got.masks == ref.masks.numpy()).mean() >= 0.999
    programs = EarlyExitRuntime(mexify.load(tmp_path / "m2f.pt2.mex")).predict_batch(x)  # loads without transformers' code
    assert torch.equal(programs.exit_index, ref.exit_index) and torch.equal(programs.masks, ref.masks)
