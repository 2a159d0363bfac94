"""RL pieces against hand-computed examples: GRPO advantages, per-track normalization, GAE, the KL estimators, the
clipped policy loss and its aggregations, the reward kinds, track weights, and merge-by-averaging."""
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kanana_jax.config import ConfigError, ExperimentConfig, RLConfig, load
from kanana_jax.rollout import advantages as adv
from kanana_jax.rollout.verify import Sample, verify, wrong_label
from kanana_jax.train.merge import average
from kanana_jax.train.stages import rl


def test_group_advantages_hand_computed():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    a = adv.group_advantages(r)
    np.testing.assert_allclose(a[0], np.array([0.5, -0.5, -0.5, 0.5]) / (0.5 + adv.EPS))
    np.testing.assert_array_equal(a[1], 0.0)                      # no spread, no signal
    std = math.sqrt(((1.5 ** 2) + 3 * (0.5 ** 2)) / 4)            # group 3: mean 0.5
    np.testing.assert_allclose(a[2], np.array([1.5, -0.5, -0.5, -0.5]) / (std + adv.EPS))
    np.testing.assert_allclose(adv.group_advantages(r, std_normalize=False)[2], [1.5, -0.5, -0.5, -0.5])
    valid = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], bool)  # invalid samples leave the group
    np.testing.assert_allclose(adv.group_advantages(r, valid, std_normalize=False)[0], [0.5, -0.5, 0, 0])


def test_per_track_normalization_puts_tracks_on_one_scale():
    a = np.array([10.0, -10.0, 30.0, 0.1, -0.1, 0.3])
    tracks = np.array([0, 0, 0, 1, 1, 1])
    out = adv.normalize_per_track(a, tracks, np.ones(6, bool))
    for t in (0, 1):
        assert abs(out[tracks == t].mean()) < 1e-9 and abs(out[tracks == t].std() - 1.0) < 1e-9
    np.testing.assert_allclose(out[:3], out[3:], atol=1e-12)      # same shape, whatever the reward scale


def test_gae_hand_computed():
    r, v, gamma, lam = np.array([0.0, 0.0, 1.0]), np.array([0.5, 0.6, 0.7]), 0.9, 0.8
    d2 = 1.0 - 0.7
    d1 = 0.0 + gamma * 0.7 - 0.6
    d0 = 0.0 + gamma * 0.6 - 0.5
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    got_a, got_r = adv.gae(r, v, gamma, lam)
    np.testing.assert_allclose(got_a, [a0, a1, a2])
    np.testing.assert_allclose(got_r, np.array([a0, a1, a2]) + v)


def test_adaptive_kl_moves_towards_the_target():
    assert adv.adaptive_kl(0.1, kl=0.2, target=0.1, horizon=10) == pytest.approx(0.1 * (1 + 0.2 / 10))
    assert adv.adaptive_kl(0.1, kl=0.05, target=0.1, horizon=10) == pytest.approx(0.1 * (1 - 0.2 / 10))


def test_kl_estimators_hand_computed():
    logp, ref = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])
    np.testing.assert_allclose(rl.kl_estimate(logp, ref, "k1"), [0.5, -1.0])
    x = np.array([-0.5, 1.0])                                      # ref - logp
    np.testing.assert_allclose(rl.kl_estimate(logp, ref, "k3"), np.exp(x) - x - 1, rtol=1e-6)


def test_aggregations_hand_computed():
    per = jnp.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(rl.aggregate(per, mask, "token_mean", 8)[0]) == pytest.approx(10 / 4)
    assert float(rl.aggregate(per, mask, "seq_mean", 8)[0]) == pytest.approx((2.0 + 4.0) / 2)
    assert float(rl.aggregate(per, mask, "dr_grpo", 8)[0]) == pytest.approx(10 / (2 * 8))
    assert float(rl.aggregate(per, mask, "token_mean", 8)[1]) == 4 and float(rl.aggregate(per, mask, "seq_mean", 8)[1]) == 2


def test_clipped_objective_hand_computed():
    # ratio 1.5 with A > 0 is clipped at 1 + clip_high; ratio 0.5 with A < 0 at 1 - clip_low
    adv_, ratio = jnp.array([1.0, -1.0, 1.0]), jnp.array([1.5, 0.5, 1.1])
    clip_low, clip_high = 0.2, 0.28
    pg = jnp.maximum(-adv_ * ratio, -adv_ * jnp.clip(ratio, 1 - clip_low, 1 + clip_high))
    np.testing.assert_allclose(pg, [-1.28, 0.8, -1.1])


def test_reward_kinds_and_the_random_rate():
    rec = {"id": "p", "bucket": "arith", "answer": "7", "messages": []}
    right, wrong, none = (Sample(t, (t,), (), 3, "stop_token") for t in ("\\boxed{7}", "\\boxed{8}", "seven"))
    v = verify([rec] * 3, [right, wrong, none])
    assert [x.passed for x in v] == [True, False, False] and [x.reason for x in v] == ["correct", "wrong_answer",
                                                                                      "no_answer"]
    assert [x.reward for x in verify([rec] * 3, [right, wrong, none], reward_kind="format")] == [1.0, 1.0, 0.0]
    assert wrong_label("7") == "8"
    assert [x.reward for x in verify([rec] * 3, [right, wrong, none], reward_kind="incorrect")] == [0.0, 1.0, 0.0]
    many = verify([rec] * 4000, [wrong] * 4000, reward_kind="random", random_rate=0.3, salt="s")
    rate = np.mean([x.reward for x in many])
    assert abs(rate - 0.3) < 0.03 and not any(x.passed for x in many)   # the rate, and the true verdict kept


