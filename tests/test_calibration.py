"""Calibration tuning, the fast parts: the RLCR reward (hand-computed, the unparseable penalty, inside an RL track),
the confidence request on prompts (EN / KO), ECE / Brier / AUROC on a hand-computed example, the sft method's
annotation, config errors, and experiments/calibration.py building for every size with its sweep."""
import numpy as np
import pytest

from kanana_jax import config as config_lib
from kanana_jax.cli import build_config
from kanana_jax.evals import reliability
from kanana_jax.evals.calibration import (CONFIDENCE_INSTRUCTION, CONFIDENCE_INSTRUCTION_KO, auroc, brier_score,
                                          expected_calibration_error)
from kanana_jax.evals.scoring import score_suite
from kanana_jax.evals.suites import load_suite
from kanana_jax.rewards.calibration import ask_confidence, brier_reward, calibration_rewards
from kanana_jax.rollout.rl_source import Track
from kanana_jax.rollout.verify import Sample
from kanana_jax.train.stages import DRIVERS
from kanana_jax.train.stages import calibration as stage

SIZES = ("tiny", "small", "kanana2_30b_a3b", "kanana2_155b_a17b")


def _sample(text: str) -> Sample:
    return Sample(text, (text,), ({"role": "assistant", "content": text},), 8, "stop")


def test_brier_reward_hand_computed_and_the_unparseable_penalty():
    assert brier_reward(True, 0.8) == pytest.approx(1 - 0.2 ** 2)          # 0.96
    assert brier_reward(False, 0.3) == pytest.approx(-(0.3 ** 2))          # -0.09
    assert brier_reward(True, 1.0) == 1.0 and brier_reward(False, 0.0) == 0.0 and brier_reward(False, 1.0) == -1.0
    assert brier_reward(True, None, unparseable=-0.5) == -0.5
    texts = ["\\boxed{5}\nConfidence: 80%", "\\boxed{4}\nConfidence: 30%", "\\boxed{5}", "\\boxed{5}\n확신도: 60%"]
    rewards, conf = calibration_rewards(texts, [True, False, True, True], unparseable=-0.5)
    assert conf == [0.8, 0.3, None, 0.6]
    np.testing.assert_allclose(rewards, [0.96, -0.09, -0.5, 1 - 0.4 ** 2])
    with pytest.raises(ValueError, match="one verdict per completion"):
        calibration_rewards(texts, [True])


def test_confidence_request_by_language_and_idempotent():
    en = {"id": "a", "lang": "en", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "1+1=?"}]}
    ko = {"id": "b", "lang": "ko", "messages": [{"role": "user", "content": "1+1=?"}]}
    posed = ask_confidence(en)
    assert posed["messages"][1]["content"] == f"1+1=?\n\n{CONFIDENCE_INSTRUCTION}"
    assert posed["messages"][0]["content"] == "s" and en["messages"][1]["content"] == "1+1=?"   # a copy
    assert ask_confidence(posed) == posed
    assert ask_confidence(ko)["messages"][0]["content"].endswith(CONFIDENCE_INSTRUCTION_KO)


def test_calibration_reward_term_in_an_rl_track():
    cfg = config_lib.ExperimentConfig(rl=config_lib.RLConfig(
        tracks=(("cal", "prompts:arith", "calibration", 1.0),), ask_confidence=True,
        unparseable_confidence_reward=-0.5))
    track = Track(cfg.rl.tracks[0], 0, ask_confidence=True)
    by_lang = {r["lang"]: r for r in track.prompts}
    assert by_lang["en"]["messages"][-1]["content"].endswith(CONFIDENCE_INSTRUCTION)
    assert by_lang["ko"]["messages"][-1]["content"].endswith(CONFIDENCE_INSTRUCTION_KO)
    assert all(r["messages"][-1]["content"].endswith((CONFIDENCE_INSTRUCTION, CONFIDENCE_INSTRUCTION_KO))
               for r in track.eval_prompts())
    rec = by_lang["en"]
    right, wrong = rec["answer"], str(int(rec["answer"]) + 1)
    samples = [_sample(f"\\boxed{{{right}}}\nConfidence: 80%"), _sample(f"\\boxed{{{wrong}}}\nConfidence: 30%"),
               _sample(f"\\boxed{{{right}}}"), _sample("no answer\nConfidence: 10%")]
    reward, passed, reasons = track.rewards(cfg, [rec] * 4, samples, salt="t")
    np.testing.assert_allclose(reward, [0.96, -0.09, -0.5, -0.01])
    assert passed.tolist() == [True, False, True, False]
    assert reasons == ["correct", "wrong_answer", "correct/no_confidence", "no_answer"]
    assert track.confidences == [0.8, 0.3, None, 0.1]
    # correctness-only with the request: the confidence line is not part of the answer
    plain = Track(("v", "prompts:arith", "verifiable", 1.0), 0, ask_confidence=True)
    reward, passed, _ = plain.rewards(cfg, [rec] * 2, samples[:2], salt="t")
    assert reward.tolist() == [1.0, 0.0] and plain.confidences is None


def test_reward_specs():
    assert config_lib.parse_reward_spec("calibration") == (("calibration", "", 1.0),)
    assert config_lib.parse_reward_spec("verifiable*0.5+calibration*2") == (("verifiable", "", 0.5),
                                                                             ("calibration", "", 2.0))
    with pytest.raises(config_lib.ConfigError, match="'calibration'"):
        config_lib.parse_reward_spec("calibration:x")


