"""Rejection sampling with real execution (train.stage='rejection_sampling'): rounds of sample -> execute -> keep ->
SFT, every SFT through the one loop (`loop.run`, train.stage='sft') in the round's folder.

    kanana-jax run experiments/rejection_sampling.py:size=tiny,init_from=runs/sft_tiny --workdir runs/rs_tiny

Round r (config: `rejection_sampling.*`, kanana_jax/config_posttrain.py):
  1. policy: round 0 starts from train.init_from (fresh params if empty), round r > 0 from round r-1's SFT
     checkpoint (train/init_from.load: verified params-only restore; its step and params checksum are recorded).
  2. sampling: the round's prompts (the next `prompts_per_round` of a seeded order of the prompt spec's train
     split) in chunks of `chunk_prompts`; each chunk samples K completions per prompt (RolloutGenerator: the K
     share the prompt's prefill; tool prompts run multi-turn episodes in the real tool environment) with the key
     fold_in(seed, r, chunk), and is verified (rollout/verify.py: sandboxed code, tool replay, math checker, IF
     verifiers) on a thread while the next chunk samples. After each chunk its rows are appended to
     samples.jsonl and progress.json is rewritten atomically, so a killed run resumes at the first unfinished
     chunk (finished prompts are not sampled again) and writes exactly what an uninterrupted run writes.
  3. keep: the passing samples, selected per prompt (rollout/rejection.py: all | shortest | best_k, dedup, cap),
     written as the SFT data set kept_train.jsonl, provenance on every record.
  4. SFT: one `loop.run` on kept_train.jsonl (plus the original sft.buckets at share `mix_sft`), init_from = the
     round's policy, held-out loss on data.eval_sources (default: the original SFT buckets, else gold replies of
     the prompts' eval split, heldout_eval.jsonl); it resumes itself like any run.
  5. eval: held-out pass@1 / pass@k on `heldout_prompts` eval-split prompts (same keys for every policy), the
     eval suites on the SFT checkpoint; the round's row goes to round_<r>/metrics.json and WORKDIR/rounds.jsonl.

WORKDIR/  sampling_config.json  rounds.jsonl  heldout_eval.jsonl
          round_<r>/  progress.json  samples.jsonl  kept_train.jsonl  sft/  heldout*.json  eval.json  metrics.json

`run(cfg, workdir, stop_after=N)` stops the running round's SFT after its step N (with a checkpoint); SIGTERM /
Ctrl-C during sampling stops after the chunk in flight. `policy=` replaces the sampler (tests: scripted
completions): policy(params, records, k, key) -> per record k Samples or strings. `hook(event, round=r, ...)` is
called after each chunk ('chunk'), the kept file ('kept'), the SFT ('sft') and the round ('round').
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Callable

import jax

from kanana_jax import config as config_lib
from kanana_jax.config import ConfigError, ExperimentConfig
from kanana_jax.rollout import prompts as prompts_lib
from kanana_jax.rollout import rejection
from kanana_jax.train import run_record
from kanana_jax.train.run_files import read_json, read_jsonl, write_json, write_jsonl

log = logging.getLogger("kanana_jax.train")

KEPT_BUCKET = "rs_kept"
_SAMPLE_TAG, _HELDOUT_TAG = 0x5253, 0x484F
# what a round samples and keeps depends on these; a relaunch that changes one is refused (ResumeConfigError)
SAMPLING_KEYS = ("train.seed", "train.init_from", "model.", "data.tokenizer", "rejection_sampling.samples_per_prompt",
                 "rejection_sampling.temperature", "rejection_sampling.top_p", "rejection_sampling.max_new_tokens",
                 "rejection_sampling.max_turns", "rejection_sampling.prompts", "rejection_sampling.prompts_per_round",
                 "rejection_sampling.chunk_prompts", "rejection_sampling.sample_batch", "rejection_sampling.selection",
                 "rejection_sampling.best_k", "rejection_sampling.max_per_prompt", "rejection_sampling.dedup",
                 "rejection_sampling.mix_sft", "rejection_sampling.sandbox_timeout_s",
                 "rejection_sampling.sandbox_memory_mb", "sft.buckets")
TIMING_KEYS = ("sampling_s", "verify_s", "wall_s", "samples_per_s", "verifications_per_s", "tokens_per_s",
               "overlap_saved_s")


def _key(seed: int, *parts: int):
    key = jax.random.PRNGKey(seed)
    for p in parts:
        key = jax.random.fold_in(key, p)
    return key


def check_config(cfg: ExperimentConfig) -> None:
    """ConfigErrors for settings the driver cannot run, named by key."""
    rs = cfg.rejection_sampling
    if rs.mix_sft > 0 and not cfg.sft.buckets:
        raise ConfigError(f"config key 'rejection_sampling.mix_sft': {rs.mix_sft} mixes in the original SFT buckets, "
                          "but 'sft.buckets' is empty; set sft.buckets (e.g. experiments/sft.py's recipe) or mix_sft=0")
    if cfg.data.mixture:
        raise ConfigError("config key 'data.mixture' must be empty for train.stage='rejection_sampling': each "
                          "round's SFT data are its kept samples (+ sft.buckets at rejection_sampling.mix_sft)")
    if KEPT_BUCKET in [b[0] for b in cfg.sft.buckets]:
        raise ConfigError(f"config key 'sft.buckets': the name {KEPT_BUCKET!r} is the kept samples' bucket; rename it")
    from kanana_jax.evals.suites import SUITE_NAMES
    bad = [s for s in _suites(cfg) if s not in SUITE_NAMES]
    if bad:
        raise ConfigError(f"config key 'rejection_sampling.eval_suites': unknown suite(s) {bad}; allowed: "
                          f"{', '.join(SUITE_NAMES)} (comma-separated, '' for none)")


def _suites(cfg) -> list[str]:
    return [s.strip() for s in cfg.rejection_sampling.eval_suites.split(",") if s.strip()]


def _sampling_config(cfg: ExperimentConfig) -> dict:
    flat = run_record._flatten(run_record._json_normal(config_lib.to_dict(cfg)))  # pylint: disable=protected-access
    return {k: v for k, v in flat.items()
            if any(k.startswith(s) if s.endswith(".") else k == s for s in SAMPLING_KEYS)}


def check_resume(workdir: str, cfg: ExperimentConfig) -> None:
    """WORKDIR/sampling_config.json holds the SAMPLING_KEYS of the first launch; a relaunch that changes one would
    mix two different experiments in one workdir: ResumeConfigError naming the keys."""
    path = os.path.join(workdir, "sampling_config.json")
    saved, now = read_json(path), _sampling_config(cfg)
    if saved is None:
        write_json(path, now)
        return
    changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
    if changed:
        raise run_record.ResumeConfigError(
            f"cannot resume the rejection sampling run in {workdir} with this config: {run_record.describe(changed)} "
            "changed, and its rounds were sampled with the old value(s). Use a new --workdir (e.g. with "
            f"train.init_from={workdir}/round_<r>/sft to start from a round's policy)")


@dataclasses.dataclass
class _Policy:
    spec: str            # train.init_from spec of these params ('' = fresh init)
    params: object
    step: int | None
    checksum: str

    def info(self) -> dict:
        return {"policy": self.spec or "fresh", "params_step": self.step, "params_checksum": self.checksum}


class Driver:
    """One rejection-sampling run in `workdir` (module docstring)."""

    def __init__(self, cfg: ExperimentConfig, workdir: str, *, policy: Callable | None = None,
                 hook: Callable | None = None):
        self.cfg, self.rs, self.workdir = cfg, cfg.rejection_sampling, os.path.abspath(workdir)
        self.hook = hook or (lambda event, **info: None)
        self.mesh = self.rules = None
        if jax.device_count() > 1:
            from kanana_jax import sharding
            self.mesh, self.rules = sharding.make_mesh(cfg.mesh), sharding.logical_rules(cfg.mesh.rules)
        self._generate = policy
        self._policy: _Policy | None = None
        self.train_prompts = prompts_lib.load_prompts(self.rs.prompts, "train")
        self._check_prompts(self.train_prompts, "train")
        self.heldout = []
        if self.rs.heldout_prompts:
            self.heldout = prompts_lib.load_prompts(self.rs.prompts, "eval")[:self.rs.heldout_prompts]
            self._check_prompts(self.heldout, "eval")
        self.eval_sources = self._eval_sources()

    def _check_prompts(self, records: list[dict], split: str):
        key = "config key 'rejection_sampling.prompts'"
        if not records:
            raise ConfigError(f"{key}: {self.rs.prompts!r} has no {split} prompts")
        chat = [r["id"] for r in records if r["bucket"] == "chat"]
        if chat:
            raise ConfigError(f"{key}: chat prompts have no verifier (e.g. {chat[0]!r}); rejection sampling keeps "
                              "verified samples: use math / arith / code / tool / ifeval prompts")
        seen = set()
        for r in records:
            if r["id"] in seen:
                raise ConfigError(f"{key}: prompt id {r['id']!r} appears twice in the {split} split; ids must be "
                                  "unique (samples and provenance refer to them)")
            seen.add(r["id"])

    # ---- paths and state ---------------------------------------------------------------------------------------
    def round_dir(self, r: int) -> str:
        return os.path.join(self.workdir, f"round_{r}")

    def _progress_path(self, r: int) -> str:
        return os.path.join(self.round_dir(r), "progress.json")

    def _progress(self, r: int) -> dict:
        return read_json(self._progress_path(r)) or {"phase": "sampling", "chunks_done": 0, "samples_bytes": 0,
                                                      "timing": {}}

    def _save_progress(self, r: int, progress: dict):
        write_json(self._progress_path(r), progress)

    def round_prompts(self, r: int) -> list[dict]:
        """Round r's prompts: positions [r*N, (r+1)*N) of a permutation of the train split seeded by train.seed,
        cycled (N = prompts_per_round, at most the split's size, so a round holds each prompt at most once)."""
        import numpy as np
        n = min(self.rs.prompts_per_round, len(self.train_prompts))
        order = np.random.default_rng(self.cfg.train.seed).permutation(len(self.train_prompts))
        return [self.train_prompts[int(order[(r * n + i) % len(order)])] for i in range(n)]

    def _eval_sources(self) -> tuple:
        """Held-out sets of every round's SFT: data.eval_sources if set, else the original SFT buckets, else gold
        replies of the prompts' eval split (heldout_eval.jsonl), else none."""
        if self.cfg.data.eval_sources:
            return tuple(self.cfg.data.eval_sources)
        if self.cfg.sft.buckets:
            return tuple((name, path) for name, path, _ in self.cfg.sft.buckets)
        try:
            gold = prompts_lib.gold_records(prompts_lib.load_prompts(self.rs.prompts, "eval"))
        except FileNotFoundError as e:
            log.info("no held-out loss in the SFT rounds: %s", e)
            return ()
        if not gold:
            return ()
        path = os.path.join(self.workdir, "heldout_eval.jsonl")
        if not os.path.isfile(path):
            write_jsonl(path, gold)
        return (("heldout", f"chat:{self.workdir}/heldout_{{split}}.jsonl"),)

    def sft_config(self, r: int, init_spec: str, with_kept: bool = True) -> ExperimentConfig:
        return sft_config(self.cfg, self.round_dir(r), r, init_spec, self.eval_sources, with_kept)

    # ---- the policy --------------------------------------------------------------------------------------------
    def policy(self, spec: str) -> _Policy:
        """The params of `spec` (a train.init_from spec; '' = the fresh init round 0's SFT would start from)."""
        if self._policy is not None and self._policy.spec == spec:
            return self._policy
        self._policy = None
        from kanana_jax.train import init_from
        if spec:
            from kanana_jax.evals.runner import abstract_params
            loaded = init_from.load(spec, self.cfg, abstract_params(self.cfg, self.mesh, self.rules))
            self._policy = _Policy(spec, loaded.params, loaded.provenance["step"], loaded.provenance["checksum"])
        else:
            from kanana_jax.train.builder import build_trainer
            sft_cfg = self.sft_config(0, "")
            trainer = build_trainer(sft_cfg)
            with trainer.context():
                params = trainer.init_params(jax.random.PRNGKey(sft_cfg.train.seed))
            self._policy = _Policy("", params, None, init_from.params_checksum(params))
        return self._policy

    def _sample(self, params, records, k, key) -> list[list]:
        if self._generate is None:
            from kanana_jax.generate.sampler import SamplingParams
            from kanana_jax.rollout.generate import RolloutGenerator
            sampling = SamplingParams(max_new_tokens=self.rs.max_new_tokens, temperature=self.rs.temperature,
                                      top_p=self.rs.top_p)
            self._generate = RolloutGenerator(self.cfg, sampling, batch_size=self.rs.sample_batch,
                                              max_turns=self.rs.max_turns, mesh=self.mesh,
                                              rules=self.rules).generate
        got = self._generate(params, records, k, key)
        if len(got) != len(records) or any(len(s) != k for s in got):
            raise ValueError(f"the policy returned {[len(s) for s in got]} samples for {len(records)} prompts; "
                             f"expected {k} per prompt")
        return [[rejection.as_sample(s) for s in per] for per in got]

    def _verify(self, records, samples):
        from kanana_jax.rewards.code_sandbox import SandboxLimits
        from kanana_jax.rollout.verify import verify
        start = time.perf_counter()
        limits = SandboxLimits(timeout_s=self.rs.sandbox_timeout_s, memory_mb=self.rs.sandbox_memory_mb)
        verdicts = verify(records, samples, limits=limits, max_workers=self.rs.sandbox_workers or None)
        return verdicts, time.perf_counter() - start

    def _chunks(self, records: list[dict]) -> list[list[dict]]:
        c = self.rs.chunk_prompts
        return [records[i:i + c] for i in range(0, len(records), c)]

    # ---- phases ------------------------------------------------------------------------------------------------
    def _sampling(self, r: int, progress: dict, policy: _Policy) -> bool:
        """Samples and verifies round r's remaining chunks; False if a SIGTERM / Ctrl-C stopped it."""
        from kanana_jax.train.preemption import PreemptionWatcher
        path = os.path.join(self.round_dir(r), "samples.jsonl")
        with open(path, "a+b") as f:          # drop whatever a kill left after the last committed chunk
            f.truncate(progress["samples_bytes"])
        chunks, k = self._chunks(self.round_prompts(r)), self.rs.samples_per_prompt
        timing = progress["timing"]
        mark = [time.perf_counter()]

        def commit(c, records, samples, future, gen_s):
            verdicts, ver_s = future.result()
            rows = [rejection.sample_row(rec, j, s, v, round=r, chunk=c, **policy.info())
                    for (rec, j), s, v in zip(records, samples, verdicts)]
            with open(path, "a", encoding="utf-8") as out:
                for row in rows:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())
                size = out.tell()
            now = time.perf_counter()
            for name, value in (("sampling_s", gen_s), ("verify_s", ver_s), ("wall_s", now - mark[0]),
                                ("samples", len(rows)), ("generated_tokens", sum(s.n_tokens for s in samples))):
                timing[name] = timing.get(name, 0) + value
            mark[0] = now
            progress.update(chunks_done=c + 1, samples_bytes=size, n_chunks=len(chunks))
            self._save_progress(r, progress)
            log.info("round %d: chunk %d/%d verified (%d samples, %d pass)", r, c + 1, len(chunks), len(rows),
                     sum(v.passed for v in verdicts))
            self.hook("chunk", round=r, chunk=c)

        pool = concurrent.futures.ThreadPoolExecutor(1) if self.rs.overlap_verify else None
        pending, stopped = None, False
        try:
            with PreemptionWatcher() as watcher:
                for c in range(progress["chunks_done"], len(chunks)):
                    if watcher.should_stop(c):
                        stopped = True
                        break
                    start = time.perf_counter()
                    got = self._sample(policy.params, chunks[c], k, _key(self.cfg.train.seed, _SAMPLE_TAG, r, c))
                    gen_s = time.perf_counter() - start
                    records = [(rec, j) for rec in chunks[c] for j in range(k)]
                    samples = [s for per in got for s in per]
                    if pending is not None:
                        commit(*pending)
                        pending = None
                    job = functools.partial(self._verify, [rec for rec, _ in records], samples)
                    future = pool.submit(job) if pool else _done(job)
                    pending = (c, records, samples, future, gen_s)
                if pending is not None:
                    commit(*pending)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        if stopped:
            log.warning("round %d: stopped by %s after chunk %d of %d; relaunch the same command to resume",
                        r, watcher.reason, progress["chunks_done"], len(chunks))
        return not stopped

    def _keep(self, r: int, progress: dict):
        rows = read_jsonl(os.path.join(self.round_dir(r), "samples.jsonl"))
        kept = rejection.select(rows, self.rs.selection, best_k=self.rs.best_k,
                                max_per_prompt=self.rs.max_per_prompt, dedup=self.rs.dedup)
        by_id = {p["id"]: p for p in self.round_prompts(r)}
        write_jsonl(os.path.join(self.round_dir(r), "kept_train.jsonl"),
                     [rejection.kept_record(by_id[row["prompt_id"]], row) for row in kept])
        t = progress["timing"]
        speed = {"samples_per_s": t["samples"] / max(t["sampling_s"], 1e-9),
                 "verifications_per_s": t["samples"] / max(t["verify_s"], 1e-9),
                 "tokens_per_s": t["generated_tokens"] / max(t["sampling_s"], 1e-9),
                 "overlap_saved_s": t["sampling_s"] + t["verify_s"] - t["wall_s"]}
        progress.update(phase="sft", sampling={**rejection.round_metrics(rows, kept), **speed,
                                               **{k: t[k] for k in ("sampling_s", "verify_s", "wall_s")}})
        self._save_progress(r, progress)
        log.info("round %d: %d samples, pass@1 %.3f, kept %d", r, len(rows), progress["sampling"].get("pass@1", 0),
                 len(kept))
        self.hook("kept", round=r)

    def _sft(self, r: int, progress: dict, stop_after: int | None) -> dict | None:
        """Trains round r's SFT; None when it finished (progress advanced), else the loop's row (stopped)."""
        from kanana_jax.train import loop
        spec_in, kept = progress["policy_in"]["spec"], progress["sampling"]["kept"]
        if not kept and not self.rs.mix_sft:
            log.warning("round %d: no sample passed; no SFT this round, the next round samples the same policy", r)
            progress.update(phase="eval", policy_out=spec_in, sft={"sft_skipped": "no sample passed"})
            self._save_progress(r, progress)
            return None
        sft_cfg = self.sft_config(r, spec_in, with_kept=bool(kept))
        sft_dir = os.path.join(self.round_dir(r), "sft")
        row = loop.run(sft_cfg, sft_dir, stop_after=stop_after)
        steps = run_record.committed_steps(sft_dir)
        if row.get("preempted_at_step") or not steps or steps[-1] < sft_cfg.train.steps:
            return {**row, "stopped_in_round": r}
        row = loop.last_logged_row(sft_dir)
        sft = {f"sft_{k}": v for k, v in row.items() if k in ("loss", "lm_loss") or k.startswith("eval_loss")}
        progress.update(phase="eval", policy_out=f"{sft_dir}:{sft_cfg.train.steps}", sft=sft)
        self._save_progress(r, progress)
        self.hook("sft", round=r)
        return None

    def heldout_pass_rates(self, policy: _Policy, prefix: str = "heldout_") -> dict:
        """pass@1 / pass@k of `policy` on the held-out prompts; the same keys for every policy (common random
        numbers), so rounds differ by their params only."""
        k, rows = self.rs.samples_per_prompt, []
        for c, chunk in enumerate(self._chunks(self.heldout)):
            got = self._sample(policy.params, chunk, k, _key(self.cfg.train.seed, _HELDOUT_TAG, c))
            records = [rec for rec in chunk for _ in range(k)]
            samples = [s for per in got for s in per]
            verdicts, _ = self._verify(records, samples)
            rows += [rejection.sample_row(rec, j % k, s, v) for j, (rec, s, v) in enumerate(zip(records, samples,
                                                                                                verdicts))]
        return rejection.pass_rates(rows, prefix)

    def _eval(self, r: int, progress: dict) -> dict:
        out = {}
        rd = self.round_dir(r)
        if self.heldout:
            if r == 0:
                start = read_json(os.path.join(rd, "heldout_start.json"))
                if start is None:
                    start = self.heldout_pass_rates(self.policy(progress["policy_in"]["spec"]), "heldout_start_")
                    write_json(os.path.join(rd, "heldout_start.json"), start)
                out.update(start)
            end = read_json(os.path.join(rd, "heldout.json"))
            if end is None:
                end = self.heldout_pass_rates(self.policy(progress["policy_out"]))
                write_json(os.path.join(rd, "heldout.json"), end)
            out.update(end)
        suites = _suites(self.cfg)
        if suites:
            report = read_json(os.path.join(rd, "eval.json"))
            checkpoint = _checkpoint_dir(progress["policy_out"])
            if report is None and checkpoint is not None:
                from kanana_jax.evals.runner import run_eval
                from kanana_jax.generate.sampler import SamplingParams
                full = run_eval(checkpoint, suites, limit=self.rs.eval_limit, seed=self.cfg.train.seed,
                                sampling=SamplingParams(max_new_tokens=self.rs.max_new_tokens, temperature=0.0),
                                max_turns=self.rs.max_turns, log=log.info)
                report = {name: {k: v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                          for name, s in full["suites"].items()}
                write_json(os.path.join(rd, "eval.json"), report)
            for name, summary in (report or {}).items():
                out.update({f"eval/{name}/{k}": v for k, v in summary.items()})
        return out

    # ---- rounds ------------------------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> dict:
        spec, row = self.cfg.train.init_from, {}
        for r in range(self.rs.rounds):
            os.makedirs(self.round_dir(r), exist_ok=True)
            progress = self._progress(r)
            if progress["phase"] == "done":
                spec, row = progress["policy_out"], read_json(os.path.join(self.round_dir(r), "metrics.json"))
                continue
            if "policy_in" not in progress:
                pol = self.policy(spec)
                progress["policy_in"] = {"spec": spec, "step": pol.step, "checksum": pol.checksum}
                self._save_progress(r, progress)
            if progress["phase"] == "sampling":
                pol = self.policy(spec)
                if pol.checksum != progress["policy_in"]["checksum"]:
                    raise RuntimeError(f"round {r}: the policy {spec or 'fresh init'} now has params checksum "
                                       f"{pol.checksum}, but the round started sampling with "
                                       f"{progress['policy_in']['checksum']}; its checkpoint changed: use a new "
                                       "--workdir")
                if not self._sampling(r, progress, pol):
                    return {**row, "stopped_in_round": r, "phase": "sampling"}
                self._keep(r, progress)
            if progress["phase"] == "sft":
                stopped = self._sft(r, progress, stop_after)
                if stopped is not None:
                    return stopped
            row = {"round": r, "policy_in": progress["policy_in"]["spec"] or "fresh",
                   "params_step_in": progress["policy_in"]["step"], "params_checksum_in":
                   progress["policy_in"]["checksum"], "policy_out": progress["policy_out"] or "fresh",
                   **progress["sampling"], **progress["sft"], **self._eval(r, progress)}
            write_json(os.path.join(self.round_dir(r), "metrics.json"), row)
            progress["phase"] = "done"
            self._save_progress(r, progress)
            self._write_rounds(r)
            log.info("round %d done: pass@1 %.3f -> kept %d%s", r, row.get("pass@1", 0.0), row["kept"],
                     f", held-out pass@1 {row['heldout_pass@1']:.3f}" if "heldout_pass@1" in row else "")
            self.hook("round", round=r)
            spec = progress["policy_out"]
        return dict(row, final_policy=spec)

    def _write_rounds(self, last: int):
        rows = [read_json(os.path.join(self.round_dir(r), "metrics.json")) for r in range(last + 1)]
        write_jsonl(os.path.join(self.workdir, "rounds.jsonl"), [r for r in rows if r])


def sft_config(cfg: ExperimentConfig, round_dir: str, r: int = 0, init_spec: str = "", eval_sources: tuple = (),
               with_kept: bool = True) -> ExperimentConfig:
    """Round r's SFT run: `cfg` with train.stage='sft', the kept samples of `round_dir` (+ the original buckets at
    mix_sft), init_from = the round's policy, train.seed + r, held-out `eval_sources` (none: no eval). Also the
    config whose train step this stage compiles (e.g. for an AOT check of a slice: any round_dir will do)."""
    mix = cfg.rejection_sampling.mix_sft
    kept = (KEPT_BUCKET, f"chat:{round_dir}/kept_{{split}}.jsonl", 1.0 - mix)
    total = sum(w for _, _, w in cfg.sft.buckets) or 1.0
    original = tuple((n, p, mix * w / total) for n, p, w in cfg.sft.buckets) if mix > 0 else ()
    buckets = ((kept,) if with_kept else ()) + original
    train = dataclasses.replace(cfg.train, stage="sft", init_from=init_spec, seed=cfg.train.seed + r,
                                eval_every=cfg.train.eval_every if eval_sources else 0)
    return dataclasses.replace(cfg, train=train, sft=dataclasses.replace(cfg.sft, buckets=buckets),
                               data=dataclasses.replace(cfg.data, eval_sources=tuple(eval_sources)))


def _done(job):
    future = concurrent.futures.Future()
    future.set_result(job())
    return future


def _checkpoint_dir(spec: str) -> str | None:
    """The checkpoint directory of a workdir spec ('W:STEP' -> W/checkpoints/STEP, 'W' -> W); None for hf / fresh."""
    if not spec or spec.startswith("hf:"):
        return None
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit():
        return os.path.join(head, "checkpoints", tail)
    return spec


def final_run(cfg: ExperimentConfig, workdir: str) -> str:
    """The run directory holding this stage's final policy (of a finished run): the SFT of the last round that
    trained (a round where no sample passed and nothing was mixed in trains nothing and passes its policy on)."""
    for r in reversed(range(cfg.rejection_sampling.rounds)):
        sft = os.path.join(workdir, f"round_{r}", "sft")
        if run_record.committed_steps(sft):
            return sft
    start = _checkpoint_dir(cfg.train.init_from)   # no round trained: the policy it started from is the result
    if start is not None and os.path.isdir(os.path.join(start, "checkpoints")):
        return start
    return os.path.join(workdir, f"round_{cfg.rejection_sampling.rounds - 1}", "sft")


def run(cfg: ExperimentConfig, workdir: str, stop_after: int | None = None, *, policy: Callable | None = None,
        hook: Callable | None = None) -> dict:
    """Runs (or resumes) every round in `workdir`; returns the last round's metrics row (module docstring)."""
    check_config(cfg)
    run_record.prepare_workdir(workdir)
    check_resume(workdir, cfg)
    return Driver(cfg, workdir, policy=policy, hook=hook).run(stop_after)
