"""HF DeepSeek-V3 conversion against transformers: import parity, export -> transformers reload, bit-identical
round trip, config mapping, and errors that name the file and tensor.

Tiny random DeepseekV3ForCausalLM models are built (no download) by tests/hf_reference.py in the Python 3.11
helper venv (.venv-hf or $KANANA_HF_PYTHON), once per test run for all configurations.
"""
import functools
import json
import os
import shutil

import flax
import jax
import numpy as np
import pytest

import hf_reference
from kanana_jax.config import ModelConfig
from kanana_jax.convert import hf_config
from kanana_jax.convert.hf_export import export_hf
from kanana_jax.convert.hf_import import import_params, load_hf_checkpoint, read_block
from kanana_jax.convert.hf_layout import tensor_maps
from kanana_jax.convert.safetensors_io import CheckpointError, SafetensorsCheckpoint, ShardFile, write_shard
from kanana_jax.model import Transformer

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=16,
            q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=8, n_group=1, topk_group=1,
            num_experts_per_tok=2, first_k_dense_replace=1, routed_scaling_factor=1.5, max_position_embeddings=64)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
MODELS = [
    dict(name="sigmoid_plain", config=dict(BASE), max_shard_size="40KB"),
    dict(name="qlora_groups_yarn", config=dict(BASE, q_lora_rank=24, n_group=4, topk_group=2, rope_parameters=YARN,
                                               max_position_embeddings=32)),
    dict(name="tied_yarn_mscale_no_interleave", config=dict(
        BASE, tie_word_embeddings=True, rope_interleave=False, first_k_dense_replace=0, n_shared_experts=2,
        max_position_embeddings=32, rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 8.0,
                                                     "original_max_position_embeddings": 4, "mscale": 0.7})),
    dict(name="softmax_groups", router="softmax", bias=False, config=dict(
        BASE, scoring_func="softmax", topk_method="group_limited_greedy", n_group=2, topk_group=1, q_lora_rank=16)),
    dict(name="softmax_greedy_bias", router="softmax", config=dict(
        BASE, scoring_func="softmax", topk_method="greedy", norm_topk_prob=False)),
]
NAMES = [m["name"] for m in MODELS]
ROUTER = {m["name"]: m.get("router", "sigmoid") for m in MODELS}
TOKENS = np.random.default_rng(0).integers(0, BASE["vocab_size"], (2, 16)).astype(np.int32)
PARITY = {}  # name -> max |ours - transformers|, printed at the end of the module


def _reference_or_fail(stage, spec, prepare=None):
    try:
        return hf_reference.reference_outputs(stage, spec, prepare)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def built():
    """Directory with <name>/ HF checkpoints and <name>.logits.npy from transformers."""
    return _reference_or_fail("build", {"models": MODELS, "tokens": TOKENS.tolist()})


@pytest.fixture(scope="session")
def exported(built):
    """Directory with exp/<name>/ (our export of each imported model) and <name>.reload.npy (transformers)."""
    reload = [{"name": n, "dir": None, "router": ROUTER[n]} for n in NAMES]

    def prepare(out_dir):
        for spec in reload:
            spec["dir"] = os.path.join(out_dir, "exp", spec["name"])
            cfg, params, hf = load_hf_checkpoint(os.path.join(built, spec["name"]))
            export_hf(params, cfg, spec["dir"], base_config=hf, max_shard_bytes=40_000)
    spec = {"reload": reload, "tokens": TOKENS.tolist(), "built": built}
    return _reference_or_fail("export", spec, prepare)


@functools.lru_cache(maxsize=None)
def _apply(cfg: ModelConfig):
    return jax.jit(lambda params, tokens: Transformer(cfg).apply({"params": params}, tokens))


def _logits(directory, **overrides):
    cfg, params, _ = load_hf_checkpoint(directory, **overrides)
    return np.asarray(_apply(cfg)(params, TOKENS))


@pytest.mark.parametrize("name", NAMES)
def test_imported_logits_match_transformers(built, name):
    ref = np.load(os.path.join(built, f"{name}.logits.npy"))
    ours = _logits(os.path.join(built, name))
    PARITY[name] = float(np.abs(ours - ref).max())
    print(f"parity {name}: max|ours - transformers| = {PARITY[name]:.2e} (|logits| <= {np.abs(ref).max():.1f})")
    assert ours.shape == ref.shape and np.abs(ref).max() > 1.0
    assert PARITY[name] <= 1e-4