def test_ece_brier_auroc_hand_computed():
    conf, correct = [0.9, 0.8, 0.7, 0.6, 0.6], [1, 0, 1, 0, 1]
    # bins 9, 8, 7 hold one item each: |1-.9| + |0-.8| + |1-.7| = 1.2, weight 1/5; bin 6: acc 1/2 vs .6 -> .1 * 2/5
    assert expected_calibration_error(conf, correct) == pytest.approx(1.2 / 5 + 0.1 * 0.4)
    assert brier_score(conf, correct) == pytest.approx((0.01 + 0.64 + 0.09 + 0.36 + 0.16) / 5)
    # correct {.9, .7, .6} vs wrong {.8, .6}: .9 beats both (2), .7 beats .6 (1), .6 ties .6 (1/2): 3.5 of 6 pairs
    assert auroc(conf, correct) == pytest.approx(3.5 / 6)
    assert auroc([0.9, 0.1], [1, 0]) == 1.0 and auroc([0.1, 0.9], [1, 0]) == 0.0
    assert auroc([0.3, 0.3], [1, 0]) == 0.5
    assert auroc([0.5, 0.7], [1, 1]) is None
    summary = reliability.summarize(conf + [None], correct + [1])
    assert summary["n"] == 6 and summary["stated"] == pytest.approx(5 / 6)
    assert summary["accuracy"] == pytest.approx(4 / 6) and summary["ece"] == pytest.approx(0.28)
    assert summary["overconfidence"] == pytest.approx(3.6 / 5 - 3 / 5) and summary["auroc"] == pytest.approx(3.5 / 6)
    # where the eval runner reports ECE and Brier, AUROC is reported too
    items = load_suite("math")[:2]
    score = score_suite("math", items, [f"\\boxed{{{items[0]['answer']}}}\nConfidence: 90%", "\\boxed{x}\nConfidence: 20%"])
    assert score.summary()["auroc"] == 1.0 and score.summary()["brier"] == pytest.approx((0.01 + 0.04) / 2)


def test_sft_annotation_and_families(tmp_path):
    rec = {"id": "p", "bucket": "arith", "difficulty": 2, "messages": [{"role": "user", "content": "q"}]}
    assert stage.family_of(rec, "difficulty") == "difficulty=2" and stage.family_of(rec, "") == "arith"
    assert stage.family_of(rec, "missing") == "arith"
    out = stage.annotate(rec, "\\boxed{7}\nConfidence: 95%", 0.127, "difficulty=2")
    assert out["messages"][-1] == {"role": "assistant", "content": "\\boxed{7}\nConfidence: 13%"}
    assert stage.annotate(rec, "", 1.0, "x")["messages"][-1]["content"] == "Confidence: 100%"


def _config(method="rl", extra=(), arg=""):
    return build_config(f"experiments/calibration.py:size=tiny,method={method},init_from=/tmp/none{arg}",
                        list(extra))[1]


def test_driver_sub_configs(tmp_path):
    cfg = _config("rl", arg=",reward=verifiable")
    assert cfg.train.stage == "calibration" and "calibration" in DRIVERS
    sub = stage.Driver(cfg, str(tmp_path)).sub_config()
    assert sub.train.stage == "rl" and sub.rl.ask_confidence
    assert sub.rl.tracks == (("calibration", "prompts:arith", "verifiable", 1.0),)
    sub = stage.Driver(_config("sft"), str(tmp_path)).sub_config()
    assert sub.train.stage == "sft" and sub.sft.buckets == (("calibration", f"chat:{tmp_path}/sft_{{split}}.jsonl",
                                                             1.0),)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="'calibration.reward'"):
        _config(extra=["calibration.reward=reward_model:runs/rm"])
    with pytest.raises(config_lib.ConfigError, match="'calibration.method'"):
        _config(extra=["calibration.method=dpo"])
    with pytest.raises(config_lib.ConfigError, match="method="):
        _config("ppo")
    with pytest.raises(config_lib.ConfigError, match="'train.init_from'"):
        stage.check_config(_config(extra=["train.init_from="]))
    with pytest.raises(config_lib.ConfigError, match="'calibration.eval_suites'"):
        stage.check_config(_config(extra=["calibration.eval_suites=chess"]))
    with pytest.raises(config_lib.ConfigError, match="'rl.unparseable_confidence_reward'"):
        _config(extra=["rl.unparseable_confidence_reward=nan"])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", ["rl", "sft"])
def test_config_builds_for_every_size(size, method):
    _, cfg = build_config(f"experiments/calibration.py:size={size},method={method},init_from=runs/x")
    assert cfg.train.stage == "calibration" and cfg.calibration.method == method
    if size.startswith("kanana2"):
        import experiments.calibration as exp
        assert cfg.mesh.fsdp != 1 or cfg.mesh.expert != 1   # the pod layout
        assert exp.topology(f"size={size}")


def test_sweep_expands():
    import experiments.calibration as exp
    from experiments.sweep_dsl import validate
    sweep = exp.sweep("size=tiny,init_from=runs/x")
    assert len(sweep) == 9
    assert {(p["calibration.method"], p.get("calibration.reward", "-")) for p in sweep} == {
        ("rl", "calibration"), ("sft", "-"), ("rl", "verifiable")}
    assert len(validate(sweep, exp.get_config, "size=tiny,init_from=runs/x")) == 9
