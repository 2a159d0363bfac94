"""Calibration tuning (train.stage='calibration'): the model answers and then states 'Confidence: NN%' (the eval
runner's CONFIDENCE_INSTRUCTION, EN or KO by the record's lang); tuning makes that number match its accuracy.

    kanana-jax run experiments/calibration.py:size=tiny,method=rl,init_from=runs/sft_tiny --workdir runs/calib_rl

One config key picks the method (`calibration.*`, kanana_jax/config_posttrain.py CalibrationConfig):
  rl   the RL stage (train/stages/rl.py, rl.* as usual) through `loop.run` in WORKDIR/rl, one track on
       calibration.prompts asked for confidence (rl.ask_confidence) with the reward calibration.reward; the default
       'calibration' is RLCR's 1[correct] - (q - 1[correct])^2 (rewards/calibration.py; an unparseable confidence
       pays rl.unparseable_confidence_reward), 'verifiable' the correctness-only baseline.
  sft  (Lin et al. 2022, "Teaching models to express their uncertainty in words"; calibration-tuning papers since)
       1. sampling: the start policy answers the train split (`sample_prompts` of a seeded order, K =
          samples_per_prompt each at `temperature`, default greedy = the eval's decoding), posed with the request;
          answers are verified and each item family's accuracy is measured (family = the record field
          calibration.family, e.g. arith 'difficulty', else the bucket);
       2. annotation: every sample becomes an SFT record: the prompt, the model's own answer (its confidence line
          removed) and 'Confidence: NN%' = its family's measured accuracy; written as WORKDIR/sft_train.jsonl;
       3. one SFT (train/stages/sft.py) on those records through `loop.run` in WORKDIR/sft.
Both start from train.init_from (required); train.* / optimizer.* / data.* configure that one run.

Eval, before (train.init_from) and after (the tuned run's last checkpoint): a small held-out eval over the task
family, not the embedded `kanana-jax eval` suites (a tiny model scores 0 on them): greedy answers to
calibration.prompts' eval split (all, or a fixed subset of calibration.eval_prompts) posed with the confidence
request, verified like the RL rewards (rollout/verify.py on the answer without its confidence line), the stated
confidence parsed; accuracy, ECE, Brier and AUROC of confidence vs correctness, overall and per family
(evals/reliability.py). With calibration.eval_suites set, those `kanana-jax eval` suites (runner.run_eval, stated-else-log-prob confidence) are
scored too, per suite. Results: WORKDIR/calibration_eval.json (before, after, delta) and WORKDIR/reliability.png.

WORKDIR/  calibration_config.json  eval_before.json  [sft: samples.jsonl  family_accuracy.json  sft_train.jsonl]
          rl/ | sft/  eval_after.json  calibration_eval.json  reliability.png
Resume: every phase writes its outputs aside and renames them (a kill never leaves half a file), and a phase whose
outputs exist is skipped (family_accuracy.json, written last, marks the sampling done); the RL / SFT run resumes
itself like any `loop.run`. `run(cfg, workdir, stop_after=N)` stops that run after its step N (with a checkpoint).
A relaunch that changes what the phases computed (CALIBRATION_KEYS) is refused: ResumeConfigError.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os

import jax
import numpy as np

from kanana_jax import config as config_lib
from kanana_jax.config import ConfigError, ExperimentConfig
from kanana_jax.evals import reliability
from kanana_jax.evals.calibration import parse_stated_confidence, strip_confidence
from kanana_jax.rewards.calibration import ask_confidence
from kanana_jax.rollout import prompts as prompts_lib
from kanana_jax.train import run_record
from kanana_jax.train.run_files import read_json, write_json, write_jsonl

log = logging.getLogger("kanana_jax.train")

TRACK = "calibration"
_SAMPLE_TAG, _EVAL_TAG = 0x43414C, 0x4556
# what the eval and sampling phases computed depends on these; a relaunch that changes one is refused
CALIBRATION_KEYS = ("train.seed", "train.init_from", "model.", "data.tokenizer", "calibration.method",
                    "calibration.prompts", "calibration.reward", "calibration.family", "calibration.samples_per_prompt",
                    "calibration.temperature", "calibration.sample_prompts", "calibration.max_new_tokens",
                    "calibration.eval_prompts", "calibration.n_bins")


def _suites(cfg: ExperimentConfig) -> list[str]:
    return [s.strip() for s in cfg.calibration.eval_suites.split(",") if s.strip()]


def check_config(cfg: ExperimentConfig) -> None:
    """ConfigErrors for settings the driver cannot run, named by key."""
    if not cfg.train.init_from:
        raise ConfigError("config key 'train.init_from' is empty: calibration tuning starts from a trained policy "
                          "(e.g. train.init_from=runs/sft_tiny); the before/after eval compares against it")
    from kanana_jax.evals.suites import SUITE_NAMES
    bad = [s for s in _suites(cfg) if s not in SUITE_NAMES]
    if bad:
        raise ConfigError(f"config key 'calibration.eval_suites': unknown suite(s) {bad}; allowed: "
                          f"{', '.join(SUITE_NAMES)} (comma-separated, '' for none)")
    if cfg.calibration.method == "sft" and cfg.data.mixture:
        raise ConfigError("config key 'data.mixture' must be empty for calibration.method='sft': the SFT data are "
                          "the annotated samples (WORKDIR/sft_train.jsonl)")


def check_resume(workdir: str, cfg: ExperimentConfig) -> None:
    """WORKDIR/calibration_config.json keeps the CALIBRATION_KEYS of the first launch; a relaunch that changes one
    would mix two experiments in one workdir: ResumeConfigError naming the keys."""
    flat = run_record._flatten(run_record._json_normal(config_lib.to_dict(cfg)))  # pylint: disable=protected-access
    now = {k: v for k, v in flat.items()
           if any(k.startswith(s) if s.endswith(".") else k == s for s in CALIBRATION_KEYS)}
    path = os.path.join(workdir, "calibration_config.json")
    saved = read_json(path)
    if saved is None:
        write_json(path, now)
        return
    changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
    if changed:
        raise run_record.ResumeConfigError(
            f"cannot resume the calibration run in {workdir} with this config: {run_record.describe(changed)} "
            "changed, and its evals / samples were computed with the old value(s); use a new --workdir")


def family_of(record: dict, field: str) -> str:
    """An item's family: '<field>=<value>' when the record has calibration.family's field, else its bucket."""
    if field and field in record:
        return f"{field}={record[field]}"
    return str(record["bucket"])


def confidence_line(accuracy: float) -> str:
    """'Confidence: NN%' with NN the accuracy in whole percent."""
    return f"Confidence: {int(round(100.0 * accuracy))}%"


def annotate(record: dict, answer_text: str, accuracy: float, family: str) -> dict:
    """An SFT message record: the posed prompt, the model's answer without its confidence line, then the family's
    accuracy as the stated confidence."""
    answer = strip_confidence(answer_text or "").strip()
    line = confidence_line(accuracy)
    reply = f"{answer}\n{line}" if answer else line
    return {"id": record["id"], "bucket": record["bucket"], "family": family,
            "messages": list(record["messages"]) + [{"role": "assistant", "content": reply}]}


def _checkpoint_dir(spec: str) -> str | None:
    """The checkpoint directory of a workdir spec ('W:STEP' -> W/checkpoints/STEP, 'W' -> W); None for hf."""
    if not spec or spec.startswith("hf:"):
        return None
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit():
        return os.path.join(head, "checkpoints", tail)
    return spec


class Driver:
    """One calibration-tuning run in `workdir` (module docstring)."""

    def __init__(self, cfg: ExperimentConfig, workdir: str):
        self.cfg, self.cal, self.workdir = cfg, cfg.calibration, os.path.abspath(workdir)
        self.mesh = self.rules = None
        if jax.device_count() > 1:
            from kanana_jax import sharding
            self.mesh, self.rules = sharding.make_mesh(cfg.mesh), sharding.logical_rules(cfg.mesh.rules)
        self._policy = (None, None)
        self._generators = {}

    # ---- prompts, policy, sampling ------------------------------------------------------------------------------
    def prompts(self, split: str) -> list[dict]:
        """calibration.prompts' `split`, posed with the confidence request; chat prompts have no verifier."""
        records = prompts_lib.load_prompts(self.cal.prompts, split)
        key = "config key 'calibration.prompts'"
        if not records:
            raise ConfigError(f"{key}: {self.cal.prompts!r} has no {split} prompts")
        chat = [r["id"] for r in records if r["bucket"] == "chat"]
        if chat:
            raise ConfigError(f"{key}: chat prompts have no verifier (e.g. {chat[0]!r}); calibration needs "
                              "verifiable prompts: math / arith / code / tool / ifeval")
        return [ask_confidence(r) for r in records]

    def policy(self, spec: str):
        """(params, provenance) of a train.init_from spec, cached for the last spec."""
        if self._policy[0] != spec:
            from kanana_jax.evals.runner import abstract_params
            from kanana_jax.train import init_from
            loaded = init_from.load(spec, self.cfg, abstract_params(self.cfg, self.mesh, self.rules))
            self._policy = (spec, (loaded.params, loaded.provenance))
        return self._policy[1]

    def _generate(self, params, records, k: int, key, temperature: float):
        from kanana_jax.generate.sampler import SamplingParams
        from kanana_jax.rollout.generate import RolloutGenerator
        if temperature not in self._generators:
            sampling = SamplingParams(max_new_tokens=self.cal.max_new_tokens, temperature=temperature, top_p=1.0)
            self._generators[temperature] = RolloutGenerator(self.cfg, sampling, batch_size=self.cal.sample_batch,
                                                             max_turns=self.cfg.rl.max_turns, mesh=self.mesh,
                                                             rules=self.rules)
        return self._generators[temperature].generate(params, records, k, key)

    def _score(self, records, samples) -> list[dict]:
        """Per sample: verdict of its answer (confidence lines removed) and its stated confidence."""
        from kanana_jax.rewards.code_sandbox import SandboxLimits
        from kanana_jax.rollout.rl_source import without_confidence
        from kanana_jax.rollout.verify import verify
        verdicts = verify(records, [without_confidence(s) for s in samples],
                          limits=SandboxLimits(timeout_s=self.cfg.rl.sandbox_timeout_s))
        return [{"id": r["id"], "family": family_of(r, self.cal.family), "correct": bool(v.passed),
                 "confidence": parse_stated_confidence(s.text or ""), "reason": v.reason, "response": s.text}
                for r, s, v in zip(records, samples, verdicts)]

    # ---- phases -------------------------------------------------------------------------------------------------
    def evaluate(self, spec: str, tag: str) -> dict:
        """eval_<tag>.json: the held-out calibration report of policy `spec` (computed once)."""
        path = os.path.join(self.workdir, f"eval_{tag}.json")
        done = read_json(path)
        if done is not None:
            return done
        records = self.prompts("eval")
        if self.cal.eval_prompts:   # a fixed subset (the same for every seed and method), spread over the families
            order = np.random.default_rng(0).permutation(len(records))[:self.cal.eval_prompts]
            records = [records[int(i)] for i in sorted(order)]
        params, provenance = self.policy(spec)
        key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.train.seed), _EVAL_TAG)
        samples = [s[0] for s in self._generate(params, records, 1, key, 0.0)]
        items = self._score(records, samples)
        out = {"policy": spec, "params_step": provenance.get("step"), "params_checksum": provenance.get("checksum"),
               "prompts": self.cal.prompts, "split": "eval", "decoding": "greedy",
               "max_new_tokens": self.cal.max_new_tokens, **reliability.report(items, self.cal.n_bins),
               "suites": self._suites(spec), "items": items}
        write_json(path, out)
        o = out["overall"]
        log.info("calibration eval (%s, %s): accuracy %.3f, ECE %s, stated %.2f, mean confidence %s", tag, spec,
                 o["accuracy"], _fmt(o["ece"]), o["stated"], _fmt(o["mean_confidence"]))
        return out

    def _suites(self, spec: str) -> dict:
        names = _suites(self.cfg)
        checkpoint = _checkpoint_dir(spec)
        if not names:
            return {}
        if checkpoint is None:
            log.info("calibration: eval suites skipped for %s (not a workdir checkpoint)", spec)
            return {}
        from kanana_jax.evals.runner import run_eval
        from kanana_jax.generate.sampler import SamplingParams
        full = run_eval(checkpoint, names, limit=self.cal.eval_limit, seed=self.cfg.train.seed,
                        sampling=SamplingParams(max_new_tokens=self.cal.max_new_tokens, temperature=0.0),
                        max_turns=self.cfg.rl.max_turns, log=log.info)
        return {name: {k: v for k, v in s.items() if k in ("n", "accuracy", "ece", "brier", "auroc",
                                                           "n_with_confidence")}
                for name, s in full["suites"].items()}

    def sample_and_annotate(self) -> dict:
        """sft: samples.jsonl, sft_train.jsonl and (last, the done mark) family_accuracy.json."""
        path = os.path.join(self.workdir, "family_accuracy.json")
        done = read_json(path)
        if done is not None:
            return done
        records = self.prompts("train")
        order = np.random.default_rng(self.cfg.train.seed).permutation(len(records))
        n = self.cal.sample_prompts or len(records)
        records = [records[int(i)] for i in order[:n]]
        params, provenance = self.policy(self.cfg.train.init_from)
        k = self.cal.samples_per_prompt
        key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.train.seed), _SAMPLE_TAG)
        got = self._generate(params, records, k, key, self.cal.temperature)
        flat_records = [r for r in records for _ in range(k)]
        items = self._score(flat_records, [s for per in got for s in per])
        by_family = collections.defaultdict(list)
        for it in items:
            by_family[it["family"]].append(it["correct"])
        accuracy = {f: sum(v) / len(v) for f, v in sorted(by_family.items())}
        write_jsonl(os.path.join(self.workdir, "samples.jsonl"),
                     [{**it, "sample": j % k, "params_step": provenance.get("step")} for j, it in enumerate(items)])
        write_jsonl(os.path.join(self.workdir, "sft_train.jsonl"),
                     [annotate(r, it["response"], accuracy[it["family"]], it["family"])
                      for r, it in zip(flat_records, items)])
        out = {"accuracy": accuracy, "samples": {f: len(v) for f, v in by_family.items()},
               "stated_before": sum(it["confidence"] is not None for it in items) / max(len(items), 1),
               "temperature": self.cal.temperature, "samples_per_prompt": k, "prompts": len(records),
               "policy": self.cfg.train.init_from, "params_checksum": provenance.get("checksum")}
        write_json(path, out)
        log.info("calibration: measured family accuracy %s on %d samples; %d SFT records",
                 {f: round(a, 3) for f, a in accuracy.items()}, len(items), len(items))
        return out

    def sub_config(self) -> ExperimentConfig:
        """The one training run: RL with the calibration track, or SFT on the annotated samples."""
        cfg = self.cfg
        if self.cal.method == "rl":
            rl = dataclasses.replace(cfg.rl, tracks=((TRACK, self.cal.prompts, self.cal.reward, 1.0),),
                                     ask_confidence=True)
            return dataclasses.replace(cfg, rl=rl, train=dataclasses.replace(cfg.train, stage="rl"))
        buckets = ((TRACK, f"chat:{self.workdir}/sft_{{split}}.jsonl", 1.0),)
        train = dataclasses.replace(cfg.train, stage="sft", eval_every=cfg.train.eval_every if cfg.data.eval_sources
                                    else 0)
        return dataclasses.replace(cfg, train=train, sft=dataclasses.replace(cfg.sft, buckets=buckets),
                                   data=dataclasses.replace(cfg.data, mixture=()))

    def run(self, stop_after: int | None = None) -> dict:
        from kanana_jax.train import loop
        before = self.evaluate(self.cfg.train.init_from, "before")
        extra = {}
        if self.cal.method == "sft":
            extra["family_accuracy"] = self.sample_and_annotate()
        sub_cfg, sub_dir = self.sub_config(), os.path.join(self.workdir, self.cal.method)
        row = loop.run(sub_cfg, sub_dir, stop_after=stop_after)
        steps = run_record.committed_steps(sub_dir)
        if row.get("preempted_at_step") or not steps or steps[-1] < sub_cfg.train.steps:
            return {**row, "stopped_in": self.cal.method}
        final = f"{sub_dir}:{sub_cfg.train.steps}"
        after = self.evaluate(final, "after")
        summary = self.write_summary(before, after, final, extra)
        return {**{f"before/{k}": v for k, v in before["overall"].items()},
                **{f"after/{k}": v for k, v in after["overall"].items()},
                "method": self.cal.method, "final_policy": final, "delta": summary["delta"]}

    def write_summary(self, before: dict, after: dict, final: str, extra: dict) -> dict:
        keep = ("policy", "params_step", "params_checksum", "overall", "families", "bins", "suites")
        delta = {k: after["overall"][k] - before["overall"][k] for k in ("accuracy", "ece", "brier", "auroc", "stated",
                                                                         "mean_confidence")
                 if after["overall"][k] is not None and before["overall"][k] is not None}
        out = {"method": self.cal.method, "reward": self.cal.reward if self.cal.method == "rl" else None,
               "prompts": self.cal.prompts, "family": self.cal.family, "eval": "held-out eval split, greedy, "
               "stated confidence (train/stages/calibration.py)", "final_policy": final,
               "before": {k: before[k] for k in keep}, "after": {k: after[k] for k in keep}, "delta": delta, **extra}
        write_json(os.path.join(self.workdir, "calibration_eval.json"), out)
        reliability.plot_reliability({"before": before, "after": after}, os.path.join(self.workdir, "reliability.png"),
                                     f"calibration.method={self.cal.method} on {self.cal.prompts} (held-out)")
        log.info("calibration done: accuracy %.3f -> %.3f, ECE %s -> %s (%s)", before["overall"]["accuracy"],
                 after["overall"]["accuracy"], _fmt(before["overall"]["ece"]), _fmt(after["overall"]["ece"]),
                 os.path.join(self.workdir, "calibration_eval.json"))
        return out


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def final_run(cfg: ExperimentConfig, workdir: str) -> str:
    """The run directory holding the tuned policy: WORKDIR/rl or WORKDIR/sft."""
    return os.path.join(workdir, cfg.calibration.method)


def run(cfg: ExperimentConfig, workdir: str, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the calibration tuning in `workdir`; returns before/after numbers (module docstring)."""
    check_config(cfg)
    run_record.prepare_workdir(workdir)
    check_resume(workdir, cfg)
    return Driver(cfg, workdir).run(stop_after)
