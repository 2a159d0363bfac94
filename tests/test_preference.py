"""DPO / IPO losses and gradients against hand-computed values, the chunked log-prob against full logits, pair
batches (bad records named, response-only masks), the reward model's scores, and the configs at every size."""
import json
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import dpo as dpo_config
from experiments import reward_model as rm_config
from experiments.sweep_dsl import expand
from kanana_jax.cli import build_config
from kanana_jax.config import DPOConfig, ExperimentConfig, DataConfig
from kanana_jax.data import preference
from kanana_jax.data.sources import BadRecordError
from kanana_jax.data.tokenizer import make_tokenizer
from kanana_jax.model.logprobs import full_token_logprobs, token_logprobs
from kanana_jax.train.stages import dpo, reward_model

TOK = make_tokenizer("byte")


def _cfg(**dpo_kwargs):
    return ExperimentConfig(dpo=DPOConfig(**dpo_kwargs))


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_loss_and_gradient_equal_the_hand_computed_example():
    # policy / reference response log-probs of (chosen, rejected) for two pairs; the second pair is padding
    logp = jnp.array([[-10.0, -12.0], [-3.0, -1.0]])
    ref = jnp.array([[-11.0, -11.5], [-2.0, -2.0]])
    n_tokens = jnp.array([[4.0, 5.0], [1.0, 1.0]])
    mask = jnp.array([1.0, 0.0])
    beta, eps = 0.1, 0.2
    h = (-10.0 + 11.0) - (-12.0 + 11.5)                                 # 1.5
    want = -(1 - eps) * math.log(_sig(beta * h)) - eps * math.log(_sig(-beta * h))
    loss, metrics = dpo.preference_loss(logp, ref, n_tokens, mask, _cfg(beta=beta, label_smoothing=eps))
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(metrics["reward_margin"]) == pytest.approx(beta * h, rel=1e-6)
    assert float(metrics["rewards/chosen"]) == pytest.approx(beta * 1.0, rel=1e-6)
    assert float(metrics["preference_accuracy"]) == 1.0
    # d loss / d logp_chosen = beta * (-(1 - eps) * (1 - sig(beta h)) + eps * sig(beta h)); rejected: the negative
    d = beta * (-(1 - eps) * (1 - _sig(beta * h)) + eps * _sig(beta * h))
    g = jax.grad(lambda lp: dpo.preference_loss(lp, ref, n_tokens, mask, _cfg(beta=beta, label_smoothing=eps))[0])(logp)
    np.testing.assert_allclose(np.asarray(g), [[d, -d], [0.0, 0.0]], rtol=1e-5, atol=1e-8)


def test_ipo_loss_and_gradient_equal_the_hand_computed_example():
    logp, ref = jnp.array([[-10.0, -12.0]]), jnp.array([[-11.0, -11.5]])
    n_tokens, mask, beta = jnp.array([[4.0, 5.0]]), jnp.array([1.0]), 0.5
    h = 1.0 / 4.0 - (-0.5) / 5.0                                        # per-token mean log-ratios: 0.35
    loss, _ = dpo.preference_loss(logp, ref, n_tokens, mask, _cfg(beta=beta, loss="ipo"))
    assert float(loss) == pytest.approx((h - 1.0 / (2 * beta)) ** 2, rel=1e-6)
    g = jax.grad(lambda lp: dpo.preference_loss(lp, ref, n_tokens, mask, _cfg(beta=beta, loss="ipo"))[0])(logp)
    dh = 2.0 * (h - 1.0 / (2 * beta))
    np.testing.assert_allclose(np.asarray(g), [[dh / 4.0, -dh / 5.0]], rtol=1e-5)


@pytest.mark.parametrize("T,chunk", [(37, 8), (16, 16), (5, 64)])
def test_chunked_logprobs_equal_full_logits_in_value_and_gradient(T, chunk):
    rng = np.random.default_rng(T)
    B, D, V = 3, 16, 50
    h = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    w = jnp.asarray(0.3 * rng.standard_normal((D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32)
    got_lp, got_ent = jax.jit(lambda *a: token_logprobs(*a, chunk=chunk))(h, w, targets)
    want_lp, want_ent = jax.jit(full_token_logprobs)(h, w, targets)
    np.testing.assert_allclose(np.asarray(got_lp), np.asarray(want_lp), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_ent), np.asarray(want_ent), rtol=1e-5, atol=1e-5)
    f = lambda fn: lambda h, w: jnp.sum(fn(h, w, targets)[0] * mask) + 0.1 * jnp.sum(fn(h, w, targets)[1])
    gh, gw = jax.jit(jax.grad(f(lambda *a: token_logprobs(*a, chunk=chunk)), argnums=(0, 1)))(h, w)
    wh, ww = jax.jit(jax.grad(f(full_token_logprobs), argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(np.asarray(gh), np.asarray(wh), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(ww), rtol=1e-4, atol=1e-5)


def test_chunked_logprobs_never_hold_the_full_logits():
    B, T, D, V, chunk = 2, 512, 16, 4096, 64
    f = jax.jit(jax.grad(lambda h, w, t: jnp.sum(token_logprobs(h, w, t, chunk=chunk)[0]), argnums=(0, 1)))
    args = (jax.ShapeDtypeStruct((B, T, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
            jax.ShapeDtypeStruct((B, T), jnp.int32))
    temp = f.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp < B * T * V * 4 / 2, temp     # well under one [B, T, V] float32 array (16 MiB here)


def test_pair_batches_mask_only_the_response_and_name_bad_records(tmp_path):
    it = preference.make_pair_iterator("embedded", DataConfig(seq_len=1024, global_batch_size=4), split="train",
                                       seed=0)
    batch = next(it)
    assert batch["inputs_Bx2xT"].shape == (4, 2, 1024) and batch["pair_mask_B"].tolist() == [1, 1, 1, 1]
    for b in range(4):
        for side in range(2):
            trained = batch["targets_Bx2xT"][b, side][batch["loss_mask_Bx2xT"][b, side] > 0]
            text = TOK.decode(trained.tolist())
            assert "User:" not in text and trained[-1] == TOK.eos_id   # the reply, ending at its end of turn
    state = json.loads(json.dumps(it.get_state()))
    nxt = next(it)
    again = preference.make_pair_iterator("embedded", DataConfig(seq_len=1024, global_batch_size=4),
                                          split="train", seed=0)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["inputs_Bx2xT"], nxt["inputs_Bx2xT"])
    good = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}]}
    bad = {**good, "chosen": [{"role": "user", "content": "4"}]}
    path = tmp_path / "pairs_train.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    it = preference.make_pair_iterator(str(tmp_path / "pairs_{split}.jsonl"),
                                       DataConfig(seq_len=64, global_batch_size=2, shuffle=False), split="train",
                                       seed=0)
    with pytest.raises(BadRecordError, match=r"pairs_train.jsonl line 2: chosen\[0\].role"):
        next(it)


