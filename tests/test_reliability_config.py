"""Config fuzzing (hypothesis) over every key of every config dataclass in kanana_jax/config.py:
an invalid value raises ConfigError naming the key; a valid one loads with its declared type; command-line
overrides either fail with ConfigError or yield a config whose every value has its declared type and range
(checked independently of config.py), so nothing reaches the model unchecked.

The fuzzing found seven gaps, now closed in config.py; the tests at the end pin each one down."""
import dataclasses
import json
import math
import typing
from typing import Literal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from experiments import pretrain
from kanana_jax import config as config_lib
from kanana_jax.config import ConfigError

INT32_MAX = 2 ** 31 - 1
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclasses.dataclass(frozen=True)
class Spec:
    section: str
    name: str
    base: type                 # int, float, bool, str or tuple (Literal: str)
    allowed: tuple | None      # Literal values
    optional: bool
    lo: float | None
    hi: float | None

    @property
    def key(self):
        return f"{self.section}.{self.name}"


def _specs() -> list[Spec]:
    out = []
    for section in dataclasses.fields(config_lib.ExperimentConfig):
        cls = typing.get_type_hints(config_lib.ExperimentConfig)[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, optional = hints[f.name], False
            if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")):
                (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
                optional = True
            allowed = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
            base = type(allowed[0]) if allowed else tp
            out.append(Spec(section.name, f.name, base, allowed, optional, f.metadata.get("lo"), f.metadata.get("hi")))
    return out


SPECS = _specs()


def _override(overrides):
    c = pretrain.get_config("size=tiny")
    config_lib.apply_overrides(c, overrides)
    return config_lib.load(c)


ROLES = ("muon", "adamw", "frozen")


# ------------------------------------------------------------------------------------------- strategies

def valid_values(spec: Spec):
    if spec.allowed:
        s = st.sampled_from(spec.allowed)
    elif spec.base is bool:
        s = st.booleans()
    elif spec.base is int:
        s = st.integers(int(spec.lo) if spec.lo is not None else -INT32_MAX,
                        int(spec.hi) if spec.hi is not None else INT32_MAX)
    elif spec.base is float:
        lo = spec.lo if spec.lo is not None else -1e6
        hi = spec.hi if spec.hi is not None else 1e6
        s = st.floats(lo, hi, allow_nan=False, allow_infinity=False) | st.integers(math.ceil(lo), math.floor(hi))
    elif spec.base is str:
        s = st.text(max_size=12)
    elif spec.name == "debug_poison_steps":
        s = st.lists(st.integers(1, 10 ** 6), max_size=4).map(tuple)
    elif spec.name == "mixture":
        entry = st.tuples(st.text(min_size=1, max_size=6), st.sampled_from(["embedded", "/data/x.jsonl"]),
                          st.floats(0.01, 100.0))
        s = st.lists(entry, max_size=3, unique_by=lambda e: e[0]).map(tuple)
    elif spec.name == "partition_rules":
        rule = st.tuples(st.sampled_from([".*", "attn/.*", "^embed", "moe_layers/.*/w_up", "(wq|wo)$"]),
                         st.sampled_from(ROLES))
        s = st.lists(rule, max_size=3).map(tuple)
    elif spec.name == "tracks":   # rl.tracks: at least one (name, prompts, reward spec, weight > 0)
        entry = st.tuples(st.text(min_size=1, max_size=6), st.sampled_from(["prompts:arith", "p.jsonl"]),
                          st.sampled_from(["verifiable", "reward_model:/rm", "verifiable*0.5+reward_model:/rm"]),
                          st.floats(0.01, 100.0))
        s = st.lists(entry, min_size=1, max_size=3, unique_by=lambda e: e[0]).map(tuple)
    elif spec.base is tuple:   # a tuple key this file does not know yet: only the empty default is surely valid
        s = st.just(())
    else:
        raise AssertionError(f"no valid-value strategy for {spec.key} ({spec.base})")
    return s | st.none() if spec.optional else s


def invalid_values(spec: Spec):
    """Values of a wrong type, outside the allowed set, or outside [lo, hi]."""
    junk = st.text(max_size=6) | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3),
                                                                                        st.integers(), max_size=1)
    if spec.allowed:
        return st.text(max_size=10).filter(lambda t: t not in spec.allowed) | st.integers() | st.booleans()
    if spec.base is bool:
        return st.integers() | st.floats(allow_nan=False) | junk
    if spec.base is str:
        return st.integers() | st.floats(allow_nan=False) | st.booleans() | st.lists(st.text(max_size=2), max_size=2)
    if spec.base is tuple:
        bad = st.integers() | st.text(max_size=5) | st.booleans() | st.floats(allow_nan=False)
        entries = st.integers() | st.text(max_size=3) | st.lists(st.integers() | st.text(max_size=2), max_size=3)
        if spec.name == "debug_poison_steps":
            bad |= st.lists(st.integers(max_value=0) | st.booleans() | st.text(max_size=2), min_size=1, max_size=3)
        elif spec.name in ("mixture", "partition_rules", "tracks", "buckets", "eval_sources"):   # malformed entries
            bad |= st.lists(entries, min_size=1, max_size=3)
        return bad
    wrong_type = junk | st.booleans()
    if spec.base is int:
        wrong_type |= st.floats(allow_nan=False).filter(lambda x: not float(x).is_integer() or abs(x) > 1e20)
    if not spec.optional:
        wrong_type |= st.none()
    out_of_range = []
    if spec.lo is not None:
        below = (st.integers(max_value=math.ceil(spec.lo) - 1) if spec.base is int
                 else st.floats(max_value=spec.lo, exclude_max=True, allow_nan=False, allow_infinity=False))
        out_of_range.append(below)
    if spec.hi is not None:
        above = (st.integers(min_value=math.floor(spec.hi) + 1) if spec.base is int
                 else st.floats(min_value=spec.hi, exclude_min=True, allow_nan=False, allow_infinity=False))
        out_of_range.append(above)
    if spec.base is float:
        out_of_range.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    if spec.base is int:
        out_of_range.append(st.integers(min_value=INT32_MAX + 1) | st.integers(max_value=-INT32_MAX - 1))
    return st.one_of(wrong_type, *out_of_range)


