"""The parsers of values users type, by property: valid text parses to the right value (and round-trips),
any text either parses or raises the library's own error (a MexifyError), never another exception."""
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mexify import api
from mexify.config import MAX_IMAGE_SIDE
from mexify.errors import MexifyError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEXT = st.text(max_size=40)
SIDE = st.integers(min_value=32, max_value=MAX_IMAGE_SIDE)
NAME = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)


def _parses_or_refuses(parse, text):
    try:
        parse(text)
    except MexifyError:
        pass


# --------------------------------------------------------------------------- sizes
@FAST
@given(SIDE, SIDE, st.sampled_from(["x", "X", " x ", "\u00d7"]))
def test_input_sizes_round_trip(h, w, sep):
    assert api.parse_input_size(f"{h}{sep}{w}") == (h, w) and api.parse_size(f"{h}x{w}") == (h, w)
    assert api.parse_input_size(f"{h}") == (h, h)
    assert api.parse_input_size([h, w]) == (h, w)


@FAST
@given(st.integers(min_value=16385, max_value=10**9), SIDE)
def test_sizes_above_the_bound_are_refused(big, side):
    for text in (f"{big}x{side}", f"{side}x{big}", str(big)):
        with pytest.raises(api.ConfigError, match="too large"):
            api.parse_input_size(text)


@FAST
@given(TEXT)
def test_any_text_is_a_size_or_a_config_error(text):
    _parses_or_refuses(api.parse_input_size, text)
    _parses_or_refuses(api.parse_image_size, text)
    _parses_or_refuses(lambda t: api.parse_size(t, "size", single="int"), text)


# --------------------------------------------------------------------------- counts
@FAST
@given(st.integers(min_value=-10**6, max_value=10**6), st.integers(min_value=0, max_value=3))
def test_counts_parse_or_name_the_bound(n, lo):
    if n >= lo:
        assert api.parse_count(str(n), "--batch-size", lo=lo) == n
    else:
        with pytest.raises(api.ConfigError, match=f"at least {lo}"):
            api.parse_count(str(n), "--batch-size", lo=lo)


@FAST
@given(st.lists(st.integers(min_value=1, max_value=512), min_size=1, max_size=5))
def test_batch_size_lists_round_trip(sizes):
    assert api.parse_counts(",".join(map(str, sizes)), "--batch-size") == sizes


@FAST
@given(TEXT)
def test_any_text_is_a_count_or_a_config_error(text):
    _parses_or_refuses(lambda t: api.parse_count(t, "--limit"), text)
    _parses_or_refuses(lambda t: api.parse_counts(t, "--batch-size"), text)


# --------------------------------------------------------------------------- budgets
@FAST
@given(st.floats(min_value=1e-3, max_value=1e6, allow_nan=False), st.sampled_from(["x", "ms"]))
def test_budgets_round_trip(value, unit):
    text = f"{value!r}{unit}"
    bud = api.parse_budget(text)
    assert bud["kind"] == {"x": "speedup", "ms": "latency_ms"}[unit]
    assert bud["value"] == pytest.approx(value) and api.parse_budget(bud["text"]) == bud


@FAST
@given(st.floats(min_value=1e-3, max_value=100.0))
def test_cost_share_budgets_are_fractions(value):
    assert api.parse_budget(f"{value!r}%")["value"] == pytest.approx(value / 100.0)


@FAST
@given(st.sampled_from(["inf", "-inf", "nan", "0", "-1", "1e400"]), st.sampled_from(["x", "ms", "%"]))
def test_budgets_out_of_range_are_refused(value, unit):
    with pytest.raises(api.ConfigError):
        api.parse_budget(f"{value}{unit}")


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_max_drop_is_finite_and_in_range(value):
    if math.isfinite(value) and 0 <= value <= 100:
        assert api.parse_max_drop(repr(value)) == value
    else:
        with pytest.raises(api.ConfigError, match="--max-drop"):
            api.parse_max_drop(repr(value))


@FAST
@given(TEXT)
def test_any_text_is_a_budget_or_a_config_error(text):
    _parses_or_refuses(api.parse_budget, text)
    _parses_or_refuses(api.parse_max_drop, text)
    _parses_or_refuses(api.parse_cost, text)
    _parses_or_refuses(api.parse_device, text)
    _parses_or_refuses(api.parse_dtype, text)
    _parses_or_refuses(api.parse_trace_method, text)


# --------------------------------------------------------------------------- key=value settings
@FAST
@given(NAME, st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20))
def test_assignments_split_at_the_first_equals_sign(key, value):
    assert api.parse_assignment(f"{key}={value}", "--set") == (key, value.strip())


@FAST
@given(NAME, st.one_of(st.integers(-10**6, 10**6), st.booleans(), st.none(), st.floats(-1e6, 1e6).map(lambda v: round(v, 3))))
def test_yaml_assignments_read_scalars(key, value):
    text = {True: "true", False: "false", None: "null"}[value] if value is None or isinstance(value, bool) else repr(value)
    assert api.parse_yaml_assignment(f"{key}={text}", "--arg") == (key, value)


