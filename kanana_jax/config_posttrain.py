"""Config sections of the post-training stages (SFT, DPO, reward model, RL). Part of kanana_jax/config.py's
ExperimentConfig: validated the same way, every key declared here with its default."""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

from kanana_jax.config_fields import _check, _field


def _check_weighted_sources(entries, key: str):
    for entry in entries:
        ok = (isinstance(entry, (tuple, list)) and len(entry) == 3 and isinstance(entry[0], str)
              and isinstance(entry[1], str) and isinstance(entry[2], (int, float))
              and not isinstance(entry[2], bool) and math.isfinite(entry[2]) and entry[2] > 0)
        _check(ok, key, f"entries must be (name, path, weight > 0), got {entry!r}")
    names = [e[0] for e in entries]
    _check(len(set(names)) == len(names), key, f"names must be unique, got {names}")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning (train.stage='sft'): conversations trained on their assistant tokens only."""
    buckets: tuple = _field((), doc="((name, path, weight), ...): 'sft:chat' (an embedded bucket) or 'chat:FILE' "
                                    "(message records); weights are shares of data.mixture_weights_in units")

    def __post_init__(self):
        _check_weighted_sources(self.buckets, "sft.buckets")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimization (train.stage='dpo') against the frozen `train.init_from` params."""
    pairs: str = _field("embedded", doc="preference pairs: 'embedded' (kanana_jax/data/preference) or a JSONL file")
    beta: float = _field(0.1, lo=1e-6, doc="strength of the implicit KL to the reference")
    label_smoothing: float = _field(0.0, lo=0.0, hi=0.5, doc="dpo: assumed rate of flipped preference labels")
    loss: Literal["dpo", "ipo"] = _field("dpo", doc="dpo: -log sigmoid(beta h); ipo: (h - 1/(2 beta))^2 on "
                                                    "per-token mean log-ratios")


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    """Reward-model training (train.stage='reward_model'): a scalar head, Bradley-Terry loss on pairs."""
    pairs: str = _field("embedded", doc="preference pairs: 'embedded' (kanana_jax/data/preference) or a JSONL file")
    score_l2_coef: float = _field(0.0, lo=0.0, doc="weight of mean(score^2): keeps scores centred at 0 (0 = off)")


# 'calibration': the RLCR reward 1[correct] - (q - 1[correct])^2 on the stated confidence q (rewards/calibration.py)
REWARD_TERM_KINDS = ("verifiable", "reward_model", "calibration")


def parse_reward_spec(spec: str, key: str = "rl.tracks") -> tuple[tuple[str, str, float], ...]:
    """'verifiable' | 'reward_model:WORKDIR' | 'calibration' | terms joined by '+', each optionally '*weight' ->
    ((kind, argument, weight), ...); a bad spec is a ConfigError naming `key`."""
    terms = []
    for term in (t.strip() for t in str(spec).split("+")):
        body, _, w = term.rpartition("*") if "*" in term else (term, "", "1")
        kind, _, arg = body.partition(":")
        try:
            weight = float(w)
        except ValueError:
            weight = float("nan")
        _check(kind in REWARD_TERM_KINDS and math.isfinite(weight) and (kind != "reward_model" or arg)
               and (kind != "calibration" or not arg), key,
               f"reward {spec!r}: each '+' term is 'verifiable', 'reward_model:WORKDIR' or 'calibration', "
               "optionally '*weight'")
        terms.append((kind, arg, weight))
    return tuple(terms)


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """RL (train.stage='rl'): rollouts of the live policy, GRPO or PPO, tracks optimized side by side."""
    algorithm: Literal["grpo", "ppo"] = "grpo"
    tracks: tuple = _field((("logic", "prompts:arith", "verifiable", 1.0),),
                           doc="((name, prompts spec, reward spec, weight), ...): prompts per rollout by weight")
    group_size: int = _field(4, lo=1, doc="samples per prompt (GRPO's group); a rollout batch holds "
                                          "data.global_batch_size prompts (over all tracks) x group_size")
    epochs: int = _field(1, lo=1, doc="learner steps on each rollout batch (old log-probs fixed)")
    std_normalize: bool = _field(True, doc="GRPO: divide group advantages by the group's std (False: Dr. GRPO)")
    track_normalize: bool = _field(True, doc="centre and scale each track's advantages to unit std per batch")
    loss_aggregation: Literal["token_mean", "seq_mean", "dr_grpo"] = "token_mean"
    clip_low: float = _field(0.2, lo=0.0, hi=1.0)
    clip_high: float = _field(0.2, lo=0.0, doc="DAPO clip-higher: e.g. 0.28")
    kl_coef: float = _field(0.01, lo=0.0, doc="weight of the KL to the frozen reference")
    kl_estimator: Literal["k1", "k3"] = "k3"
    kl_mode: Literal["penalty", "reward"] = _field("penalty", doc="penalty: in the loss; reward: per-token reward")
    kl_adaptive: bool = False
    kl_target: float = _field(0.05, lo=1e-6)
    kl_horizon: int = _field(100, lo=1)
    gamma: float = _field(1.0, lo=0.0, hi=1.0, doc="PPO discount")
    lam: float = _field(0.95, lo=0.0, hi=1.0, doc="PPO GAE lambda")
    value_clip: float = _field(0.2, lo=0.0, doc="PPO: clip of the value update (0 off)")
    value_coef: float = _field(0.5, lo=0.0)
    reward_kind: Literal["verifiable", "random", "format", "incorrect"] = _field(
        "verifiable", doc="what verifiable tracks pay: the verdict, a coin flip, the format, or a wrong label")
    random_rate: float = _field(0.5, lo=0.0, hi=1.0)
    temperature: float = _field(1.0, lo=0.0)
    top_p: float = _field(1.0, lo=1e-6, hi=1.0)
    max_new_tokens: int = _field(32, lo=1)
    max_turns: int = _field(3, lo=1, doc="tool prompts: assistant turns per episode")
    rollout_batch: int = _field(64, lo=1, doc="sampler rows per generate call")
    sandbox_timeout_s: float = _field(5.0, lo=0.1)
    eval_prompts: int = _field(32, lo=1, doc="held-out prompts per track, decoded greedily at each eval")
    ask_confidence: bool = _field(False, doc="append the eval runner's 'Confidence: NN%' request (EN, or KO by the "
                                             "record's lang) to each prompt's last user turn; confidence lines are "
                                             "then left out of answer verification")
    unparseable_confidence_reward: float = _field(-1.0, doc="what a 'calibration' reward term pays a completion "
                                                            "without a parseable 'Confidence: NN%' (-1 = the worst "
                                                            "stated confidence: wrong at 100%)")

    def __post_init__(self):
        _check(bool(self.tracks), "rl.tracks", "needs at least one track")
        _check(math.isfinite(self.unparseable_confidence_reward), "rl.unparseable_confidence_reward",
               f"must be a finite number, got {self.unparseable_confidence_reward}")
        for entry in self.tracks:
            ok = (isinstance(entry, (tuple, list)) and len(entry) == 4 and all(isinstance(x, str) for x in entry[:3])
                  and isinstance(entry[3], (int, float)) and not isinstance(entry[3], bool) and entry[3] > 0)
            _check(ok, "rl.tracks", f"entries are (name, prompts spec, reward spec, weight > 0), got {entry!r}")
            parse_reward_spec(entry[2])
        names = [e[0] for e in self.tracks]
        _check(len(set(names)) == len(names), "rl.tracks", f"names must be unique, got {names}")


