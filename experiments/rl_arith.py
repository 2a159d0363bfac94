"""RL studies a tiny model can run on a CPU: the clean-base reward ablation, and parallel tracks vs tracks trained
apart and merged.

    python -m experiments.rl_arith --study rewards --workdir runs/rl_arith --out experiments/results --seeds 0,1,2
    python -m experiments.rl_arith --study tracks --workdir runs/rl_arith --out experiments/results --seeds 0,1

Two tasks a 2-layer byte-level model can learn in a few dozen RL steps (written under WORKDIR/data):
- 'seven': '#N Answer in \\boxed{}.' (N a prompt number) whose verified answer is always 7;
- 'copy': 'D=? Answer in \\boxed{}.' whose answer is the digit D.
Warm start (shared by every run): a short SFT on both prompt sets with replies '\\boxed{d}', d a uniform random
digit unrelated to the prompt: it teaches the format and nothing about the answers, so each task starts near a
pass rate of 0.1 and whatever RL changes is what the reward taught.
- rewards: GRPO (experiments/rl.py) on 'seven' with rl.reward_kind = verifiable | random | format | incorrect
  (Shao et al. 2025's spurious rewards; incorrect pays for 8, the gold answer + 1); per seed and kind the true
  pass rate of the training samples per step and the held-out pass rate (greedy, the eval split) before and after.
- tracks: the two tasks as two verifiable tracks trained jointly (half the prompts each, advantages normalized per
  track) and each alone for the same steps, then the two lone runs merged by parameter averaging (kanana-jax
  merge, weights 0.5/0.5); held-out pass rates of each track for each policy.
Every run is a `loop.run` in its own folder under --workdir and resumes; rerunning continues where it stopped.
Writes rl_<study>.json and rl_<study>.png under --out and prints the table for RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETS = ["train.progress_bar=false", "train.tensorboard=false", "data.chat_too_long=drop"]
KINDS = ("verifiable", "random", "format", "incorrect")


def write_tasks(workdir: str) -> dict:
    """{'seven': prompt spec, 'copy': prompt spec, 'warm': SFT chat spec} under WORKDIR/data (module docstring)."""
    data = os.path.join(workdir, "data")
    os.makedirs(data, exist_ok=True)
    prompt = {"seven": lambda i, r: (f"#{i} Answer in \\boxed{{}}.", "7"),
              "copy": lambda i, r: (lambda d: (f"{d}=? Answer in \\boxed{{}}.", str(d)))(r.randrange(10))}
    for split, n in (("train", 64), ("eval", 16)):
        warm_path = os.path.join(data, f"warm_{split}.jsonl")
        if os.path.isfile(warm_path):
            continue
        digits, warm = random.Random(f"warm/{split}"), []
        for task, make in prompt.items():
            r = random.Random(f"{task}/{split}")
            with open(os.path.join(data, f"{task}_{split}.jsonl"), "w") as f:
                for i in range(n):
                    text, answer = make(i, r)
                    messages = [{"role": "user", "content": text}]
                    f.write(json.dumps({"id": f"{task}-{split}-{i}", "bucket": "arith", "lang": "en", "difficulty": 1,
                                        "messages": messages, "answer": answer, "solution_expr": answer}) + "\n")
                    reply = {"role": "assistant", "content": f"\\boxed{{{digits.randrange(10)}}}"}
                    warm.append({"id": f"warm-{task}-{split}-{i}", "bucket": "arith", "messages": messages + [reply]})
        with open(warm_path + ".tmp", "w") as f:
            f.writelines(json.dumps(w) + "\n" for w in warm)
        os.replace(warm_path + ".tmp", warm_path)
    spec = lambda name: os.path.join(data, name + "_{split}.jsonl")
    return {"seven": spec("seven"), "copy": spec("copy"), "warm": "chat:" + spec("warm")}


def warm_start(workdir: str, a, warm_data: str) -> str:
    from kanana_jax.cli import build_config
    from kanana_jax.train import loop
    out = os.path.join(workdir, "warmstart")
    _, cfg = build_config(f"experiments/sft.py:size=tiny,steps={a.warm_steps},batch=16,seq_len=96,chat=1",
                          [*SETS, f"model.n_layers={a.layers}", f'sft.buckets=[["arith", "{warm_data}", 1.0]]',
                           "train.eval_every=0", f"train.checkpoint_every={a.warm_steps}",
                           "optimizer.learning_rate=3e-3", "optimizer.warmup_steps=5"])
    loop.run(cfg, out)
    return out


def rl_config(a, init_from: str, tracks: list, seed: int, kind: str = "verifiable"):
    from kanana_jax.cli import build_config
    _, cfg = build_config(f"experiments/rl.py:size=tiny,algorithm={a.algorithm},steps={a.steps},prompts={a.prompts},"
                          f"group={a.group},seq_len=96,max_new_tokens=12,lr={a.lr},kl={a.kl},seed={seed},"
                          f"reward={kind},init_from={init_from}",
                          [*SETS, f"model.n_layers={a.layers}", f"rl.tracks={json.dumps(tracks)}",
                           f"train.eval_every={a.steps}", f"train.checkpoint_every={a.steps}", "rl.eval_prompts=16"])
    return cfg


def evaluate(cfg, workdir: str) -> dict:
    """Held-out greedy pass rates of cfg's tracks for the final params of `workdir`."""
    from kanana_jax.convert.orbax_hf import restore_params
    from kanana_jax.rollout.rl_source import evaluate_tracks
    _, params = restore_params(workdir, cfg=cfg)
    return evaluate_tracks(cfg, params)