@FAST
@given(TEXT)
def test_any_text_is_a_setting_or_a_config_error(text):
    _parses_or_refuses(lambda t: api.parse_assignment(t, "--option"), text)
    _parses_or_refuses(lambda t: api.parse_yaml_assignment(t, "--arg"), text)
    _parses_or_refuses(api.parse_recipe_override, text)


# --------------------------------------------------------------------------- head settings
HEAD = st.fixed_dictionaries({}, optional={
    "width": st.integers(0, 512), "blocks": st.integers(0, 4), "dilation": st.integers(1, 8),
    "aspp_rates": st.lists(st.integers(1, 24), max_size=3).map(tuple),
    "dropout": st.floats(0.0, 0.95).map(lambda v: round(v, 3)),
})


@FAST
@given(HEAD)
def test_head_settings_round_trip_through_text(settings_):
    def text(v):
        return ":".join(map(str, v)) if isinstance(v, tuple) else repr(v)

    line = ",".join(f"{k}={text(v)}" for k, v in settings_.items())
    assert api.parse_head_settings(line) == settings_
    assert api.parse_head_settings(settings_) == settings_


@FAST
@given(st.sampled_from(["width", "blocks", "dilation"]), st.one_of(st.text(max_size=6), st.floats(allow_nan=True)))
def test_head_settings_of_the_wrong_type_are_refused(key, value):
    text = str(value)
    try:
        expected = int(text)
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(api.ConfigError):
            api.parse_head_settings(f"{key}={text}")
    else:
        _parses_or_refuses(api.parse_head_settings, f"{key}={text}")


@FAST
@given(TEXT)
def test_any_text_is_head_settings_or_a_config_error(text):
    _parses_or_refuses(api.parse_head_settings, text)


# --------------------------------------------------------------------------- policy options
@FAST
@given(st.floats(0.0, 1.0), st.integers(0, 5), st.floats(0.0, 1.0))
def test_mess_options_parse_to_their_types(pixel, radius, edge):
    got = api.policy_options("mess", [f"pixel_threshold={pixel!r}", f"edge_radius={radius}", f"edge_weight={edge!r}"])
    assert got == {"pixel_threshold": pixel, "edge_radius": radius, "edge_weight": edge}
    assert isinstance(got["edge_radius"], int)


@FAST
@given(st.sampled_from(["mess", "entropy", "maxprob", "cbt", "class-means", "fft", "learned"]), st.lists(TEXT, max_size=3))
def test_any_policy_options_parse_or_give_a_config_error(policy, items):
    _parses_or_refuses(lambda t: api.policy_options(policy, t), items)


# --------------------------------------------------------------------------- dataset specs
SCENES = st.fixed_dictionaries({}, optional={
    "classes": st.integers(2, 40), "size": st.integers(16, 512), "n": st.integers(1, 1000), "seed": st.integers(0, 99),
    "noise": st.floats(0.0, 1.0).map(lambda v: round(v, 3)), "mix": st.sampled_from(["uniform", "easy", "hard"]),
    "cache": st.sampled_from(["0", "1", "true", "false"]),
})


@FAST
@given(SCENES)
def test_synthetic_specs_parse_with_their_options(options):
    text = "synthetic:scenes" + ("?" + "&".join(f"{k}={v}" for k, v in options.items()) if options else "")
    spec = api.parse_dataset_spec(text)
    assert spec.scheme == "synthetic" and spec.target == "scenes"
    assert dict(spec.options) == {k: str(v) for k, v in options.items()}


@FAST
@given(st.sampled_from(["voc", "cityscapes", "ade20k", "folder"]), st.from_regex(r"/[a-z0-9_/]{1,20}", fullmatch=True),
       st.sampled_from(["", "?skip_bad=1", "?base_size=512", "?crop_size=256x512", "?calib_fraction=0.3", "?split=val"]))
def test_reader_specs_parse_without_reading_the_disk(scheme, path, query):
    spec = api.parse_dataset_spec(f"{scheme}:{path}{query}")
    assert (spec.scheme, spec.target) == (scheme, path)


@FAST
@given(st.one_of(TEXT, st.builds(lambda s, q: f"{s}:{q}", st.sampled_from(["synthetic", "voc", "folder"]), TEXT)))
def test_any_text_is_a_dataset_spec_or_a_data_error(text):
    try:
        api.parse_dataset_spec(text)
    except api.DataError:
        pass


# --------------------------------------------------------------------------- bundle configs
@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["spec", "trace", "exits", "num_classes", "final_flops", "schema_version", "policy"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)), max_size=6))
def test_any_config_mapping_is_a_config_or_a_config_error(data):
    from mexify.config import BundleConfig

    try:
        BundleConfig.from_dict(data)
    except api.ConfigError:
        pass
