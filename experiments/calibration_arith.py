"""Calibration tuning on a task family where the untuned tiny model is overconfident: arith sums and differences,
difficulty 1-3 (operand digits), English and Korean (prompts:arith).

    python -m experiments.calibration_arith --workdir runs/calib_arith --out experiments/results   # CPU

1. warm start, overconfident ON PURPOSE: a short SFT of a fresh tiny model on the arith train split posed with the
   confidence request, replying with the gold '\\boxed{N}' and 'Confidence: Q%' where Q is drawn independently of
   the item, mostly high: Q = round(100 (1 - u^3)), u uniform (mean 75%, 7% of replies below 20%). The model
   learns the format and some 1-digit sums, and states ~75% whatever it answers: overconfident (its accuracy is
   far lower), with confidences spread enough for RL to explore;
2. from that warm start, per seed: calibration.method=sft (its own greedy answers annotated with the measured
   accuracy of their difficulty), method=rl with the RLCR reward, and method=rl with reward=verifiable
   (correctness only: the RLCR paper's claim that it worsens calibration);
3. prints the table (held-out eval split, greedy: accuracy, ECE, Brier, AUROC, share stating a confidence, mean
   stated confidence; before / after) and writes calibration_arith.json / calibration_arith.png under --out.
Every run is a `loop.run` and resumes: rerunning the command continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMMON_SETS = ["train.progress_bar=false", "train.tensorboard=false", "data.chat_too_long=drop"]
RUNS = (("sft", "sft", "calibration"), ("rl_rlcr", "rl", "calibration"), ("rl_correctness", "rl", "verifiable"))


def overconfident_q(record_id: str, seed: int) -> int:
    """The warm start's stated confidence of one record: round(100 (1 - u^3)), u ~ U(0, 1) from (seed, id)."""
    u = np.random.default_rng([seed, *record_id.encode()]).random()
    return int(round(100 * (1.0 - u ** 3)))


def write_warmstart_data(workdir: str, seed: int = 0) -> str:
    """The warm start's SFT file (chat: spec): arith train/eval prompts with the confidence request, gold answers
    and an overconfident stated confidence."""
    from kanana_jax.rewards.calibration import ask_confidence
    from kanana_jax.rollout.prompts import gold_reply, load_prompts
    data = os.path.join(workdir, "data")
    os.makedirs(data, exist_ok=True)
    for split in ("train", "eval"):
        path = os.path.join(data, f"warm_{split}.jsonl")
        if os.path.isfile(path):
            continue
        rows = []
        for r in load_prompts("prompts:arith", split):
            posed = ask_confidence(r)
            reply = f"{gold_reply(r)}\nConfidence: {overconfident_q(r['id'], seed)}%"
            rows.append({"id": r["id"], "bucket": "arith",
                         "messages": posed["messages"] + [{"role": "assistant", "content": reply}]})
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
    return "chat:" + os.path.join(data, "warm_{split}.jsonl")


def configs(workdir: str, a) -> tuple:
    """(warm-start SFT config, {(run name, seed): calibration config})."""
    from kanana_jax.cli import build_config
    model = [f"model.n_layers={a.layers}"]
    warm_path = write_warmstart_data(workdir)
    _, warm = build_config(f"experiments/sft.py:size=tiny,steps={a.warm_steps},batch={a.batch},seq_len={a.seq_len},"
                           f"chat=1,lr={a.warm_lr},warmup=10",
                           [*COMMON_SETS, *model, f'sft.buckets=[["arith", "{warm_path}", 1.0]]',
                            "train.eval_every=0", f"train.checkpoint_every={a.warm_steps}"])
    runs = {}
    init = os.path.join(workdir, "warmstart")
    for name, method, reward in RUNS:
        if name not in a.runs.split(","):
            continue
        steps, lr, batch = (a.sft_steps, a.sft_lr, a.batch) if method == "sft" else (a.rl_steps, a.rl_lr, a.prompts)
        for seed in range(a.seeds):
            _, c = build_config(
                f"experiments/calibration.py:size=tiny,method={method},reward={reward},init_from={init},"
                f"steps={steps},batch={batch},group={a.group},lr={lr},seed={seed},seq_len={a.seq_len},"
                f"max_new_tokens={a.max_new_tokens},eval_prompts={a.eval_prompts},sample_prompts={a.sample_prompts}",
                [*COMMON_SETS, *model, f"rl.temperature={a.rl_temperature}"])
            runs[(name, seed)] = c
    return warm, runs


