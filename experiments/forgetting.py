"""Replay vs forgetting, small: pre-train the tiny model on the EN/KO corpus, then mid-train it on chain-of-thought
reasoning with a share of replayed pre-training tokens, and measure what is forgotten and what is learned.

    python -m experiments.forgetting --out runs/forgetting --results experiments/results --seeds 0,1,2

For each seed: one pre-training run (experiments/pretrain.py), then one mid-training run per replay share
(experiments/midtrain.py with train.init_from = that pre-training run; the same steps, batch and sequence length,
so the same number of tokens, whatever the share). Before (the pre-trained params) and after (the final
mid-trained params) it evaluates the held-out splits that midtrain.py names: wiki_en and wiki_ko (pre-training
domains: forgetting) and reasoning (what mid-training teaches). Every run lives in its own workdir under --out
and resumes (or is skipped when finished), so the command can be re-run after a kill. Writes
`<results>/forgetting.json` (every run's numbers) and `<results>/forgetting.png`, and prints the table of
RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

GROUPS = ("wiki_en", "wiki_ko", "reasoning")


def _cfg(spec: str, sets: list[str]):
    from kanana_jax.cli import build_config
    return build_config(spec, ["train.progress_bar=false", "train.tensorboard=false", *sets])[1]


def _eval_at(cfg, workdir: str | None) -> dict:
    """eval_loss/<group> of `cfg`'s held-out groups for the params of `workdir`'s last checkpoint (None: the
    params cfg.train.init_from names)."""
    import jax

    from kanana_jax.convert.orbax_hf import restore_params
    from kanana_jax.train import loop
    from kanana_jax.train.builder import build_trainer
    trainer = build_trainer(cfg)
    with trainer.context():
        rng = jax.random.PRNGKey(cfg.train.seed)
        params = loop.initial_params(trainer, rng)[0] if workdir is None else restore_params(workdir, cfg=cfg)[1]
        out = loop.evaluate(trainer, trainer.state_from_params(params, rng))
    return {g: out[f"eval_loss/{g}"] for g in GROUPS}


def run(out: str, seeds: list[int], replays: list[float], pre_steps: int, mid_steps: int, lr: float,
        eval_batches: int) -> list[dict]:
    from kanana_jax.train import loop
    rows = []
    for seed in seeds:
        pre_dir = os.path.join(out, f"pretrain_s{seed}")
        loop.run(_cfg(f"experiments/pretrain.py:size=tiny,steps={pre_steps}", [f"train.seed={seed}",
                      "train.eval_every=0", f"train.log_every={max(pre_steps // 20, 1)}"]), pre_dir)
        for replay in replays:
            sets = [f"train.eval_batches={eval_batches}", "train.eval_every=0", "train.log_every=10"]
            cfg = _cfg(f"experiments/midtrain.py:size=tiny,steps={mid_steps},lr={lr},replay={replay},seed={seed},"
                       f"init_from={pre_dir}", sets)
            mid_dir = os.path.join(out, f"midtrain_s{seed}_r{replay}")
            loop.run(cfg, mid_dir)
            before, after = _eval_at(cfg, None), _eval_at(cfg, mid_dir)
            row = {"seed": seed, "replay": replay, **{f"before/{g}": before[g] for g in GROUPS},
                   **{f"after/{g}": after[g] for g in GROUPS}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds, per replay share: losses before/after and the change (forgetting = after - before)."""
    out = []
    for replay in sorted({r["replay"] for r in rows}):
        group = [r for r in rows if r["replay"] == replay]
        entry = {"replay": replay, "seeds": len(group)}
        for g in GROUPS:
            before = np.array([r[f"before/{g}"] for r in group])
            after = np.array([r[f"after/{g}"] for r in group])
            entry[f"{g}/before"], entry[f"{g}/after"] = float(before.mean()), float(after.mean())
            entry[f"{g}/delta"] = float((after - before).mean())
            entry[f"{g}/delta_std"] = float((after - before).std(ddof=1)) if len(group) > 1 else 0.0
        out.append(entry)
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| replay share | seeds | wiki_en before -> after (change) | wiki_ko before -> after (change) | "
             "reasoning before -> after (change) |", "|---|---|---|---|---|"]
    for e in summary:
        cells = [f"{e[f'{g}/before']:.3f} -> {e[f'{g}/after']:.3f} ({e[f'{g}/delta']:+.3f} +- "
                 f"{e[f'{g}/delta_std']:.3f})" for g in GROUPS]
        lines.append(f"| {e['replay']:.2f} | {e['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: list[dict], rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, g in zip(axes, GROUPS):
        for r in rows:
            ax.plot(r["replay"], r[f"after/{g}"] - r[f"before/{g}"], "o", color="0.7", ms=4)
        xs = [e["replay"] for e in summary]
        ax.errorbar(xs, [e[f"{g}/delta"] for e in summary], yerr=[e[f"{g}/delta_std"] for e in summary],
                    marker="s", capsize=3, color="C0" if g != "reasoning" else "C2", label="mean over seeds")
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xlabel("replay share of mid-training tokens")
        ax.set_ylabel("held-out loss change (after - before), nats")
        ax.set_title(f"{g}: {'forgetting' if g != 'reasoning' else 'learned'}")
        ax.legend(fontsize=8)
    fig.suptitle("Tiny model: mid-training on reasoning with replay (each grey dot one seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/forgetting", help="workdirs of the runs")
    p.add_argument("--results", default="experiments/results", help="where forgetting.json and .png go")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--replays", default="0,0.05,0.2,0.5")
    p.add_argument("--pre-steps", type=int, default=400)
    p.add_argument("--mid-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3, help="mid-training peak learning rate")
    p.add_argument("--eval-batches", type=int, default=8)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    rows = run(args.out, [int(s) for s in args.seeds.split(",")], [float(r) for r in args.replays.split(",")],
               args.pre_steps, args.mid_steps, args.lr, args.eval_batches)
    summary = summarize(rows)
    with open(os.path.join(args.results, "forgetting.json"), "w") as f:
        json.dump({"settings": vars(args), "rows": rows, "summary": summary}, f, indent=1)
    plot(summary, rows, os.path.join(args.results, "forgetting.png"))
    print(markdown(summary))


if __name__ == "__main__":
    main()