def _text_for(spec: Spec):
    """Command-line text for `spec`: printed valid or invalid values, special spellings and random text."""
    printed = (valid_values(spec) | invalid_values(spec)).map(
        lambda v: json.dumps(v) if isinstance(v, (tuple, list, dict)) else str(v))
    special = st.sampled_from(["nan", "inf", "-inf", "1e400", "none", "None", "true", "0", "-1", "[]", "[1]", "{}",
                               "[[\"a\", \"embedded\", 1.0]]", "1.5", " 3", "0x10", "1_000", str(INT32_MAX + 1)])
    return printed | special | st.text(max_size=8)


# ------------------------------------------------------------------------------------------- checker

def check_config(cfg: config_lib.ExperimentConfig):
    """Every value has its declared type and lies in its declared range (independent of config.py's checks)."""
    for spec in SPECS:
        value = getattr(getattr(cfg, spec.section), spec.name)
        where = f"{spec.key}={value!r}"
        if value is None:
            assert spec.optional, where
            continue
        if spec.allowed:
            assert value in spec.allowed and type(value) is spec.base, where
        elif spec.base is float:
            assert type(value) is float and math.isfinite(value), where
        else:
            assert type(value) is spec.base, where
        if spec.base in (int, float) and not (spec.base is float and math.isnan(value)):
            assert spec.lo is None or value >= spec.lo, where
            assert spec.hi is None or value <= spec.hi, where
        if spec.base is int:
            assert abs(value) <= INT32_MAX, where
    assert all(type(s) is int and s >= 1 for s in cfg.train.debug_poison_steps)
    for rule in cfg.optimizer.partition_rules:
        assert len(rule) == 2 and isinstance(rule[0], str) and rule[1] in ROLES, rule
    for entry in cfg.data.mixture:
        assert len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[1], str), entry
        assert isinstance(entry[2], (int, float)) and math.isfinite(entry[2]) and entry[2] > 0, entry


def _names_key_or_section(message: str, keys) -> bool:
    return any(f"'{k}'" in message or f"'{k}." in message or f"'{k.split('.')[0]}'" in message
               or f"'{k.split('.')[0]}." in message for k in keys)


# ------------------------------------------------------------------------------------------- properties

def test_every_key_of_every_dataclass_is_covered():
    assert {s.section for s in SPECS} == {f.name for f in dataclasses.fields(config_lib.ExperimentConfig)}
    assert len(SPECS) > 60 and all(s.base in (int, float, bool, str, tuple) for s in SPECS)