def test_rope_layout_and_unscanned_import(built):
    """The rope column permutation matters (skipping it breaks parity); unscanned layers hold the same weights."""
    directory = os.path.join(built, "qlora_groups_yarn")
    ref = np.load(os.path.join(built, "qlora_groups_yarn.logits.npy"))
    cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(directory))
    wrong = import_params(SafetensorsCheckpoint(directory), cfg, interleaved=False)
    assert np.abs(np.asarray(_apply(cfg)(wrong, TOKENS)) - ref).max() > 1e-2
    _, scanned, _ = load_hf_checkpoint(directory)
    _, unscanned, _ = load_hf_checkpoint(directory, scan_layers=False)
    flat = flax.traverse_util.flatten_dict(unscanned)
    for path, leaf in flax.traverse_util.flatten_dict(scanned).items():
        if path[0] in ("dense_layers", "moe_layers"):
            for i in range(leaf.shape[0]):
                np.testing.assert_array_equal(flat.pop((f"{path[0]}_{i}",) + path[1:]), leaf[i])
        else:
            np.testing.assert_array_equal(flat.pop(path), leaf)
    assert not flat


@pytest.mark.parametrize("name", NAMES)
def test_export_reloads_in_transformers_with_same_logits(built, exported, name):
    ref = np.load(os.path.join(built, f"{name}.logits.npy"))
    reloaded = np.load(os.path.join(exported, f"{name}.reload.npy"))
    np.testing.assert_allclose(reloaded, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_bit_identical(built, exported, name):
    original = SafetensorsCheckpoint(os.path.join(built, name))
    ours = SafetensorsCheckpoint(os.path.join(exported, "exp", name))
    dropped = set(original.names()) - set(ours.names())
    # A softmax model with an all-zero balancing bias is written as DeepSeek-V2 'greedy' routing, without bias.
    assert all(n.endswith("e_score_correction_bias") and not original.get(n).any() for n in dropped), dropped
    assert set(ours.names()) <= set(original.names())
    for n in ours.names():
        a, b = original.get(n), ours.get(n)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), n
    hf_in = hf_config.read_hf_config(os.path.join(built, name))
    hf_out = hf_config.read_hf_config(os.path.join(exported, "exp", name))
    assert hf_config.model_config_from_hf(hf_in) == hf_config.model_config_from_hf(hf_out)
    assert hf_out["rope_interleave"] == hf_in.get("rope_interleave", True)


def test_bfloat16_import_and_export(built, tmp_path):
    directory = os.path.join(built, "qlora_groups_yarn")
    cfg32, p32, hf = load_hf_checkpoint(directory)
    cfg16, p16, _ = load_hf_checkpoint(directory, param_dtype="bfloat16")
    flat32, flat16 = (jax.tree_util.tree_flatten_with_path(p)[0] for p in (p32, p16))
    for (path, a), (_, b) in zip(flat32, flat16):
        want = np.float32 if "router" in jax.tree_util.keystr(path) else jax.numpy.bfloat16
        assert b.dtype == want, path
        np.testing.assert_array_equal(np.asarray(a).astype(want), np.asarray(b))
    export_hf(p16, cfg16, str(tmp_path), base_config=hf)
    ckpt = SafetensorsCheckpoint(str(tmp_path))
    assert ckpt.get("model.layers.1.mlp.gate.weight").dtype == np.float32
    assert ckpt.get("model.layers.1.mlp.experts.3.up_proj.weight").dtype == jax.numpy.bfloat16
    assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"


