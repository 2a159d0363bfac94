"""Config validation: unknown keys, wrong types and out-of-range values fail at load, naming the key."""
import pytest

from experiments import pretrain
from kanana_jax import config as config_lib
from kanana_jax.cli import build_config


def test_default_tiny_config_loads():
    cfg = config_lib.load(pretrain.get_config("size=tiny"))
    assert cfg.model.d_model == 128 and cfg.train.stage == "pretrain"
    assert isinstance(cfg.model, config_lib.ModelConfig)


@pytest.mark.parametrize("override, message", [
    ({"model.d_modle": "64"}, "unknown config key 'model.d_modle'. Did you mean 'model.d_model'"),
    ({"optimizer.name": "sgd"}, "'optimizer.name': 'sgd' is not allowed; allowed values: 'adamw', 'muon'"),
    ({"model.n_layers": "0"}, "'model.n_layers': 0 is below the minimum 1"),
    ({"model.d_model": "wide"}, "'model.d_model': expected an int"),
    ({"optimizer.b1": "1.5"}, "'optimizer.b1': 1.5 is above the maximum 1.0"),
    ({"model.top_k": "9"}, "'model.top_k': must be <= model.n_routed_experts=8"),
    ({"model.n_group": "3"}, "'model.n_group': must divide model.n_routed_experts=8"),
    ({"model.score_func": "softplus"}, "allowed values: 'softmax', 'sigmoid'"),
    ({"train.tensorboard": "maybe"}, "'train.tensorboard': expected true/false"),
    ({"mesh.data": "0"}, "'mesh.data': must be a positive size or -1"),
])
def test_bad_overrides_name_the_key(override, message):
    c = pretrain.get_config("size=tiny")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.apply_overrides(c, override)
        config_lib.load(c)
    assert message in str(e.value)


def test_unknown_key_in_dict_lists_allowed_keys():
    with pytest.raises(config_lib.ConfigError, match="Allowed keys in 'model':.*d_model"):
        config_lib.load({"model": {"hidden": 3}})


def test_wrong_type_in_dict():
    with pytest.raises(config_lib.ConfigError, match="'train.steps': expected an int, got float 1.5"):
        config_lib.load({"train": {"steps": 1.5}})


def test_config_argument_parsing_and_cli_overrides():
    _, cfg = build_config("experiments/pretrain.py:size=tiny,steps=7", ["optimizer.learning_rate=1e-2",
                                                                         "model.q_lora_rank=16"])
    assert cfg.train.steps == 7 and cfg.optimizer.learning_rate == 1e-2 and cfg.model.q_lora_rank == 16
    with pytest.raises(config_lib.ConfigError, match="unknown config argument 'stpes'"):
        build_config("experiments/pretrain.py:stpes=3")


def test_every_size_validates():
    for size in ("tiny", "small", "kanana2_30b_a3b", "kanana2_155b_a17b"):
        cfg = config_lib.load(pretrain.get_config(f"size={size}"))
        assert cfg.model.n_layers >= 3
    with pytest.raises(ValueError, match="allowed sizes: tiny, small"):
        pretrain.get_config("size=huge")
