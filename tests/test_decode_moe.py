"""Decode-time MoE paths equal the model's MoE module; the weights-stationary expert kernel equals its reference
(interpret mode on CPU) incl. skipped experts, several rounds and a hot expert, and lowers for CUDA at the 30B
shape; greedy decode through each path equals the full-forward argmax (tests/test_generate.py)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kanana_jax.config import ModelConfig
from kanana_jax.generate import decode_moe, expert_kernel
from kanana_jax.generate.decode_model import DecodeOptions
from kanana_jax.model.moe import MoE

CFG = ModelConfig(vocab_size=96, d_model=64, n_layers=3, first_k_dense=1, d_ff=128, n_heads=4, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                  moe_d_ff=32, top_k=2, moe_block_rows=8, init_std=0.25, score_func="sigmoid", norm_topk_prob=True)


def _moe_params(seed=0, layers=2):
    """A stack of `layers` MoE parameter trees [L, ...] (random normal) and its per-layer slices."""
    shapes = jax.eval_shape(MoE(CFG).init, jax.random.PRNGKey(0), jnp.zeros((1, 1, CFG.d_model)))["params"]
    rng = np.random.default_rng(seed)
    stack = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal((layers,) + s.shape), s.dtype),
                         jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, shapes,
                                      is_leaf=lambda x: hasattr(x, "unbox")))
    return stack


@pytest.mark.parametrize("path", ["gather", "capacity", "kernel"])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_decode_moe_paths_equal_the_model_moe(path, rows):
    stack = _moe_params()
    x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, 1, CFG.d_model)), jnp.float32)
    stacks = {w: stack["experts"][w] for w in decode_moe.EXPERT_WEIGHTS}
    for layer in range(2):
        one = jax.tree.map(lambda a: a[layer], stack)
        want = MoE(CFG).apply({"params": one}, x)
        rest = {k: v for k, v in one.items() if k != "experts"}
        got = decode_moe.decode_moe(CFG, rest, x, jnp.int32(layer), stacks, path=path)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_capacity_rounds_cover_a_hot_expert():
    """All copies on one expert (3 rounds of 16 slots): nothing dropped, same as the gather path."""
    rng = np.random.default_rng(1)
    M, D, F, E = 40, 64, 32, 8
    stacks = {"w_gate": jnp.asarray(rng.standard_normal((2, E, D, F)), jnp.float32),
              "w_up": jnp.asarray(rng.standard_normal((2, E, D, F)), jnp.float32),
              "w_down": jnp.asarray(rng.standard_normal((2, E, F, D)), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    experts = jnp.asarray(np.where(np.arange(M) % 10 == 0, 5, 3), jnp.int32)   # 36 copies on expert 3
    want = decode_moe.gather_experts(x, experts, 1, stacks, jnp.float32)
    for kernel in (False, True):
        got = decode_moe.capacity_experts(x, experts, 1, stacks, jnp.float32, n_slots=16, kernel=kernel,
                                          interpret=True)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-3)


def test_expert_kernel_equals_reference_and_skips_empty_experts():
    rng = np.random.default_rng(2)
    L, E, C, D, F = 3, 4, 16, 128, 64
    x = jnp.asarray(rng.standard_normal((E, C, D)), jnp.bfloat16)
    wg, wu = (jnp.asarray(0.1 * rng.standard_normal((L, E, D, F)), jnp.bfloat16) for _ in range(2))
    wd = jnp.asarray(0.1 * rng.standard_normal((L, E, F, D)), jnp.bfloat16)
    rows = jnp.asarray([16, 0, 3, 9], jnp.int32)
    bs = expert_kernel.BlockSizes(bn=32, bk=32)
    h = expert_kernel.gate_up(2, rows, x, wg, wu, bs=bs, interpret=True)
    h_ref = expert_kernel.reference_gate_up(2, rows, x, wg, wu)
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(h_ref, np.float32), rtol=2e-2, atol=2e-2)
    assert not np.asarray(h[1], np.float32).any()
    y = expert_kernel.down(2, rows, h_ref, wd, bs=bs, interpret=True)
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               np.asarray(expert_kernel.reference_down(2, rows, h_ref, wd), np.float32),
                               rtol=2e-2, atol=2e-2)


def test_expert_kernel_names_the_constraint():
    x = jnp.zeros((4, 8, 64), jnp.bfloat16)
    w = jnp.zeros((1, 4, 64, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="capacity C=8"):
        expert_kernel.gate_up(0, jnp.ones((4,), jnp.int32), x, w, w, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        expert_kernel.BlockSizes(bn=48)
    with pytest.raises(ValueError, match="allowed values"):
        DecodeOptions(moe="fast")


def test_capacity_and_auto_choice():
    assert decode_moe.capacity(6, 128) == 16 and decode_moe.capacity(1536, 128) == 32
    assert decode_moe.capacity(6144, 128) == 128
    assert decode_moe.resolve_path("auto", 6, 128) == "gather"
    assert decode_moe.resolve_path("auto", 1536, 128) == "model"
    assert dataclasses.replace(DecodeOptions(), moe="model").moe == "model"


@pytest.mark.parametrize("slots", [16, 32, 128])
def test_expert_kernels_lower_for_cuda_at_the_30b_shape(slots):
    """Pallas Triton lowering (power-of-two value shapes, dynamic indexing of the layer stack) on CPU at the
    Kanana-2-30B-A3B decode shape: 47 MoE layers, 128 experts, D=2048, F=768."""
    L, E, D, F = 47, 128, 2048, 768
    sds = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)  # noqa: E731

    def both(layer, rows, x, wg, wu, wd):
        return expert_kernel.down(layer, rows, expert_kernel.gate_up(layer, rows, x, wg, wu), wd)

    h200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h200)):
        text = jax.jit(both).trace(sds(dt=jnp.int32), sds(E, dt=jnp.int32), sds(E, slots, D), sds(L, E, D, F),
                                   sds(L, E, D, F), sds(L, E, F, D)).lower(lowering_platforms=("cuda",)).as_text()
    assert "gate_up_kernel" in text and "down_kernel" in text