def test_read_block_serves_any_shard(built):
    """What a device shard receives (outer and inner slices) equals that slice of the whole leaf."""
    directory = os.path.join(built, "qlora_groups_yarn")
    ckpt = SafetensorsCheckpoint(directory)
    cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(directory))
    for m in tensor_maps(cfg):
        full = read_block(ckpt, m, tuple(slice(None) for _ in m.shape), np.float32)
        index = tuple(slice(n // 2, n) if i % 2 == 0 else slice(0, (n + 1) // 2) for i, n in enumerate(m.shape))
        np.testing.assert_array_equal(read_block(ckpt, m, index, np.float32), full[index])


def _copy(built, tmp_path, name="sigmoid_plain"):
    target = tmp_path / name
    shutil.copytree(os.path.join(built, name), target)
    return target


def _rewrite(shard_path, edit):
    """Rewrites a shard with `edit(dict name -> array)` applied."""
    shard = ShardFile(shard_path)
    tensors = edit({n: np.array(shard.get(n)) for n in shard.tensors})
    del shard
    write_shard(str(shard_path), [(n, a.shape, a.dtype) for n, a in tensors.items()], tensors.__getitem__)


def _shard_of(directory, tensor):
    return directory / json.load(open(directory / "model.safetensors.index.json"))["weight_map"][tensor]


def test_truncated_and_malformed_shards_name_the_file_and_tensor(built, tmp_path):
    d = _copy(built, tmp_path)
    shard = _shard_of(d, "model.layers.1.self_attn.kv_b_proj.weight")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 5)
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*tensor '.*'.*truncated"):
        load_hf_checkpoint(str(d))
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"{not json")
    with pytest.raises(CheckpointError, match=rf"{shard.name}: malformed safetensors header"):
        load_hf_checkpoint(str(d))


def test_missing_tensor_and_shape_mismatch_name_the_file_and_tensor(built, tmp_path):
    d = _copy(built, tmp_path)
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    shard = _shard_of(d, name)
    _rewrite(shard, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is missing from .*{shard.name}"):
        load_hf_checkpoint(str(d))
    d2 = _copy(built, tmp_path / "b")
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = _shard_of(d2, name)
    _rewrite(shard, lambda t: {**t, name: t[name][:-1]})
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' in .*{shard.name} has shape \[31, 32\], expected "
                                              r"\[32, 32\]"):
        load_hf_checkpoint(str(d2))
    os.remove(shard)
    with pytest.raises(CheckpointError, match=rf"maps tensor '.*' to {shard.name}, which does not exist"):
        load_hf_checkpoint(str(d2))


def test_config_errors_name_the_field(built, tmp_path):
    hf = hf_config.read_hf_config(os.path.join(built, "sigmoid_plain"))
    for edit, pattern in [({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
                          ({"sliding_window": 128}, r"fields this converter does not implement: \['sliding_window'\]"),
                          ({"model_type": "llama"}, "model_type='llama'"),
                          ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope type 'llama3'"),
                          ({"topk_method": "group_limited_greedy"}, "needs scoring_func='softmax'"),
                          ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config")]:
        with pytest.raises(hf_config.HFConfigError, match=pattern):
            hf_config.model_config_from_hf({**hf, **edit})
    assert hf_config.model_config_from_hf({**hf, "sliding_window": 128}, ignore_fields=("sliding_window",))


@pytest.mark.parametrize("overrides", [
    {}, {"q_lora_rank": 16, "n_group": 2, "topk_group": 1, "tie_embeddings": True},
    {"rope_scaling": "yarn", "yarn_factor": 4.0, "yarn_original_max_position": 64, "yarn_mscale": 0.8},
    {"score_func": "softmax", "n_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 2.5, "first_k_dense": 0},
])
def test_config_round_trip(overrides):
    cfg = ModelConfig(**overrides)
    hf = hf_config.hf_config_from_model(cfg)
    assert hf_config.model_config_from_hf(json.loads(json.dumps(hf))) == cfg


def test_export_refuses_what_transformers_cannot_express():
    for cfg, pattern in [(ModelConfig(attention_type="gqa"), "gqa"), (ModelConfig(logit_soft_cap=30.0), "soft-cap"),
                         (ModelConfig(rope_scaling="yarn", yarn_factor=2.0, yarn_mscale=0.5, yarn_mscale_all_dim=0.0),
                          "mscale_all_dim")]:
        with pytest.raises(hf_config.HFConfigError, match=pattern):
            hf_config.hf_config_from_model(cfg)


def teardown_module():
    if PARITY:
        print("\nHF parity (max abs logit difference, float32): "
              + ", ".join(f"{k}={v:.2e}" for k, v in sorted(PARITY.items())))
