"""Rejection sampling on a task a tiny model can learn: one-digit sums and differences (prompts:arith, difficulty 1).

    python -m experiments.rejection_sampling_arith --workdir runs/rs_arith --out experiments/results   # CPU

1. data: the difficulty-1 arith prompts (train / eval splits: held-out problems never appear in train) as a
   prompt file, and their gold replies '\\boxed{answer}' as an SFT file;
2. warm start: a short SFT on the gold replies (experiments/sft.py's stage; stopped early on purpose, so that
   sampling at temperature 1 passes sometimes, not always);
3. rejection sampling (experiments/rejection_sampling.py): `--rounds` rounds of K samples per prompt ->
   math checker -> keep the correct ones -> SFT on them, each round from the previous round's policy.
Prints the per-round table (pass@1 / pass@k of the sampled prompts, kept, held-out pass@1 / pass@k on the eval
split with the same sampling keys for every policy) and writes rs_arith.json / rs_arith.png under --out. Every
step is a `loop.run` and resumes: rerunning the command continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMMON_SETS = ["train.progress_bar=false", "train.tensorboard=false", "data.chat_too_long=drop"]


def write_data(workdir: str, difficulty: int = 1) -> tuple[str, str]:
    """(prompt spec, SFT chat path) of the arith problems of one difficulty, written under WORKDIR/data."""
    from kanana_jax.rollout.prompts import gold_records, load_prompts
    data = os.path.join(workdir, "data")
    os.makedirs(data, exist_ok=True)
    for split in ("train", "eval"):
        records = [r for r in load_prompts("prompts:arith", split) if r["difficulty"] == difficulty]
        for name, rows in ((f"arith_d{difficulty}", records), (f"arith_d{difficulty}_gold", gold_records(records))):
            path = os.path.join(data, f"{name}_{split}.jsonl")
            if not os.path.isfile(path):
                with open(path + ".tmp", "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                os.replace(path + ".tmp", path)
    return (os.path.join(data, f"arith_d{difficulty}_{{split}}.jsonl"),
            "chat:" + os.path.join(data, f"arith_d{difficulty}_gold_{{split}}.jsonl"))


def configs(workdir: str, a) -> tuple:
    """(warm-start SFT config, rejection-sampling config); the same batch / sequence / steps, so both compile
    the same train step."""
    from kanana_jax.cli import build_config
    prompts, gold = write_data(workdir)
    model = [f"model.n_layers={a.layers}", f"train.seed={a.seed}", f"optimizer.learning_rate={a.lr}"]
    shape = f"steps={a.steps},batch={a.batch},seq_len={a.seq_len}"
    _, warm = build_config(f"experiments/sft.py:size=tiny,{shape},chat=1",
                           [*COMMON_SETS, *model, f'sft.buckets=[["arith", "{gold}", 1.0]]',
                            f"train.steps={a.warm_steps}", "train.eval_every=0",
                            f"train.checkpoint_every={a.warm_steps}", "optimizer.warmup_steps=5"])
    _, rs = build_config(f"experiments/rejection_sampling.py:size=tiny,{shape},rounds={a.rounds},k={a.k},"
                         f"prompts_per_round={a.prompts_per_round},chunk={a.chunk},heldout={a.heldout},"
                         f"max_new_tokens={a.max_new_tokens},init_from={os.path.join(workdir, 'warmstart')}",
                         [*COMMON_SETS, *model, f"rejection_sampling.prompts={prompts}", "train.eval_every=0",
                          f"rejection_sampling.overlap_verify={a.overlap}"])
    return warm, rs


def run(workdir: str, a) -> list[dict]:
    """Warm start, then the rejection-sampling rounds; the rows of rounds.jsonl."""
    from kanana_jax.train import loop
    warm, rs = configs(workdir, a)
    loop.run(warm, os.path.join(workdir, "warmstart"))
    loop.run(rs, os.path.join(workdir, "rs"))
    with open(os.path.join(workdir, "rs", "rounds.jsonl")) as f:
        return [json.loads(line) for line in f]


def table(rows: list[dict]) -> str:
    head = ("| round | policy sampled | pass@1 | pass@k | kept / samples | held-out pass@1 after | held-out pass@k "
            "after | samples/s | verifications/s |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    if rows and "heldout_start_pass@1" in rows[0]:
        lines.append(f"| start | warm start | | | | {rows[0]['heldout_start_pass@1']:.3f} | "
                     f"{rows[0]['heldout_start_pass@k']:.3f} | | |")
    for r in rows:
        lines.append(f"| {r['round']} | {'warm start' if r['round'] == 0 else f'round {r['round'] - 1}'} | "
                     f"{r['pass@1']:.3f} | {r['pass@k']:.3f} | {r['kept']} / {r['samples']} | "
                     f"{r.get('heldout_pass@1', float('nan')):.3f} | {r.get('heldout_pass@k', float('nan')):.3f} | "
                     f"{r['samples_per_s']:.0f} | {r['verifications_per_s']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str):
    """Pass rates by policy: 0 = the warm start, r + 1 = after round r's SFT (round r samples policy r)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    policies = [r["round"] for r in rows]
    ax.plot(policies, [r["pass@1"] for r in rows], "o-", label="pass@1, sampled train prompts")
    ax.plot(policies, [r["pass@k"] for r in rows], "o--", label=f"pass@{rows[0]['samples'] // rows[0]['prompts']}"
            ", sampled train prompts")
    if "heldout_pass@1" in rows[0]:
        held = [rows[0]["heldout_start_pass@1"]] + [r["heldout_pass@1"] for r in rows]
        ax.plot([0] + [p + 1 for p in policies], held, "s-", label="pass@1, held-out eval prompts")
    n = len(rows) + 1
    ax.set_xticks(range(n), ["warm start"] + [f"after round {r}" for r in range(n - 1)])
    ax.set_xlabel("policy")
    ax.set_ylabel("pass rate (temperature 1)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default="", help="folder for rs_arith.json / .png ('' = none)")
    p.add_argument("--warm-steps", type=int, default=40)
    p.add_argument("--steps", type=int, default=30, help="SFT steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--prompts-per-round", type=int, default=236)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--heldout", type=int, default=58)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overlap", default="true", choices=["true", "false"])
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    rows = run(a.workdir, a)
    print(table(rows))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "rs_arith.json"), "w") as f:
            json.dump({"args": vars(a), "rounds": rows}, f, indent=1)
        plot(rows, os.path.join(a.out, "rs_arith.png"))
    return rows


if __name__ == "__main__":
    main()
