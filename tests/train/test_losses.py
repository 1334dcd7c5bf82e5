"""Losses on hand-made tensors: PFD ignores pixels the teacher gets wrong; CE ignores 255."""
import math

import pytest
import torch

from mexify.train.losses import cross_entropy, distillation_loss, early_exit_loss, kd_map, multi_exit_ce
from mexify.train.schedule import PolyLR, poly_factor


def _onehot_logits(labels, k=3, scale=5.0):
    return torch.nn.functional.one_hot(labels, k).permute(0, 3, 1, 2).float() * scale


def test_pfd_is_zero_where_teacher_is_wrong():
    target = torch.tensor([[[0, 1], [2, 255]]])
    teacher = _onehot_logits(torch.tensor([[[0, 2], [2, 1]]]))  # right, wrong, right, unlabelled
    student = torch.randn(1, 3, 2, 2, requires_grad=True)
    per_pixel = distillation_loss(student, teacher, target, mode="pfd", reduction="none")
    assert per_pixel[0, 0, 1] == 0 and per_pixel[0, 1, 1] == 0
    assert per_pixel[0, 0, 0] > 0 and per_pixel[0, 1, 0] > 0
    full = kd_map(student, teacher)
    assert torch.equal(per_pixel[0, 0, 0], full[0, 0, 0])
    # Gradients reach the student only through the positive pixels.
    distillation_loss(student, teacher, target, mode="pfd").backward()
    g = student.grad.abs().sum(1)[0]
    assert g[0, 1] == 0 and g[1, 1] == 0 and g[0, 0] > 0 and g[1, 0] > 0


def test_pfd_mean_uses_labelled_pixels_and_kd_uses_all():
    target = torch.tensor([[[0, 1], [2, 255]]])
    teacher = _onehot_logits(torch.tensor([[[0, 2], [2, 1]]]))
    student = torch.randn(1, 3, 2, 2)
    m = kd_map(student, teacher)
    pfd = distillation_loss(student, teacher, target, "pfd")
    assert torch.allclose(pfd, (m[0, 0, 0] + m[0, 1, 0]) / 3)
    assert torch.allclose(distillation_loss(student, teacher, target, "kd"), m.mean())
    assert distillation_loss(student, teacher, target, "none") == 0


def test_kd_zero_when_student_equals_teacher_and_temperature_scaling():
    t = torch.randn(2, 4, 3, 3)
    assert kd_map(t.clone(), t).abs().max() < 1e-6
    s = torch.randn(2, 4, 3, 3)
    assert (kd_map(s, t, 2.0) >= -1e-6).all()


def test_ce_ignores_255_and_never_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2), 255)
    loss = cross_entropy(logits, target)
    assert loss.item() == 0 and not math.isnan(loss.item())
    target = torch.tensor([[[0, 255], [1, 255]]])
    ref = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(cross_entropy(logits, target), ref)


def test_multi_exit_ce_weights():
    y = torch.randint(0, 3, (2, 4, 4))
    outs = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    total, per = multi_exit_ce(outs, y, [0.5, 1.0, 2.0])
    assert torch.allclose(total, 0.5 * per[0] + per[1] + 2 * per[2])
    from mexify.errors import ConfigError

    with pytest.raises(ConfigError, match="exit_weights"):
        multi_exit_ce(outs, y, [1.0])


def test_early_exit_loss_combines_ce_and_weighted_kd():
    y = torch.randint(0, 3, (1, 4, 4))
    s, t = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    total, ce, kd = early_exit_loss(s, t, y, "kd", 0.5, 2.0)
    assert torch.allclose(total, ce + 0.5 * kd)


def test_poly_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.02)
    sched = PolyLR(opt, 10, 0.9)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.02)
    assert lrs[5] == pytest.approx(0.02 * 0.5**0.9)
    assert opt.param_groups[0]["lr"] == 0.0
    assert poly_factor(20, 10) == 0.0


@pytest.mark.parametrize("mode", ["pfd", "kd", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_fused_stage2_loss_matches_per_exit_reference(mode, temperature):
    from mexify.train.losses import early_exits_loss

    torch.manual_seed(1)
    y = torch.randint(0, 5, (2, 6, 7))
    y[0, :2] = 255
    teacher = torch.randn(2, 5, 6, 7) * 3
    students = [torch.randn(2, 5, 6, 7, requires_grad=True) for _ in range(3)]
    total, ces, kds = early_exits_loss(students, teacher, y, mode, 0.5, temperature)
    ref = [early_exit_loss(s, teacher, y, mode, 0.5, temperature) for s in students]
    assert torch.allclose(total, sum(r[0] for r in ref), atol=1e-5)
    for c, k, r in zip(ces, kds, ref):
        assert torch.allclose(c, r[1], atol=1e-5) and torch.allclose(k, r[2], atol=1e-5)
    g = torch.autograd.grad(total, students)
    g_ref = torch.autograd.grad(sum(r[0] for r in ref), students)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, g_ref))
