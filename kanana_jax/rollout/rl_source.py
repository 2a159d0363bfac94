"""The RL batch source: every batch is a rollout of the live policy, scored on the host (stages/rl.py's data).

Per rollout r (one batch, reused for rl.epochs learner steps with its old log-probs fixed):
1. prompts: data.global_batch_size prompts drawn from the tracks by weight (each slot goes to the track furthest
   below its share), each track walking its prompt set in a per-epoch shuffled order;
2. samples: rl.group_size completions per prompt from the current params (RolloutGenerator: shared prefill,
   tool tasks as episodes), key = f(seed, r);
3. rewards: each track's reward spec ('verifiable' with rl.reward_kind, 'reward_model:WORKDIR' scores, or a
   weighted sum); the true verdicts are kept apart ('pass_rate/<track>');
4. tensors: prompt + generated turns rendered as in SFT, the generated assistant tokens masked in; old and
   reference log-probs from the training forward (chunked, no [B,T,V] logits); PPO: the critic's values;
5. advantages: GRPO group-relative (rl.std_normalize), PPO GAE; then per-track normalization (rl.track_normalize);
   the KL as a reward (rl.kl_mode='reward') or in the loss, with the (adaptive) coefficient in the source state.
Prompts too long for a row are left out of their track at start; every rollout pads its prompts to one width (the
power of two at or above the longest train prompt left), so with a fixed batch the sampler compiles once per run
(tool episodes' later turns may widen it). Every sample is appended to WORKDIR/rollouts.jsonl (rollout, params
step, prompt id, track, completion, reward, verdict) and each batch saved to WORKDIR/rollouts/<r>.npz, so a
resume in the middle of a rollout's epochs reuses it exactly; a kill during generation regenerates rollout r from
the restored params with the same key. Rows of rollouts.jsonl past the restored position are dropped on resume.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import numpy as np

from kanana_jax.config import ConfigError, ExperimentConfig, parse_reward_spec
from kanana_jax.data.preference import response_tokens
from kanana_jax.evals.calibration import expected_calibration_error, strip_confidence
from kanana_jax.generate.sampler import SamplingParams
from kanana_jax.model.heads import ValueModel
from kanana_jax.model.logprobs import head_weight, token_logprobs
from kanana_jax.rewards.calibration import ask_confidence, calibration_rewards
from kanana_jax.rewards.code_sandbox import SandboxLimits
from kanana_jax.rollout import advantages as adv_lib
from kanana_jax.rollout.generate import RolloutGenerator
from kanana_jax.rollout.prompts import load_prompts
from kanana_jax.rollout.verify import verify
from kanana_jax.train.stages.protocol import default_make_model, subtree

log = logging.getLogger("kanana_jax.rl")
STATE_VERSION = 1
_SCORERS: dict = {}


def _scorer(workdir: str):
    if workdir not in _SCORERS:
        from kanana_jax.rewards.reward_model import RewardModelScorer
        _SCORERS[workdir] = RewardModelScorer(workdir)
    return _SCORERS[workdir]


class Track:
    """One RL track: its prompts (train / eval), reward terms and weight. `ask_confidence` (rl.ask_confidence)
    poses every prompt with the 'Confidence: NN%' request and verifies answers without their confidence lines."""

    def __init__(self, entry, index: int, ask_confidence: bool = False):
        self.name, spec, reward, self.weight = entry[0], entry[1], entry[2], float(entry[3])
        self.index, self.terms = index, parse_reward_spec(reward)
        self.ask_confidence = ask_confidence
        self.prompts = self._posed(load_prompts(spec, "train"))
        if not self.prompts:
            raise ValueError(f"rl.tracks {self.name!r}: prompt set {spec!r} is empty")
        self.spec = spec
        self._eval = None
        self.confidences = None   # the stated confidences of the last `rewards` call with a calibration term

    def _posed(self, records):
        return [ask_confidence(r) for r in records] if self.ask_confidence else records

    def eval_prompts(self):
        if self._eval is None:
            self._eval = self._posed(load_prompts(self.spec, "eval"))
        return self._eval

    def rewards(self, cfg: ExperimentConfig, records, samples, salt: str):
        """(reward [n], true verdict [n] or None when no term verifies, reasons [n])."""
        total, passed, reasons = np.zeros(len(samples)), None, ["scored"] * len(samples)
        answers = [without_confidence(s) for s in samples] if self.ask_confidence else samples
        self.confidences = None
        for kind, arg, weight in self.terms:
            if kind == "verifiable":
                verdicts = verify(records, answers, reward_kind=cfg.rl.reward_kind, random_rate=cfg.rl.random_rate,
                                  salt=salt, limits=SandboxLimits(timeout_s=cfg.rl.sandbox_timeout_s))
                total += weight * np.array([v.reward for v in verdicts])
                passed, reasons = np.array([v.passed for v in verdicts]), [v.reason for v in verdicts]
            elif kind == "calibration":   # RLCR: the true verdict and the stated confidence (rewards/calibration.py)
                verdicts = verify(records, answers, limits=SandboxLimits(timeout_s=cfg.rl.sandbox_timeout_s))
                ok = [v.passed for v in verdicts]
                reward, self.confidences = calibration_rewards([s.text for s in samples], ok,
                                                               cfg.rl.unparseable_confidence_reward)
                total += weight * np.array(reward)
                passed = np.array(ok)
                reasons = [v.reason if q is not None else f"{v.reason}/no_confidence"
                           for v, q in zip(verdicts, self.confidences)]
            else:
                convs = [list(r["messages"]) + list(s.messages) for r, s in zip(records, samples)]
                total += weight * np.asarray(_scorer(arg).score(convs), np.float64)
        return total, passed, reasons


def without_confidence(sample):
    """The sample with its 'Confidence: NN%' lines removed from the text and every turn (for answer checks)."""
    return dataclasses.replace(sample, text=strip_confidence(sample.text),
                               turns=tuple(strip_confidence(t) for t in sample.turns))


def _sampling(cfg: ExperimentConfig, greedy: bool = False) -> SamplingParams:
    return SamplingParams(max_new_tokens=cfg.rl.max_new_tokens, temperature=0.0 if greedy else cfg.rl.temperature,
                          top_p=1.0 if greedy else cfg.rl.top_p)


def evaluate_tracks(cfg: ExperimentConfig, policy_params) -> dict:
    """Greedy rollouts of the first rl.eval_prompts held-out prompts of every track, scored: 'eval_reward/<t>' and,
    for verifiable tracks, 'eval_pass_rate/<t>'."""
    gen = RolloutGenerator(cfg, _sampling(cfg, greedy=True), batch_size=cfg.rl.rollout_batch, max_turns=cfg.rl.max_turns)
    out = {}
    for i, entry in enumerate(cfg.rl.tracks):
        track = Track(entry, i, cfg.rl.ask_confidence)
        records = track.eval_prompts()[:cfg.rl.eval_prompts]
        if not records:
            continue
        samples = [s[0] for s in gen.generate(policy_params, records, 1, jax.random.PRNGKey(cfg.train.seed))]
        reward, passed, _ = track.rewards(cfg, records, samples, salt=f"eval/{cfg.train.seed}")
        out[f"eval_reward/{track.name}"] = float(reward.mean())
        if passed is not None:
            out[f"eval_pass_rate/{track.name}"] = float(passed.mean())
        out.update(_confidence_metrics(track, passed, "eval_"))
    return out


def _confidence_metrics(track: Track, passed, prefix: str = "") -> dict:
    """Stated-confidence numbers of a calibration track's last scored samples: the share that stated one, their
    mean and (evaluation) the ECE over them."""
    if track.confidences is None:
        return {}
    stated = [(q, bool(ok)) for q, ok in zip(track.confidences, passed) if q is not None]
    out = {f"{prefix}confidence_stated/{track.name}": len(stated) / max(len(track.confidences), 1)}
    if stated:
        out[f"{prefix}confidence_mean/{track.name}"] = float(np.mean([q for q, _ in stated]))
        if prefix:
            out[f"{prefix}ece/{track.name}"] = expected_calibration_error([q for q, _ in stated],
                                                                          [ok for _, ok in stated])
    return out


def _keep_prompts_that_fit(cfg: ExperimentConfig, track: Track, renderer) -> int:
    """A sample longer than data.seq_len would be dropped from the batch (counted in rollout/overlong), so a
    prompt that leaves no room for its first answer is left out of the track's train prompts before any sampling
    (with a warning naming how many); a track that would lose most of its prompts stops the run at start.
    Returns the longest kept prompt's length in tokens."""
    budget = cfg.data.seq_len - cfg.rl.max_new_tokens - 1
    lengths = np.array([len(renderer.render_for_generation(r["messages"], r.get("tools"))) for r in track.prompts])
    over = int((lengths > budget).sum())
    if not over:
        return int(lengths.max())
    what = (f"rl.tracks {track.name!r}: {over} of {len(lengths)} prompts (longest {int(lengths.max())} tokens) "
            f"leave no room for rl.max_new_tokens={cfg.rl.max_new_tokens} (+1 end token) within "
            f"data.seq_len={cfg.data.seq_len}")
    if over * 2 > len(lengths):
        raise ConfigError(f"{what}: raise data.seq_len to at least {int(lengths.max()) + cfg.rl.max_new_tokens + 1} "
                          "or lower rl.max_new_tokens")
    track.prompts = [r for r, n in zip(track.prompts, lengths) if n <= budget]
    log.warning("%s: left out of the track; it samples from the %d that fit", what, len(track.prompts))
    return int(lengths[lengths <= budget].max())