def test_tracks_share_prompts_by_weight():
    from kanana_jax.rollout.rl_source import RolloutSource
    cfg = load({"train": {"stage": "rl"}, "data": {"global_batch_size": 10, "seq_len": 512},
                "rl": {"tracks": [["a", "prompts:arith", "verifiable", 0.7], ["b", "prompts:math", "verifiable", 0.3]]}})
    src = RolloutSource(cfg, seed=0)
    drawn = [t for _ in range(50) for t, _ in src._draw_prompts()]
    assert abs(np.mean(np.array(drawn) == 0) - 0.7) < 0.01
    assert src.get_state()["track_drawn"] == [350, 150]


def test_prompts_that_cannot_fit_their_answer_stop_at_start_naming_the_keys():
    """Samples longer than data.seq_len are dropped from the batch: a track whose prompts mostly leave no room for
    rl.max_new_tokens would train on nothing, so the source refuses it."""
    from kanana_jax.config import ConfigError
    from kanana_jax.rollout.rl_source import RolloutSource
    cfg = load({"train": {"stage": "rl"}, "data": {"global_batch_size": 2, "seq_len": 128},
                "rl": {"tracks": [["b", "prompts:math", "verifiable", 1.0]], "max_new_tokens": 32}})
    with pytest.raises(ConfigError, match=r"rl.tracks 'b'.*rl.max_new_tokens=32.*data.seq_len=128.*at least \d+"):
        RolloutSource(cfg, seed=0)


def test_prompts_too_long_for_a_row_are_left_out_before_sampling(caplog):
    from kanana_jax.rollout.rl_source import RolloutSource
    rows = lambda seq_len: load({"train": {"stage": "rl"}, "data": {"global_batch_size": 2, "seq_len": seq_len},
                                 "rl": {"tracks": [["chat", "sft:chat", "verifiable", 1.0]], "max_new_tokens": 24}})
    everything = RolloutSource(rows(4096), seed=0).tracks[0].prompts
    with caplog.at_level(logging.WARNING, logger="kanana_jax.rl"):
        src = RolloutSource(rows(512), seed=0)
    kept = src.tracks[0].prompts
    render = src.generator.renderer.render_for_generation
    assert 0 < len(everything) - len(kept) < len(everything) // 2
    assert all(len(render(r["messages"], r.get("tools"))) <= 512 - 24 - 1 for r in kept)
    assert kept == [r for r in everything if len(render(r["messages"], r.get("tools"))) <= 487]   # order kept
    # every rollout pads prompts to one width (the longest kept), so the sampler compiles once per run
    assert src.generator.min_prompt_bucket == max(len(render(r["messages"], r.get("tools"))) for r in kept)
    assert f"{len(everything) - len(kept)} of {len(everything)} prompts" in caplog.text and "left out" in caplog.text


def test_bad_track_specs_are_named():
    with pytest.raises(ConfigError, match="rl.tracks.*reward 'rm:x'"):
        RLConfig(tracks=(("a", "prompts:arith", "rm:x", 1.0),))
    with pytest.raises(ConfigError, match="rl.tracks"):
        RLConfig(tracks=())
    assert RLConfig(tracks=(("a", "prompts:arith", "verifiable*0.7+reward_model:/r*0.3", 1.0),)).tracks


def test_merge_by_averaging_equals_the_hand_computed_average():
    a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([3.0], jnp.bfloat16)}
    b = {"w": jnp.array([3.0, 6.0]), "b": jnp.array([5.0], jnp.bfloat16)}
    out = average([a, b], [0.25, 0.75])
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    assert out["b"].dtype == jnp.bfloat16 and float(out["b"][0]) == 4.5
    with pytest.raises(ValueError):
        average([a], [0.5, 0.5])


@pytest.mark.parametrize("size", ["tiny", "small", "kanana2_30b_a3b", "kanana2_155b_a17b"])
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_rl_config_builds_for_every_size(size, algorithm):
    from kanana_jax.cli import build_config
    _, cfg = build_config(f"experiments/rl.py:size={size},algorithm={algorithm},chat_rm=runs/rm", [])
    assert cfg.train.stage == "rl" and cfg.rl.algorithm == algorithm
    assert [t[0] for t in cfg.rl.tracks] == ["logic", "chat"]
    if size.startswith("kanana2"):
        assert cfg.mesh.fsdp != 1 or cfg.mesh.expert != 1   # the pod layout


def test_rl_sweep_expands_over_the_reward_kinds():
    import experiments.rl as exp
    from experiments.sweep_dsl import validate
    sweep = exp.sweep("size=tiny")
    assert len(sweep) == 12 and {p["rl.reward_kind"] for p in sweep} == {"verifiable", "random", "format", "incorrect"}
    assert len(validate(sweep, exp.get_config, "size=tiny")) == 12


@pytest.mark.parametrize("size", ["tiny", "kanana2_30b_a3b"])
def test_pipeline_builds_every_stage_for_its_size(size, tmp_path):
    from kanana_jax.cli import build_config
    from kanana_jax.train.stages.pipeline import stage_configs
    _, cfg = build_config(f"experiments/pipeline.py:size={size}", [])
    stages = stage_configs(cfg, str(tmp_path))
    assert [s.train.stage for _, _, s in stages] == ["pretrain", "midtrain", "sft", "reward_model",
                                                    "rejection_sampling", "rl", "calibration"]
    assert all(s.model.n_layers == stages[0][2].model.n_layers for _, _, s in stages)