@SETTINGS
@given(st.data())
def test_invalid_value_raises_config_error_naming_the_key(data):
    spec = data.draw(st.sampled_from(SPECS), label="key")
    value = data.draw(invalid_values(spec), label="value")
    with pytest.raises(ConfigError) as e:
        config_lib.load({spec.section: {spec.name: value}})
    assert f"'{spec.key}'" in str(e.value), str(e.value)


@SETTINGS
@given(st.data())
def test_valid_value_loads_with_its_declared_type(data):
    spec = data.draw(st.sampled_from(SPECS), label="key")
    value = data.draw(valid_values(spec), label="value")
    try:
        cfg = config_lib.load({spec.section: {spec.name: value}})
    except ConfigError as e:  # only a cross-field rule of the same section may refuse a value in range
        assert f"'{spec.section}." in str(e) or f"'{spec.section}'" in str(e), str(e)
        return
    got = getattr(getattr(cfg, spec.section), spec.name)
    assert got == (float(value) if spec.base is float and value is not None else value)
    check_config(cfg)


@SETTINGS
@given(st.data())
def test_command_line_overrides_fail_with_config_error_or_load_checked_values(data):
    specs = data.draw(st.lists(st.sampled_from(SPECS), min_size=1, max_size=4, unique=True), label="keys")
    overrides = {}
    for spec in specs:
        text = data.draw(_text_for(spec), label=spec.key)
        overrides[spec.key] = text
    try:
        cfg = _override(overrides)
    except ConfigError as e:
        assert _names_key_or_section(str(e), overrides), str(e)
        return
    check_config(cfg)


@SETTINGS
@given(key=st.text(max_size=12).filter(lambda k: k not in {s.name for s in SPECS}),
       section=st.sampled_from(["model", "optimizer", "data", "train", "mesh"]))
def test_unknown_keys_are_refused_by_name(key, section):
    with pytest.raises(ConfigError, match="unknown config key"):
        config_lib.load({section: {key: 1}})
    assume(key and "." not in key)
    with pytest.raises(ConfigError, match="unknown config key"):
        _override({f"{section}.{key}": "1"})


# ------------------------------------------------------------------------------------------- closed gaps


# _coerce(float) should reject NaN/Inf (NaN passes every lo/hi comparison)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_floats_are_refused(value):
    with pytest.raises(ConfigError, match="'optimizer.learning_rate'"):
        config_lib.load({"optimizer": {"learning_rate": value}})
    with pytest.raises(ConfigError, match="'optimizer.b1'"):
        _override({"optimizer.b1": str(value)})


# _coerce(int) should bound ints to int32 (steps/shapes become int32 on device)
def test_ints_beyond_int32_are_refused():
    with pytest.raises(ConfigError, match="'model.d_model'"):
        config_lib.load({"model": {"d_model": 2 ** 40}})
    with pytest.raises(ConfigError, match="'train.steps'"):
        _override({"train.steps": str(2 ** 31)})


# _coerce(float) raises OverflowError on float(10**400); wrap it
def test_int_too_big_for_a_float_is_refused():
    with pytest.raises(ConfigError, match="'optimizer.eps'"):
        config_lib.load({"optimizer": {"eps": 10 ** 400}})


# parse_value: tuple(json.loads('5')) raises TypeError; refuse non-lists
def test_tuple_key_from_non_list_text_is_refused():
    with pytest.raises(ConfigError, match="'train.debug_poison_steps'"):
        _override({"train.debug_poison_steps": "5"})


# apply_overrides walks into a value ('model.d_model.x') and raises TypeError
def test_dotted_key_below_a_value_is_refused():
    with pytest.raises(ConfigError, match="'model.d_model"):
        _override({"model.d_model.x": "3"})


# OptimizerConfig: re.compile(1) raises TypeError for a non-string pattern
def test_partition_rule_with_a_non_string_pattern_is_refused():
    with pytest.raises(ConfigError, match="'optimizer.partition_rules'"):
        config_lib.load({"optimizer": {"partition_rules": ((1, "muon"),)}})


# DataConfig should check mixture entries are (name, path, weight>0) at load
def test_malformed_mixture_entries_are_refused():
    with pytest.raises(ConfigError, match="'data.mixture'"):
        config_lib.load({"data": {"mixture": ((1, 2),)}})
