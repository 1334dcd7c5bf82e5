"""mexify.nn.heads.build_head: what each head template and setting builds, and the settings refused."""
import pytest
import torch
from torch import nn

from mexify.config import HeadConfig
from mexify.errors import ConfigError
from mexify.nn.heads import HEAD_SPACES, build_head, parse_head_overrides


def _convs(head):
    return [m for m in head.body.modules() if isinstance(m, nn.Conv2d)]


def _run(head, channels=8, size=(6, 10), n=2):
    with torch.no_grad():
        return head.eval()(torch.randn(n, channels, *size))


@pytest.mark.parametrize("blocks", [0, 1, 2, 4])
def test_mess_reduces_to_width_then_runs_its_blocks(blocks):
    head = build_head(HeadConfig(template="mess", width=16, blocks=blocks), in_channels=8, num_classes=5)
    convs = _convs(head)
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(8, 16, (1, 1))] + [(16, 16, (3, 3))] * blocks
    assert (head.classifier.in_channels, head.classifier.out_channels, head.classifier.kernel_size) == (16, 5, (1, 1))
    assert _run(head).shape == (2, 5, 6, 10)  # logits at the features' own resolution


def test_mess_dilation_keeps_the_resolution():
    head = build_head(HeadConfig(template="mess", width=4, blocks=2, dilation=3), in_channels=8, num_classes=3)
    assert [(c.dilation, c.padding) for c in _convs(head)[1:]] == [((3, 3), (3, 3))] * 2
    assert _run(head, size=(7, 5)).shape == (2, 3, 7, 5)


def test_mess_with_aspp_adds_a_branch_per_rate_and_projects_back():
    head = build_head(HeadConfig(template="mess", width=6, blocks=1, aspp_rates=(2, 4)), in_channels=8, num_classes=3)
    aspp = head.body[-1]  # the body ends with it (dropout follows, before the classifier)
    branches = [b[0] for b in aspp.branches]
    assert [(b.kernel_size, b.dilation, b.out_channels) for b in branches] == [((1, 1), (1, 1), 6), ((3, 3), (2, 2), 6), ((3, 3), (4, 4), 6)]
    assert (aspp.project[0].in_channels, aspp.project[0].out_channels) == (18, 6)
    assert _run(head).shape == (2, 3, 6, 10)


def test_fcn_is_one_3x3_layer_of_a_quarter_of_the_input_channels_by_default():
    head = build_head(HeadConfig(template="fcn", width=0), in_channels=32, num_classes=4)
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in _convs(head)] == [(32, 8, (3, 3))]
    assert head.classifier.in_channels == 8
    assert _run(head, channels=32).shape == (2, 4, 6, 10)
    assert _convs(build_head(HeadConfig(template="fcn", width=0), in_channels=3, num_classes=4))[0].out_channels == 1
    assert _convs(build_head(HeadConfig(template="fcn", width=12), in_channels=32, num_classes=4))[0].out_channels == 12


@pytest.mark.parametrize("dropout, layers", [(0.0, 0), (0.25, 1)])
def test_dropout_is_a_layer_only_when_asked_for(dropout, layers):
    for template in ("mess", "fcn"):
        head = build_head(HeadConfig(template=template, width=4, dropout=dropout), in_channels=8, num_classes=2)
        drops = [m for m in head.modules() if isinstance(m, nn.Dropout)]
        assert len(drops) == layers and all(d.p == dropout for d in drops)


def test_a_size_resizes_the_logits_and_the_head_keeps_its_config():
    cfg = HeadConfig(template="mess", width=4, blocks=0)
    head = build_head(cfg, in_channels=8, num_classes=3).eval()
    with torch.no_grad():
        x = torch.randn(1, 8, 4, 4)
        assert head(x, (16, 12)).shape == (1, 3, 16, 12)
        assert torch.equal(head(x, (4, 4)), head(x))  # already at that size: untouched
    assert head.config is cfg


def test_every_head_of_the_spaces_builds_once_its_width_is_set():
    for space in HEAD_SPACES.values():
        for cfg in space:
            head = build_head(HeadConfig(**{**cfg.to_dict(), "width": 8}), in_channels=16, num_classes=3)
            assert _run(head, channels=16).shape == (2, 3, 6, 10)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"blocks": 5}, "head blocks=5 is out of range"),
        ({"blocks": -1}, "head blocks=-1 is out of range"),
        ({"width": -8}, "head width=-8 is invalid"),
        ({"dilation": 0}, "head dilation and ASPP rates must be >= 1"),
        ({"aspp_rates": (6, 0)}, "head dilation and ASPP rates must be >= 1"),
        ({"dropout": 1.0}, r"head dropout=1.0 is out of range"),
        ({"template": "unet"}, "unknown head template 'unet'"),
    ],
)
def test_bad_settings_are_refused_before_a_head_is_built(settings, message):
    with pytest.raises(ConfigError, match=message):
        build_head(HeadConfig(**settings), in_channels=8, num_classes=3)


def test_overrides_name_the_nearest_setting_and_template():
    with pytest.raises(ConfigError, match="unknown head setting 'blokcs'") as raised:
        parse_head_overrides("mess", {"blokcs": 2})
    assert "'blocks'" in raised.value.hint
    with pytest.raises(ConfigError, match="unknown head template 'mesh'"):
        parse_head_overrides("mesh", {})
    cfg = parse_head_overrides("mess", {"blocks": 2, "dilation": 2, "aspp_rates": [6, 12], "width": 8})
    assert (cfg.template, cfg.blocks, cfg.dilation, cfg.aspp_rates, cfg.width) == ("mess", 2, 2, (6, 12), 8)
    assert len(_convs(build_head(cfg, in_channels=8, num_classes=3))) == 1 + 2 + 3 + 1  # reduce, blocks, ASPP branches, project


def test_a_mess_head_with_an_unresolved_width_is_refused():
    with pytest.raises(ConfigError):
        build_head(HeadConfig(template="mess", width=0), in_channels=8, num_classes=3)


def test_fcn_refuses_mess_settings_instead_of_ignoring_them():
    from mexify.errors import ConfigError
    from mexify.nn import parse_head_overrides

    for settings in ("blocks=2", "dilation=2", "aspp_rates=6:12"):
        with pytest.raises(ConfigError, match="fcn head is one 3x3 block"):
            parse_head_overrides("fcn", settings)
    assert parse_head_overrides("fcn", "width=16,fuse=true").fuse


class InPlaceAfterTheExit(nn.Module):
    """The layer after the exit point rewrites the exit's feature in place (``ReLU(inplace=True)``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.cls = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.cls(self.b(self.act(self.a(x))))


def test_a_head_trains_on_a_feature_the_next_stage_changes_in_place_even_with_a_frozen_backbone():
    from mexify import api

    model = api.convert(InPlaceAfterTheExit().eval(), trace=api.TraceConfig((32, 32)), at=["a"]).model
    model.train()
    for p in model.stages.parameters():
        p.requires_grad_(False)  # stage 2: the backbone is frozen, the head still needs its input for its weights' gradients
    x = torch.randn(2, 3, 32, 32)
    early, _ = model.forward_all(x)
    early.square().mean().backward()
    head = model.heads[model.exit_names[0]]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters() if p.requires_grad)
