"""The whole recipe as one resumable run (train.stage='pipeline'): stages in order, each in WORKDIR/<i>_<name>/,
each trained through its own config (and so through loop.run or its driver), each starting from an earlier
stage's final policy via `train.init_from` (a driver stage's final policy: its `final_run`).

`pipeline.stages` = ((name, config spec, from), ...). A spec is what `kanana-jax run` takes ('path.py[:args]');
'{name}' in it stands for an earlier stage's folder (e.g. the reward model the RL Chat track scores with).
`from` picks the stage whose policy starts this one ('' = the previous stage, '-' = none).
`pipeline.overrides` = ('stage:dotted.key=value', ...) are --set overrides of one stage (the experiment config
experiments/pipeline.py maps its `stage.dotted.key=value` arguments onto them).

After every language-model stage (not a reward model) the eval suites (`pipeline.eval_suites`, greedy,
`eval_limit` items each) score its final policy: accuracy and ECE per suite, kept in the stage's eval.json. The
table over all stages goes to WORKDIR/eval_table.{json,md,png}. Resume: a relaunch skips finished stages (their
runs return at once; an eval.json means scored) and continues the first unfinished one where it stopped.
"""
from __future__ import annotations

import logging
import os
import time

from kanana_jax.config import ConfigError, ExperimentConfig
from kanana_jax.train.run_files import read_json, write_json

log = logging.getLogger("kanana_jax.train")
POLICY_FREE = ("reward_model",)   # stages whose output is not a language model (not evaluated on the suites)


def stage_dir(workdir: str, index: int, name: str) -> str:
    return os.path.join(workdir, f"{index}_{name}")


def stage_configs(cfg: ExperimentConfig, workdir: str) -> list[tuple[str, str, ExperimentConfig]]:
    """[(name, folder, validated config)] of every stage, init_from and '{name}' references resolved."""
    from kanana_jax.cli import build_config
    stages = cfg.pipeline.stages
    if not stages:
        raise ConfigError("config key 'pipeline.stages' is empty (experiments/pipeline.py sets the recipe)")
    dirs = {name: stage_dir(workdir, i, name) for i, (name, _, _) in enumerate(stages)}
    out, previous = [], None
    for i, (name, spec, start) in enumerate(stages):
        for other, path in dirs.items():
            spec = spec.replace("{" + other + "}", path)
        sets = [kv.partition(":")[2] for kv in cfg.pipeline.overrides if kv.partition(":")[0] == name]
        source = previous if start == "" else (None if start == "-" else start)
        if source is not None:
            sets.append(f"train.init_from={dirs[source]}")
        try:
            _, sub = build_config(spec, sets)
        except ConfigError as e:
            raise ConfigError(f"pipeline stage {name!r} ({spec}): {e}") from e
        out.append((name, dirs[name], sub))
        if sub.train.stage not in POLICY_FREE:   # a reward model branches off; the chain goes on past it
            previous = name
    return out


def final_policy_dir(sub: ExperimentConfig, folder: str) -> str:
    from kanana_jax.train.stages import DRIVERS
    while sub.train.stage in DRIVERS and sub.train.stage != "pipeline":
        folder = DRIVERS[sub.train.stage].final_run(sub, folder)
        sub = _read(folder)
    return folder


def _read(folder: str) -> ExperimentConfig:
    from kanana_jax import config as config_lib
    return config_lib.read_run_config(os.path.join(folder, "config.json"))


def final_run(cfg: ExperimentConfig, workdir: str) -> str:
    """The last language-model stage's final policy (so train.init_from=<pipeline run> starts from it)."""
    lm = [(n, d, c) for n, d, c in stage_configs(cfg, workdir) if c.train.stage not in POLICY_FREE]
    name, folder, sub = lm[-1]
    return final_policy_dir(sub, folder)


