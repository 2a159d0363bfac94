"""Sweep DSL: sizes and ordering of param/product/chain/zipit, and strict key checking against get_config."""
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import pretrain
from experiments.sweep_dsl import Sweep, as_sweep, chain, expand, fixed, param, product, validate, zipit
from kanana_jax.config import ConfigError


def test_param_keeps_value_order():
    s = param("optimizer.learning_rate", [3e-3, 1e-3, 1e-2])
    assert len(s) == 3
    assert list(s) == [{"optimizer.learning_rate": v} for v in (3e-3, 1e-3, 1e-2)]


def test_product_varies_last_argument_fastest():
    s = product(param("optimizer.name", ["adamw", "muon"]), param("optimizer.learning_rate", [1e-3, 3e-3, 1e-2]))
    assert len(s) == 6
    assert [(p["optimizer.name"], p["optimizer.learning_rate"]) for p in s] == [
        ("adamw", 1e-3), ("adamw", 3e-3), ("adamw", 1e-2), ("muon", 1e-3), ("muon", 3e-3), ("muon", 1e-2)]
    assert s.keys == ["optimizer.name", "optimizer.learning_rate"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 99), min_size=1, max_size=4), min_size=1, max_size=3))
def test_product_matches_itertools_product(value_lists):
    sweeps = [param(f"k{i}.v", values) for i, values in enumerate(value_lists)]
    got = [tuple(p[f"k{i}.v"] for i in range(len(value_lists))) for p in product(*sweeps)]
    assert got == list(itertools.product(*value_lists))


def test_chain_concatenates_points_with_different_keys():
    s = chain(fixed({"optimizer.name": "adamw"}),
              product(fixed({"optimizer.name": "muon"}), param("optimizer.learning_rate", [1e-3, 2e-3])))
    assert list(s) == [{"optimizer.name": "adamw"},
                       {"optimizer.name": "muon", "optimizer.learning_rate": 1e-3},
                       {"optimizer.name": "muon", "optimizer.learning_rate": 2e-3}]
    assert list(param("a.b", [1]) + param("a.b", [2])) == [{"a.b": 1}, {"a.b": 2}]
    assert len(param("a.b", [1, 2]) * param("a.c", [1, 2, 3])) == 6


def test_zipit_pairs_points_position_by_position():
    s = zipit(param("optimizer.learning_rate", [1e-3, 3e-3]), param("optimizer.warmup_steps", [5, 10]))
    assert list(s) == [{"optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 5},
                       {"optimizer.learning_rate": 3e-3, "optimizer.warmup_steps": 10}]
    with pytest.raises(ValueError, match=r"different numbers of points \[2, 3\]"):
        zipit(param("a.b", [1, 2]), param("a.c", [1, 2, 3]))


def test_combinators_reject_ambiguous_or_empty_input():
    with pytest.raises(ValueError, match="key 'a.b' is set by more than one argument"):
        product(param("a.b", [1]), param("a.b", [2]))
    with pytest.raises(ValueError, match="values is empty"):
        param("a.b", [])
    with pytest.raises(TypeError, match="must be a list or tuple"):
        param("a.b", "123")
    with pytest.raises(ValueError, match="not a dotted config key"):
        param("a..b", [1])
    with pytest.raises(TypeError, match="sweep point 1 must be a dict"):
        as_sweep([{"a.b": 1}, 3])
    assert as_sweep({"a.b": 1}) == Sweep(({"a.b": 1},))


def test_points_are_independent_copies():
    s = param("a.b", [1])
    point = s[0]
    point["a.b"] = 2
    assert s[0] == {"a.b": 1}


def test_validate_applies_every_point_to_get_config():
    s = product(param("optimizer.learning_rate", [1e-3, 1e-2]), param("model.n_layers", [2, 3]))
    cfgs = validate(s, pretrain.get_config, "size=tiny,steps=7")
    assert [(c.optimizer.learning_rate, c.model.n_layers) for c in cfgs] == [
        (1e-3, 2), (1e-3, 3), (1e-2, 2), (1e-2, 3)]
    assert all(c.train.steps == 7 for c in cfgs)
    assert expand(s, pretrain.get_config, "size=tiny") == list(s)


def test_strict_keys_name_the_point_and_suggest_the_fix():
    s = chain(param("optimizer.learning_rate", [1e-3]), param("optimizer.learning_rat", [1e-2]))
    with pytest.raises(ConfigError, match=r"sweep point 1 .*unknown config key 'optimizer.learning_rat'.*"
                                          r"Did you mean 'optimizer.learning_rate'"):
        validate(s, pretrain.get_config)
    with pytest.raises(ConfigError, match=r"sweep point 0 .*'optimizer.learning_rate': -0.1 is below the minimum"):
        validate(param("optimizer.learning_rate", [-0.1]), pretrain.get_config)
    with pytest.raises(ConfigError, match=r"'model.top_k': must be <= model.n_routed_experts"):
        validate(param("model.top_k", [16]), pretrain.get_config, "size=tiny")
    with pytest.raises(ConfigError, match=r"override shared by every sweep point: unknown config key 'train.stepz'"):
        validate(param("optimizer.learning_rate", [1e-3]), pretrain.get_config, base={"train.stepz": 3})


def test_pretrain_sweep_is_valid():
    s = as_sweep(pretrain.sweep())
    assert len(s) == 3 and s.keys == ["optimizer.learning_rate"]
    assert len(validate(s, pretrain.get_config)) == 3