@pytest.mark.parametrize("module,stage", [(dpo_config, "dpo"), (rm_config, "reward_model")])
@pytest.mark.parametrize("size", ["tiny", "small", "kanana2_30b_a3b", "kanana2_155b_a17b"])
def test_pair_stage_configs_build_for_every_size(module, stage, size):
    _, cfg = build_config(f"experiments/{stage}.py:size={size}")
    assert cfg.train.stage == stage


def test_pair_stage_sweeps_expand():
    assert len(expand(dpo_config.sweep(), dpo_config.get_config, "size=tiny")) == 6
    assert len(expand(rm_config.sweep(), rm_config.get_config, "size=tiny")) == 6


def test_reward_head_is_adamw_and_the_backbone_has_no_lm_head():
    from kanana_jax.optim.partition import labels
    _, cfg = build_config("experiments/reward_model.py:size=tiny", ["optimizer.name=muon"])
    model = reward_model.make_model(cfg)
    params = flax.linen.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    assert set(params) == {"backbone", "reward_head"} and "lm_head" not in params["backbone"]
    tags = labels(params)
    assert tags["reward_head"]["kernel"] == "adamw" and tags["backbone"]["moe_layers"]["attn"]["wkv_b"] == "muon"


def test_a_reward_model_started_from_a_language_model_initializes_only_its_head():
    """train.init_from: the loaded params become the backbone as they are; the head is a fresh normal(init_std)
    kernel and a zero bias; the whole model's fresh init (a backbone forward) is not made."""
    from kanana_jax.train.stages import get_stage
    _, cfg = build_config("experiments/reward_model.py:size=tiny", [])
    stage = get_stage("reward_model")
    shapes = flax.linen.unbox(jax.eval_shape(stage.make_model(cfg).init, jax.random.PRNGKey(0),
                                             jnp.zeros((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    loaded = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes["backbone"])

    def no_fresh_init():
        raise AssertionError("the whole model's fresh init was made")

    params = stage.start_params(cfg, no_fresh_init, loaded)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(lambda s: (s.shape, s.dtype), shapes)
    assert all(a is b for a, b in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(loaded)))
    kernel = np.asarray(params["reward_head"]["kernel"])
    assert np.all(np.asarray(params["reward_head"]["bias"]) == 0) and np.all(kernel != 0)
    assert 0.5 * cfg.model.init_std < kernel.std() < 2 * cfg.model.init_std


def test_the_reward_model_ranks_held_out_pairs_above_chance_after_training(tmp_path):
    """A fresh tiny reward model (1 layer, Bradley-Terry, 20 steps) on format pairs: the chosen reply answers in the
    requested '\\boxed{N}', the rejected one gives the same number bare. Held out: 16 pairs of other numbers.
    Measured (seed 0): held-out pair accuracy 1.0 at the evals of steps 10 and 20 (chance: 0.5). The embedded
    pairs (verified vs failing answers) are harder: RESULTS.md has the tiny model's numbers on them."""
    from kanana_jax.train import loop
    for split, numbers in (("train", range(0, 200)), ("eval", range(500, 516))):
        with open(tmp_path / f"pairs_{split}.jsonl", "w") as f:
            for n in numbers:
                prompt = [{"role": "user", "content": f"What is {n}? Answer in \\boxed{{}}."}]
                f.write(json.dumps({"id": f"fmt-{split}-{n}", "bucket": "ifeval", "prompt": prompt,
                                    "chosen": [{"role": "assistant", "content": f"\\boxed{{{n}}}"}],
                                    "rejected": [{"role": "assistant", "content": f"{n}"}]}) + "\n")
    _, cfg = build_config(f"experiments/reward_model.py:size=tiny,pairs={tmp_path}/pairs_{{split}}.jsonl,steps=20,"
                          "batch=8,seq_len=64,lr=2e-3",
                          ["model.n_layers=1", "train.progress_bar=false", "train.tensorboard=false",
                           "train.async_checkpoint=false"])
    loop.run(cfg, str(tmp_path / "rm"))
    with open(tmp_path / "rm" / "metrics.jsonl") as f:
        accuracy = [row["eval_pair_accuracy"] for row in map(json.loads, f) if "eval_pair_accuracy" in row]
    assert accuracy[-1] >= 0.9, accuracy