def _curves(workdir: str, track: str) -> dict:
    """Per logged step: the reward paid and the true pass rate of the training samples."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"reward": [r.get(f"reward_mean/{track}") for r in rows],
            "pass": [r.get(f"pass_rate/{track}") for r in rows]}


def study_rewards(a, warm: str, tasks: dict) -> dict:
    from kanana_jax.train import loop
    tracks = [["seven", tasks["seven"], "verifiable", 1.0]]
    before = evaluate(rl_config(a, warm, tracks, 0), warm)["eval_pass_rate/seven"]
    rows = []
    for seed in a.seeds:
        for kind in KINDS:
            cfg = rl_config(a, warm, tracks, seed, kind)
            out = os.path.join(a.workdir, f"rewards_{kind}_s{seed}")
            loop.run(cfg, out)
            rows.append({"seed": seed, "kind": kind, "before": before,
                         "after": evaluate(cfg, out)["eval_pass_rate/seven"], **_curves(out, "seven")})
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("reward", "pass")}), flush=True)
    return {"before": before, "rows": rows}


def study_tracks(a, warm: str, tasks: dict) -> dict:
    from kanana_jax.train import loop
    from kanana_jax.train.merge import merge_workdirs
    both = [["seven", tasks["seven"], "verifiable", 0.5], ["copy", tasks["copy"], "verifiable", 0.5]]
    names = [t[0] for t in both]
    base = evaluate(rl_config(a, warm, both, 0), warm)
    rows = []
    for seed in a.seeds:
        runs = {}
        for name, tracks in (("joint", both), ("seven_only", [both[0][:3] + [1.0]]),
                             ("copy_only", [both[1][:3] + [1.0]])):
            runs[name] = os.path.join(a.workdir, f"tracks_{name}_s{seed}")
            loop.run(rl_config(a, warm, tracks, seed), runs[name])
        runs["merged"] = os.path.join(a.workdir, f"tracks_merged_s{seed}")
        if not os.path.isdir(os.path.join(runs["merged"], "checkpoints")):
            merge_workdirs([runs["seven_only"], runs["copy_only"]], [0.5, 0.5], runs["merged"])
        cfg = rl_config(a, warm, both, seed)
        row = {"seed": seed}
        for name, path in runs.items():
            got = evaluate(cfg, path)
            row[name] = {t: got[f"eval_pass_rate/{t}"] for t in names}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"before": {t: base[f"eval_pass_rate/{t}"] for t in names}, "rows": rows}


def markdown(study: str, res: dict) -> str:
    import numpy as np
    if study == "rewards":
        lines = ["| reward | seeds | train pass rate, first -> last 5 steps | held-out pass@1 before | "
                 "after (mean +- std) |", "|---|---|---|---|---|"]
        for kind in KINDS:
            rows = [r for r in res["rows"] if r["kind"] == kind]
            after = np.array([r["after"] for r in rows])
            curves = np.array([r["pass"] for r in rows], dtype=float)
            first, last = np.nanmean(curves[:, :5]), np.nanmean(curves[:, -5:])
            lines.append(f"| {kind} | {len(rows)} | {first:.3f} -> {last:.3f} | {res['before']:.3f} | "
                         f"{after.mean():.3f} +- {after.std():.3f} |")
        return "\n".join(lines)
    names = list(res["before"])
    lines = ["| policy | seeds | " + " | ".join(f"{t} held-out pass@1" for t in names) + " |",
             "|---|---|" + "---|" * len(names),
             "| warm start | - | " + " | ".join(f"{res['before'][t]:.3f}" for t in names) + " |"]
    for name in ("joint", "seven_only", "copy_only", "merged"):
        cells = []
        for t in names:
            v = np.array([r[name][t] for r in res["rows"]])
            cells.append(f"{v.mean():.3f} +- {v.std():.3f}")
        lines.append(f"| {name} | {len(res['rows'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(study: str, res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    if study == "rewards":
        for kind in KINDS:
            curves = np.array([r["pass"] for r in res["rows"] if r["kind"] == kind], dtype=float)
            ax.plot(np.arange(1, curves.shape[1] + 1), np.nanmean(curves, 0), label=f"reward: {kind}")
        ax.set_xlabel("RL step")
        ax.set_ylabel("true pass rate of the training samples")
        ax.set_title("GRPO on 'seven' with true and spurious rewards (mean over seeds)", fontsize=9)
    else:
        names = ("joint", "seven_only", "copy_only", "merged")
        for k, t in enumerate(res["before"]):
            vals = [np.mean([r[n][t] for r in res["rows"]]) for n in names]
            ax.bar(np.arange(len(names)) + 0.38 * k, vals, 0.38, label=f"{t} held-out pass@1")
        ax.set_xticks(np.arange(len(names)) + 0.19, names)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", choices=("rewards", "tracks"), required=True)
    p.add_argument("--workdir", default="runs/rl_arith")
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--algorithm", default="grpo")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--warm-steps", type=int, default=40)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl", type=float, default=0.0)
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",")]
    os.makedirs(a.workdir, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    tasks = write_tasks(a.workdir)
    warm = warm_start(a.workdir, a, tasks["warm"])
    res = (study_rewards if a.study == "rewards" else study_tracks)(a, warm, tasks)
    res["settings"] = {k: v for k, v in vars(a).items()}
    with open(os.path.join(a.out, f"rl_{a.study}.json"), "w") as f:
        json.dump(res, f, indent=1)
    plot(a.study, res, os.path.join(a.out, f"rl_{a.study}.png"))
    print(markdown(a.study, res))


if __name__ == "__main__":
    main()