def run(workdir: str, a) -> dict:
    """Warm start, then every calibration run; {(name, seed): calibration_eval.json}."""
    from kanana_jax.train import loop
    warm, runs = configs(workdir, a)
    loop.run(warm, os.path.join(workdir, "warmstart"))
    out = {}
    for (name, seed), c in runs.items():
        d = os.path.join(workdir, f"{name}_s{seed}")
        loop.run(c, d)
        with open(os.path.join(d, "calibration_eval.json")) as f:
            out[(name, seed)] = json.load(f)
    return out


def _f(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(results: dict) -> str:
    keys = ("accuracy", "ece", "brier", "auroc", "stated", "mean_confidence")
    lines = ["| run | seed | " + " | ".join(f"{k} before → after" for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for (name, seed), r in results.items():
        b, a = r["before"]["overall"], r["after"]["overall"]
        lines.append(f"| {name} | {seed} | " + " | ".join(f"{_f(b[k])} → {_f(a[k])}" for k in keys) + " |")
    return "\n".join(lines)


def family_table(results: dict) -> str:
    lines = ["| run | seed | family | accuracy before → after | mean confidence before → after | ECE before → after |",
             "|---|---|---|---|---|---|"]
    for (name, seed), r in results.items():
        for fam, b in r["before"]["families"].items():
            a = r["after"]["families"][fam]
            lines.append(f"| {name} | {seed} | {fam} | {_f(b['accuracy'])} → {_f(a['accuracy'])} | "
                         f"{_f(b['mean_confidence'])} → {_f(a['mean_confidence'])} | {_f(b['ece'])} → {_f(a['ece'])} |")
    return "\n".join(lines)


def plot(results: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(n for n, _ in results))
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.2 * (len(names) + 1), 4.0))
    first = next(iter(results.values()))
    for ax, name in zip(axes[1:], names):
        ax.plot([0, 1], [0, 1], ":", color="0.6")
        for (n, seed), r in results.items():
            if n != name:
                continue
            bins = [b for b in r["after"]["bins"] if b["count"]]
            ax.plot([b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", alpha=0.7,
                    label=f"after, seed {seed}: ECE {_f(r['after']['overall']['ece'])}")
        bins = [b for b in first["before"]["bins"] if b["count"]]
        ax.plot([b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins], "s--", color="k", alpha=0.6,
                label=f"before: ECE {_f(first['before']['overall']['ece'])}")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="stated confidence (bin mean)", ylabel="accuracy", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
    ax = axes[0]
    for i, name in enumerate(names):
        eces = [(r["before"]["overall"]["ece"], r["after"]["overall"]["ece"]) for (n, _), r in results.items()
                if n == name]
        accs = [(r["before"]["overall"]["accuracy"], r["after"]["overall"]["accuracy"])
                for (n, _), r in results.items() if n == name]
        ax.bar(i - 0.2, np.mean([e[1] for e in eces if e[1] is not None] or [np.nan]), 0.4, label="ECE after" if i == 0 else None,
               color="tab:blue")
        ax.bar(i + 0.2, np.mean([x[1] for x in accs]), 0.4, label="accuracy after" if i == 0 else None,
               color="tab:orange")
    ax.axhline(first["before"]["overall"]["ece"] or 0, color="tab:blue", linestyle="--", label="ECE before")
    ax.axhline(first["before"]["overall"]["accuracy"], color="tab:orange", linestyle="--", label="accuracy before")
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_title("held-out arith, mean over seeds", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default="", help="folder for calibration_arith.json / .png ('' = none)")
    p.add_argument("--runs", default=",".join(n for n, _, _ in RUNS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--warm-steps", type=int, default=300)
    p.add_argument("--warm-lr", type=float, default=3e-3)
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--rl-steps", type=int, default=40)
    p.add_argument("--rl-lr", type=float, default=1e-3)
    p.add_argument("--rl-temperature", type=float, default=1.0)
    p.add_argument("--prompts", type=int, default=8, help="RL prompts per step")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--batch", type=int, default=16, help="SFT rows per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--eval-prompts", type=int, default=0)
    p.add_argument("--sample-prompts", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    results = run(a.workdir, a)
    print(table(results))
    print()
    print(family_table(results))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "calibration_arith.json"), "w") as f:
            json.dump({"args": vars(a), "runs": [{"run": n, "seed": s, **{k: r[k] for k in
                                                  ("method", "reward", "before", "after", "delta")},
                                                  "family_accuracy": r.get("family_accuracy")}
                                                 for (n, s), r in results.items()]}, f, indent=1)
        plot(results, os.path.join(a.out, "calibration_arith.png"))
    return results


if __name__ == "__main__":
    main()
