"""Stage 2 on a small torchvision model (LR-ASPP MobileNetV3, random init, synthetic scenes,
CPU): every early exit gets better and the final exit does not change by a single bit."""
import pytest
import torch

import mexify
from mexify.data import build_dataset
from mexify.metrics import ConfusionMatrix
from mexify.api import train

pytest.importorskip("torchvision")

K = 4
DATA = f"synthetic:scenes?classes={K}&size=64&n=96&n_eval=24&dmax=0.4"


def _evaluate(path):
    model = mexify.load(path).eval()
    ds = build_dataset(DATA, split="val")
    cms = [ConfusionMatrix(K) for _ in model.exit_names]
    finals = []
    with torch.no_grad():
        for i in range(0, len(ds), 8):
            xs, ys = zip(*[ds[j] for j in range(i, min(i + 8, len(ds)))])
            outs = model.forward_all(torch.stack(xs))
            for cm, o in zip(cms, outs):
                cm.update(o.argmax(1), torch.stack(ys))
            finals.append(outs[-1])
    return [cm.miou() for cm in cms], torch.cat(finals), model


@pytest.mark.slow
def test_stage2_improves_every_early_exit_and_keeps_final(tmp_path):
    src = tmp_path / "lraspp.mex"
    mexify.convert("torchvision.models.segmentation:lraspp_mobilenet_v3_large",
                   args={"num_classes": K, "weights": None, "weights_backbone": None},
                   exits=3, trace=mexify.TraceConfig((64, 64)), out=str(src))
    common = dict(lr=0.05, batch_size=8, crop_size=64, checkpoint_every=1000, log_every=10)
    s1 = tmp_path / "s1.mex"
    train(src, DATA, overrides=dict(common, stage1_iters=60, stage2_iters=0), out=s1, device="cpu")
    before, final_before, m1 = _evaluate(s1)

    s2 = tmp_path / "s2.mex"
    rep = train(s1, DATA, overrides=dict(common, stage1_iters=0, stage2_iters=80), out=s2, device="cpu")
    after, final_after, m2 = _evaluate(s2)

    assert torch.equal(final_before, final_after)
    sd1, sd2 = m1.stages.state_dict(), m2.stages.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)  # BatchNorm statistics included
    for name, b, a in zip(m1.exit_names[:-1], before, after):
        assert a > b, f"exit {name}: mIoU {b:.3f} before stage 2, {a:.3f} after"
    assert rep.stages[0].stage == 2 and "kd/" + m1.exit_names[0] in rep.stages[0].final_losses