def evaluate_stage(cfg: ExperimentConfig, name: str, folder: str, sub: ExperimentConfig,
                   earlier: list[dict] = ()) -> dict:
    """The suites' accuracy and ECE for a stage's final policy (cached in <folder>/eval.json). A policy that an
    earlier stage's row already scored (the same run folder at the same step: e.g. rejection sampling that kept no
    sample ends on the SFT policy it started from) takes that row's suites, which name the stage they came from:
    the eval is greedy and seeded, so it would compute the same numbers again."""
    path = os.path.join(folder, "eval.json")
    done = read_json(path)
    if done is not None:
        return done
    from kanana_jax.evals.runner import run_eval
    from kanana_jax.evals.suites import parse_suite_list
    from kanana_jax.generate.sampler import SamplingParams
    from kanana_jax.train import run_record
    policy = final_policy_dir(sub, folder)
    steps = run_record.committed_steps(policy)
    policy_step = steps[-1] if steps else None   # none: run_eval names the missing checkpoint
    same = [r for r in earlier if steps and (r.get("policy"), r.get("policy_step")) == (policy, policy_step)]
    if same:
        scored_by = same[0].get("same_policy_as", same[0]["stage"])
        row = {**same[0], "stage": name, "train_stage": sub.train.stage, "seconds": 0.0, "same_policy_as": scored_by}
        log.info("[%s] final policy %s (step %d) is %s's: its eval rows are reused", name, policy, policy_step,
                 scored_by)
        write_json(path, row)
        return row
    start = time.perf_counter()
    report = run_eval(policy, parse_suite_list(cfg.pipeline.eval_suites),
                      limit=cfg.pipeline.eval_limit, seed=cfg.train.seed,
                      min_prompt_bucket=cfg.pipeline.eval_prompt_bucket,
                      sampling=SamplingParams(max_new_tokens=cfg.pipeline.eval_max_new_tokens, temperature=0.0),
                      log=lambda m: log.info("[%s] %s", name, m))
    row = {"stage": name, "train_stage": sub.train.stage, "checkpoint": report["checkpoint"], "policy": policy,
           "policy_step": policy_step, "seconds": round(time.perf_counter() - start, 1),
           "suites": {s: {"accuracy": r["accuracy"], "ece": r["ece"], "n": r["n"]}
                      for s, r in report["suites"].items()}}
    write_json(path, row)
    return row


def write_table(workdir: str, rows: list[dict]) -> str:
    """eval_table.json / .md / .png over the evaluated stages; returns the Markdown table."""
    suites = list(dict.fromkeys(s for r in rows for s in r["suites"]))
    lines = ["| stage | " + " | ".join(f"{s} acc | {s} ECE" for s in suites) + " |",
             "|---|" + "---|---|" * len(suites)]
    for r in rows:
        cells = []
        for s in suites:
            got = r["suites"].get(s, {})
            ece = got.get("ece")
            cells += [f"{got['accuracy']:.3f}" if got else "-", f"{ece:.3f}" if ece is not None else "-"]
        same = f", {r['same_policy_as']}'s policy" if r.get("same_policy_as") else ""
        lines.append(f"| {r['stage']} ({r['train_stage']}{same}) | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    write_json(os.path.join(workdir, "eval_table.json"), rows)
    with open(os.path.join(workdir, "eval_table.md"), "w") as f:
        f.write(table + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, key in zip(axes, ("accuracy", "ece")):
        for s in suites:
            ys = [r["suites"].get(s, {}).get(key) for r in rows]
            ax.plot(range(len(rows)), [float("nan") if y is None else y for y in ys], "o-", label=s)
        ax.set_xticks(range(len(rows)), [r["stage"] for r in rows], rotation=20)
        ax.set_ylabel(key)
        ax.legend(fontsize=8)
    fig.suptitle("Eval suites after each stage")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "eval_table.png"), dpi=110)
    plt.close(fig)
    return table


def run(cfg: ExperimentConfig, workdir: str, stop_after: int | None = None) -> dict:
    """Runs (or resumes) every stage in order, then the eval table; `stop_after` is passed to each stage's run
    (tests: stop inside a stage). Compiled programs go to WORKDIR/compile_cache (train/compile_cache.py), so a
    relaunch loads what a killed run compiled."""
    from kanana_jax.train import loop
    from kanana_jax.train.compile_cache import persistent_cache
    rows, last = [], {}
    with persistent_cache(os.path.join(workdir, "compile_cache")):
        for name, folder, sub in stage_configs(cfg, workdir):
            log.info("pipeline stage %s (%s) in %s", name, sub.train.stage, folder)
            last = loop.run(sub, folder, stop_after=stop_after)
            if last.get("preempted_at_step") is not None or (stop_after is not None and _stopped(sub, folder)):
                log.info("pipeline stopped inside stage %s; relaunch the same command to resume", name)
                return dict(last, pipeline_stopped_in=name)
            if sub.train.stage not in POLICY_FREE:
                rows.append(evaluate_stage(cfg, name, folder, sub, rows))
    table = write_table(workdir, rows)
    log.info("eval table (%s):\n%s", os.path.join(workdir, "eval_table.md"), table)
    return {**last, "eval_table": os.path.join(workdir, "eval_table.md")}


def _stopped(sub: ExperimentConfig, folder: str) -> bool:
    """Whether a stage's run ended before its last step (stop_after)."""
    from kanana_jax.train import run_record
    try:
        folder = final_policy_dir(sub, folder)
        steps = run_record.committed_steps(folder)
        return not steps or steps[-1] < _read(folder).train.steps
    except (FileNotFoundError, ConfigError):
        return True