@dataclasses.dataclass(frozen=True)
class RejectionSamplingConfig:
    """Rejection sampling with real execution (train.stage='rejection_sampling', train/stages/rejection_sampling.py):
    `rounds` of: sample K completions per prompt from the newest policy -> verify each in its real environment ->
    keep the passing ones -> one SFT round on them. train.* / optimizer.* / data.* configure each round's SFT
    (train.steps = SFT steps per round); sft.buckets are the original buckets mixed in at `mix_sft`."""
    rounds: int = _field(3, lo=1)
    samples_per_prompt: int = _field(4, lo=1, doc="K completions per prompt (they share its prefill)")
    temperature: float = _field(1.0, lo=0.0, doc="0 = greedy (then K > 1 repeats one completion)")
    top_p: float = _field(1.0, lo=1e-6, hi=1.0)
    max_new_tokens: int = _field(256, lo=1)
    max_turns: int = _field(4, lo=1, doc="tool prompts: assistant turns per episode")
    prompts: str = _field("prompts:math,code,ifeval", doc="prompt spec (rollout/prompts.py): prompts:NAME[,NAME], "
                                                          "sft:BUCKET[,BUCKET] or FILE.jsonl; its train split")
    prompts_per_round: int = _field(64, lo=1, doc="prompts sampled per round: the next ones of a seeded order of "
                                                  "the train split, cycled")
    chunk_prompts: int = _field(16, lo=1, doc="prompts per sampling chunk: the unit of progress, keys and resume")
    sample_batch: int = _field(64, lo=1, doc="sampler rows per generate call")
    selection: Literal["all", "shortest", "best_k"] = _field(
        "all", doc="per prompt, of its passing samples: all; the shortest one; the best_k of highest reward")
    best_k: int = _field(1, lo=1, doc="selection='best_k': passing samples kept per prompt")
    max_per_prompt: int = _field(0, lo=0, doc="cap on kept samples per prompt after selection (0 = none)")
    dedup: bool = _field(True, doc="drop a passing sample whose completion equals an earlier one of its prompt")
    mix_sft: float = _field(0.0, lo=0.0, hi=0.95, doc="share of the original sft.buckets in each round's SFT "
                                                      "(data.mixture_weights_in units); 0 = kept samples only")
    overlap_verify: bool = _field(True, doc="verify chunk i on a thread while chunk i+1 samples")
    sandbox_timeout_s: float = _field(5.0, lo=0.1, doc="code: wall seconds per program")
    sandbox_memory_mb: int = _field(512, lo=64, doc="code: address-space limit per program")
    sandbox_workers: int = _field(0, lo=0, doc="code: parallel sandboxes (0 = one per CPU)")
    heldout_prompts: int = _field(0, lo=0, doc="eval-split prompts sampled K times after every round (held-out "
                                               "pass@1 / pass@K; round 0 also scores its starting policy); 0 = off")
    eval_suites: str = _field("", doc="comma-separated eval suites (evals/suites.py) scored on each round's SFT "
                                      "checkpoint; '' = none")
    eval_limit: int = _field(16, lo=1, doc="items per eval suite")


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Calibration tuning (train.stage='calibration', train/stages/calibration.py): the model answers, then states
    'Confidence: NN%'. method='rl': the RL stage (rl.* as usual) on `prompts` asked for confidence with the reward
    `reward` (RLCR: 1[correct] - (q - 1[correct])^2). method='sft': the start policy's accuracy per item family is
    measured by sampling `prompts`' train split, and one SFT trains on its own answers annotated with
    'Confidence: NN%' = the family's accuracy. Either way train.* / optimizer.* / data.* configure that one run,
    which starts from train.init_from; the stated confidence is evaluated before and after on the eval split."""
    method: Literal["rl", "sft"] = "rl"
    prompts: str = _field("prompts:arith", doc="verifiable prompt spec (rollout/prompts.py): its train split is "
                                               "trained on (rl) or sampled (sft), its eval split is the eval")
    reward: str = _field("calibration", doc="method='rl': the track's reward spec; 'calibration' = RLCR, "
                                            "'verifiable' = correctness only (the baseline RLCR reports as worsening "
                                            "calibration)")
    family: str = _field("difficulty", doc="record field naming an item's family (sft: the confidence target is its "
                                           "family's accuracy; eval: a row per family); '' or absent: the bucket")
    samples_per_prompt: int = _field(1, lo=1, doc="sft: samples per train prompt (each becomes an SFT record)")
    temperature: float = _field(0.0, lo=0.0, doc="sft: sampling temperature (0 = greedy, the eval's decoding)")
    sample_prompts: int = _field(0, lo=0, doc="sft: train prompts sampled, the first N of a seeded order (0 = all)")
    sample_batch: int = _field(64, lo=1, doc="sampler rows per generate call (sampling and eval)")
    max_new_tokens: int = _field(24, lo=1, doc="new tokens per answer (sft sampling and the eval)")
    eval_prompts: int = _field(0, lo=0, doc="eval-split prompts of the before/after eval (0 = all)")
    n_bins: int = _field(10, lo=1, doc="equal-width bins of the ECE and the reliability diagram")
    eval_suites: str = _field("", doc="comma-separated `kanana-jax eval` suites also scored before and after "
                                      "(runner.run_eval; needs a workdir checkpoint as train.init_from); '' = none")
    eval_limit: int = _field(16, lo=1, doc="items per eval suite")

    def __post_init__(self):
        terms = parse_reward_spec(self.reward, "calibration.reward")
        _check(all(kind != "reward_model" for kind, _, _ in terms), "calibration.reward",
               f"{self.reward!r}: calibration runs on verifiable prompts; use 'calibration' or 'verifiable' terms")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The whole recipe as one run (train.stage='pipeline', train/stages/pipeline.py): stages in order, each in
    its own folder, each starting from an earlier stage's final policy through train.init_from."""
    stages: tuple = _field((), doc="((name, config spec, from), ...): spec 'path.py[:args]' with '{name}' standing "
                                   "for an earlier stage's folder; from: the stage whose final policy is init_from "
                                   "('' = the previous one, '-' = none)")
    overrides: tuple = _field((), doc="('stage:dotted.key=value', ...): --set overrides of one stage's config")
    eval_suites: str = _field("math,code,ifeval,tools", doc="suites scored after each language-model stage")
    eval_limit: int = _field(8, lo=1, doc="items per suite")
    eval_max_new_tokens: int = _field(128, lo=1)
    eval_prompt_bucket: int = _field(16, lo=1, doc="eval prompts are left-padded to a power of two >= this many "
                                                   "tokens: suites whose prompts fall in smaller buckets share one "
                                                   "sampler compile")

    def __post_init__(self):
        names = []
        for entry in self.stages:
            ok = isinstance(entry, (tuple, list)) and len(entry) == 3 and all(isinstance(x, str) for x in entry)
            _check(ok and bool(entry[0]) and bool(entry[1]), "pipeline.stages",
                   f"entries are (name, config spec, from), got {entry!r}")
            _check(entry[0] not in names, "pipeline.stages", f"stage name {entry[0]!r} appears twice")
            _check(entry[2] in ("", "-") or entry[2] in names, "pipeline.stages",
                   f"stage {entry[0]!r} starts from {entry[2]!r}, which is not an earlier stage ({names})")
            names.append(entry[0])
        for item in self.overrides:
            stage, _, kv = str(item).partition(":")
            _check(stage in names and "=" in kv, "pipeline.overrides",
                   f"{item!r}: expected 'stage:dotted.key=value' with stage one of {names}")