class RolloutSource:
    """Rollout batches of stages/rl.py (module docstring); `bind` and `observe` come from the loop."""

    def __init__(self, cfg: ExperimentConfig, *, seed: int, shard_index: int = 0, shard_count: int = 1):
        if shard_count != 1:
            raise ValueError("RL rollouts run in one process: multi-host rollout generation is not built "
                             f"(this run has {shard_count} data shards)")
        self.cfg, self.seed = cfg, int(seed)
        self.tracks = [Track(e, i, cfg.rl.ask_confidence) for i, e in enumerate(cfg.rl.tracks)]
        weights = np.array([t.weight for t in self.tracks])
        self.weights = weights / weights.sum()
        self.generator = RolloutGenerator(cfg, _sampling(cfg), batch_size=cfg.rl.rollout_batch,
                                          max_turns=cfg.rl.max_turns)
        longest = max(_keep_prompts_that_fit(cfg, track, self.generator.renderer) for track in self.tracks)
        self.generator.min_prompt_bucket = longest   # one prompt width for every rollout: one sampler compile
        self.st = {"version": STATE_VERSION, "rollout": -1, "epoch": cfg.rl.epochs, "kl_coef": cfg.rl.kl_coef,
                   "track_pos": [0] * len(self.tracks), "track_epoch": [0] * len(self.tracks),
                   "track_drawn": [0] * len(self.tracks)}
        self.state = self.workdir = None
        self._batch, self._metrics = None, {}
        self._last_next = None
        self._fns = None
        self._log_checked = False

    # ------------------------------------------------------------------ loop hooks

    def bind(self, trainer, workdir: str):
        cfg = self.cfg
        self.workdir = workdir
        os.makedirs(os.path.join(workdir, "rollouts"), exist_ok=True)
        policy = default_make_model(cfg)

        def logprobs(params, inputs, positions, segments, targets):
            h = policy.apply({"params": params}, inputs, positions, segments, return_hidden=True)
            return token_logprobs(h, head_weight(params, cfg.model), targets)[0]

        critic = ValueModel(cfg.model)
        self._fns = {"logprobs": jax.jit(logprobs),
                     "values": jax.jit(lambda p, x, pos, seg: critic.apply({"params": p}, x, pos, seg))}
        self._path = trainer.stage.policy_of(cfg)

    def observe(self, state):
        self.state = state

    def metrics(self) -> dict:
        """The current rollout's numbers (kept in the source state, so a resume inside its epochs logs them too)
        and the timings of this process."""
        return {**self.st.get("rollout_metrics", {}), **self._metrics}

    # ------------------------------------------------------------------ batches

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._last_next is not None:   # since the last batch was handed out: the learner's step (and logging)
            self._metrics["time/learner_s"] = time.perf_counter() - self._last_next
        if self._batch is None or self.st["epoch"] >= self.cfg.rl.epochs:
            if self.state is None or self._fns is None:
                raise RuntimeError("RolloutSource needs bind(trainer, workdir) and observe(state) before a batch")
            start = time.perf_counter()
            self._batch = self._rollout(self.st["rollout"] + 1)
            seconds = time.perf_counter() - start
            self._metrics["time/rollout_s"] = seconds
            # the sampler's speed as the stage sees it (generation, scoring and the log-prob passes included)
            self._metrics["rollout/samples_per_s"] = self._batch["sample_mask_PxG"].size / max(seconds, 1e-9)
            self._metrics["rollout/generated_tokens_per_s"] = self.generator.generated_tokens / max(seconds, 1e-9)
            self.st["rollout"] += 1
            self.st["epoch"] = 0
        else:
            self._metrics["time/rollout_s"] = 0.0   # this step reuses the rollout (rl.epochs)
        self.st["epoch"] += 1
        self._last_next = time.perf_counter()
        return self._batch

    def _draw_prompts(self):
        """[(track index, record)] for one rollout, and the advanced positions (in self.st)."""
        out = []
        for _ in range(self.cfg.data.global_batch_size):
            drawn = np.array(self.st["track_drawn"], np.float64)
            t = int(np.argmax(self.weights * (drawn.sum() + 1) - drawn))
            track = self.tracks[t]
            order = np.random.default_rng([self.seed, 0x726C, t, self.st["track_epoch"][t]]).permutation(
                len(track.prompts))
            out.append((t, track.prompts[int(order[self.st["track_pos"][t]])]))
            self.st["track_drawn"][t] += 1
            self.st["track_pos"][t] += 1
            if self.st["track_pos"][t] == len(track.prompts):
                self.st["track_pos"][t], self.st["track_epoch"][t] = 0, self.st["track_epoch"][t] + 1
        return out

    def _rollout(self, r: int) -> dict:
        cfg, rl = self.cfg, self.cfg.rl
        if not self._log_checked:   # rows of an earlier launch past this point are regenerated now
            self._truncate_log(r - 1)
            self._log_checked = True
        P, G, T = cfg.data.global_batch_size, rl.group_size, cfg.data.seq_len
        policy_params = subtree(self.state.params, self._path)
        step = int(self.state.step)
        drawn = self._draw_prompts()
        records = [rec for _, rec in drawn]
        self.generator.prefilled_rows = self.generator.rows = self.generator.generated_tokens = 0
        samples = self.generator.generate(policy_params, records, G, jax.random.fold_in(jax.random.PRNGKey(self.seed), r))
        rewards = np.zeros((P, G))
        self._confidence = {}
        passed = np.full((P, G), np.nan)
        reasons = [[""] * G for _ in range(P)]
        for t, track in enumerate(self.tracks):
            rows = [p for p, (tt, _) in enumerate(drawn) if tt == t]
            if not rows:
                continue
            recs = [records[p] for p in rows for _ in range(G)]
            flat = [samples[p][g] for p in rows for g in range(G)]
            rew, ok, why = track.rewards(cfg, recs, flat, salt=f"{self.seed}/{r}")
            self._confidence[t] = _confidence_metrics(track, ok)
            rewards[rows] = rew.reshape(len(rows), G)
            if ok is not None:
                passed[rows] = ok.reshape(len(rows), G)
            for k, p in enumerate(rows):
                reasons[p] = why[k * G:(k + 1) * G]
        batch = self._tensors(records, samples, policy_params)
        track_ids = np.array([t for t, _ in drawn], np.int32)
        self._advantages(batch, rewards, track_ids)
        batch["track_ids_P"] = track_ids
        batch["kl_coef_P"] = np.full((P,), self.st["kl_coef"], np.float32)
        self._record(r, step, drawn, samples, rewards, passed, reasons, batch)
        return batch

    def _tensors(self, records, samples, policy_params) -> dict:
        cfg, rl = self.cfg, self.cfg.rl
        P, G, T = cfg.data.global_batch_size, rl.group_size, cfg.data.seq_len
        pad = self.generator.tokenizer.pad_id
        out = {"inputs_PxGxT": np.full((P, G, T), pad, np.int32), "targets_PxGxT": np.full((P, G, T), pad, np.int32),
               "positions_PxGxT": np.broadcast_to(np.arange(T, dtype=np.int32), (P, G, T)).copy(),
               "segment_ids_PxGxT": np.zeros((P, G, T), np.int32), "loss_mask_PxGxT": np.zeros((P, G, T), np.float32),
               "sample_mask_PxG": np.zeros((P, G), np.float32)}
        self._overlong = 0
        for p, (rec, group) in enumerate(zip(records, samples)):
            for g, sample in enumerate(group):
                ids, mask = response_tokens(self.generator.renderer, rec["messages"], list(sample.messages))
                if len(ids) > T:
                    self._overlong += 1
                    continue
                n = len(ids)
                out["inputs_PxGxT"][p, g, :n], out["targets_PxGxT"][p, g, :n - 1] = ids, ids[1:]
                out["segment_ids_PxGxT"][p, g, :n] = 1
                out["loss_mask_PxGxT"][p, g, :n - 1] = mask[1:]
                out["sample_mask_PxG"][p, g] = 1.0 if mask.sum() > 0 else 0.0
        rows = lambda k: out[k].reshape(P * G, T)
        args = (rows("inputs_PxGxT"), rows("positions_PxGxT"), rows("segment_ids_PxGxT"), rows("targets_PxGxT"))
        out["old_logp_PxGxT"] = np.asarray(self._fns["logprobs"](policy_params, *args)).reshape(P, G, T)
        ref = self.state.extra["reference"]
        out["ref_logp_PxGxT"] = np.asarray(self._fns["logprobs"](ref, *args)).reshape(P, G, T)
        if rl.algorithm == "ppo":
            values = self._fns["values"](self.state.params["critic"], *args[:3])
            out["old_values_PxGxT"] = np.asarray(values, np.float32).reshape(P, G, T)
        else:
            out["old_values_PxGxT"] = np.zeros((P, G, T), np.float32)
        return out

    def _advantages(self, batch: dict, rewards_PxG: np.ndarray, track_ids_P: np.ndarray) -> None:
        rl = self.cfg.rl
        P, G, T = batch["loss_mask_PxGxT"].shape
        mask = batch["loss_mask_PxGxT"] * batch["sample_mask_PxG"][..., None]
        valid = batch["sample_mask_PxG"] > 0
        k1 = (batch["old_logp_PxGxT"] - batch["ref_logp_PxGxT"]) * mask
        coef = self.st["kl_coef"]
        track_rows = np.repeat(track_ids_P[:, None], G, axis=1)
        if rl.algorithm == "grpo":
            seq_reward = rewards_PxG - (coef * k1.sum(-1) if rl.kl_mode == "reward" else 0.0)
            adv = adv_lib.group_advantages(seq_reward, valid, rl.std_normalize)
            if rl.track_normalize and len(self.tracks) > 1:
                adv = adv_lib.normalize_per_track(adv, track_rows, valid)
            batch["advantages_PxGxT"] = (adv[..., None] * mask).astype(np.float32)
            batch["returns_PxGxT"] = np.zeros((P, G, T), np.float32)
        else:
            adv_t, ret_t = np.zeros((P, G, T)), np.zeros((P, G, T))
            for p in range(P):
                for g in range(G):
                    idx = np.flatnonzero(mask[p, g] > 0)
                    if not len(idx):
                        continue
                    tok_r = -coef * k1[p, g, idx] if rl.kl_mode == "reward" else np.zeros(len(idx))
                    tok_r[-1] += rewards_PxG[p, g]
                    a, ret = adv_lib.gae(tok_r, batch["old_values_PxGxT"][p, g, idx], rl.gamma, rl.lam)
                    adv_t[p, g, idx], ret_t[p, g, idx] = a, ret
            token_track = np.broadcast_to(track_rows[..., None], (P, G, T))
            adv_t = adv_lib.normalize_per_track(adv_t, token_track if rl.track_normalize else np.zeros_like(token_track),
                                                mask > 0)
            batch["advantages_PxGxT"] = (adv_t * mask).astype(np.float32)
            batch["returns_PxGxT"] = ret_t.astype(np.float32)
        n_tokens = max(mask.sum(), 1.0)
        kl_mean = float(k1.sum() / n_tokens)
        if rl.kl_adaptive:
            self.st["kl_coef"] = adv_lib.adaptive_kl(coef, kl_mean, rl.kl_target, rl.kl_horizon)
        sel = batch["advantages_PxGxT"][mask > 0]
        self.st["rollout_metrics"] = {"rollout/kl_to_reference": kl_mean, "rollout/kl_coef": coef,
                                      "advantage/mean": float(sel.mean()) if sel.size else 0.0,
                                      "advantage/std": float(sel.std()) if sel.size else 0.0}

    def _record(self, r, step, drawn, samples, rewards, passed, reasons, batch):
        """rollouts.jsonl rows, the batch file, and the rollout's metrics."""
        lengths = batch["loss_mask_PxGxT"].sum(-1)
        with open(os.path.join(self.workdir, "rollouts.jsonl"), "a", encoding="utf-8") as f:
            for p, (t, rec) in enumerate(drawn):
                for g, s in enumerate(samples[p]):
                    f.write(json.dumps({"rollout": r, "params_step": step, "prompt_id": rec["id"],
                                        "track": self.tracks[t].name, "sample": g, "completion": s.text,
                                        "turns": len(s.turns), "reward": float(rewards[p, g]),
                                        "passed": None if np.isnan(passed[p, g]) else bool(passed[p, g]),
                                        "reason": reasons[p][g], "tokens": int(lengths[p, g]),
                                        "finish_reason": s.finish_reason}, ensure_ascii=False) + "\n")
        tmp = os.path.join(self.workdir, "rollouts", f"{r}.npz.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **batch)
        os.replace(tmp, os.path.join(self.workdir, "rollouts", f"{r}.npz"))
        m = {"rollout/index": r, "rollout/response_tokens": float(lengths[batch["sample_mask_PxG"] > 0].mean())
             if batch["sample_mask_PxG"].any() else 0.0, "rollout/overlong": self._overlong,
             "rollout/samples": int(np.prod(rewards.shape)),
             "rollout/prefilled_rows": self.generator.prefilled_rows, "rollout/sampled_rows": self.generator.rows}
        for t, track in enumerate(self.tracks):
            rows = [p for p, (tt, _) in enumerate(drawn) if tt == t]
            if rows:
                m[f"reward_mean/{track.name}"] = float(rewards[rows].mean())
                m[f"reward_std/{track.name}"] = float(rewards[rows].std())
                if not np.isnan(passed[rows]).any():
                    m[f"pass_rate/{track.name}"] = float(passed[rows].mean())
                m.update(self._confidence.get(t, {}))
        self.st["rollout_metrics"].update(m)

    # ------------------------------------------------------------------ state

    def get_state(self) -> dict:
        return json.loads(json.dumps(self.st))

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"RL source state version {state.get('version')!r} is not {STATE_VERSION}")
        if len(state["track_pos"]) != len(self.tracks):
            raise ValueError(f"RL source state has {len(state['track_pos'])} tracks, this config {len(self.tracks)}")
        self.st = json.loads(json.dumps(state))
        r = self.st["rollout"]
        self._batch = None
        if r >= 0 and self.st["epoch"] < self.cfg.rl.epochs:
            path = os.path.join(self.workdir, "rollouts", f"{r}.npz")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: the RL checkpoint is inside rollout {r}'s epochs and "
                                        "needs that batch; restore the workdir's rollouts/ folder")
            with np.load(path) as z:
                self._batch = {k: z[k] for k in z.files}
        self._truncate_log(r)

    def _truncate_log(self, last: int) -> None:
        path = os.path.join(self.workdir, "rollouts.jsonl")
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and _row_rollout(line) is not None and _row_rollout(line) <= last]
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def _row_rollout(line: str):
    try:
        return json.loads(line)["rollout"]
    except (json.JSONDecodeError, KeyError):   # a row cut short by a kill
        return None
