"""Width transfer sweep: learning rate x width, with and without the muP-style rules of kanana_jax/optim/hparam_transfer.

    kanana-jax run experiments/hparam_transfer.py:width=2,lr=0.03,mup=on --workdir runs/hpt_w2
    python -m experiments.hparam_transfer --steps 60 --out runs/hparam_transfer        # the whole grid + plot

Arguments (`key=value,...`): width (multiplier of the tiny model's d_model 128 and of every hidden width: d_ff,
moe_d_ff, kv_lora_rank, head dims; heads and rope dim fixed), lr, mup=on|off (on: `optimizer.mup_base_width=128`
plus the init scaling), optimizer=muon|adamw, steps, dtype (Muon matmul dtype). With transfer on, the best learning
rate found at width 1 should stay best at the other widths; with it off it drifts.
`optimizer.mup_base_width` switches on both halves of the transfer: the init scaling (`hparam_transfer.scale_init`,
applied by `kanana_jax.train.step.init_state`) and the per-group learning rates inside the optimizer.
"""
from __future__ import annotations

import argparse
import json
import os

from experiments import common

BASE_WIDTH = 128
SCALED = ("d_model", "d_ff", "moe_d_ff", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "head_dim")


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, width=1.0, lr=0.03, mup="on", optimizer="muon", steps=60, batch=16, seq_len=128,
                            dtype="float32", seed=0)
    if args.mup not in ("on", "off"):
        raise ValueError(f"mup={args.mup!r}; allowed: on, off")
    c = common.base_config("tiny")
    for key in SCALED:
        c.model[key] = max(2, int(round(c.model[key] * args.width / 2)) * 2)
    common.ablation_run(c, steps=args.steps, seed=args.seed, batch=args.batch, seq_len=args.seq_len, lr=args.lr)
    c.optimizer.name = args.optimizer
    c.optimizer.muon_dtype = args.dtype
    c.optimizer.mup_base_width = BASE_WIDTH if args.mup == "on" else 0
    c.optimizer.muon_clip_tau = 0.0       # isolate the learning-rate effect (the stress test covers MuonClip)
    return c


def sweep():
    """widths x learning rates x transfer on/off (init scaling and learning-rate multipliers);
    `kanana-jax sweep experiments/hparam_transfer.py --workdir DIR`."""
    from experiments.sweep_dsl import param, product, zipit
    base = common.base_config("tiny").model
    widths = zipit(*(param(f"model.{k}", [max(2, int(round(base[k] * w / 2)) * 2) for w in (0.5, 1, 2)])
                     for k in SCALED))
    return product(widths, param("optimizer.learning_rate", [0.01, 0.03, 0.1]),
                   param("optimizer.mup_base_width", [0, BASE_WIDTH]))


def grid(widths, lrs, steps: int, optimizer: str, out_dir: str, tail: int = 10, batch: int = 16) -> dict:
    from experiments.muonclip_stress import train
    from kanana_jax import config as config_lib
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for mup in ("off", "on"):
        for width in widths:
            for lr in lrs:
                if mup == "on" and width == 1.0 and f"off|{width}|{lr}" in results:
                    results[f"on|{width}|{lr}"] = results[f"off|{width}|{lr}"]   # r = 1: the same run
                    continue
                cfg = config_lib.load(get_config(f"width={width},lr={lr},mup={mup},optimizer={optimizer},"
                                                 f"steps={steps},batch={batch}"))
                rows = train(cfg)
                losses = [r["loss"] for r in rows]
                final = sum(losses[-tail:]) / tail
                results[f"{mup}|{width}|{lr}"] = {"final_loss": final, "losses": losses}
                print(f"mup={mup} width={width} (d_model {cfg.model.d_model}) lr={lr}: mean loss of the last "
                      f"{tail} steps {final:.4f}", flush=True)
    with open(os.path.join(out_dir, f"hparam_transfer_{optimizer}.json"), "w") as f:
        json.dump(results, f)
    plot(results, widths, lrs, os.path.join(out_dir, f"hparam_transfer_{optimizer}.png"))
    return results


def table(results, widths, lrs) -> str:
    lines = ["| transfer | width (d_model) | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |",
             "|---|---|" + "---|" * len(lrs) + "---|"]
    for mup in ("off", "on"):
        for width in widths:
            vals = [results[f"{mup}|{width}|{lr}"]["final_loss"] for lr in lrs]
            best = lrs[min(range(len(lrs)), key=vals.__getitem__)]
            lines.append(f"| {mup} | {width:g} ({int(BASE_WIDTH * width)}) | " +
                         " | ".join(f"{v:.3f}" for v in vals) + f" | {best:g} |")
    return "\n".join(lines)


def plot(results, widths, lrs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, mup in zip(axes, ("off", "on")):
        for width in widths:
            ax.plot(lrs, [results[f"{mup}|{width}|{lr}"]["final_loss"] for lr in lrs], "o-",
                    label=f"d_model {int(BASE_WIDTH * width)}")
        ax.set(xscale="log", xlabel="learning rate", title=f"width transfer {mup}")
        ax.legend()
    axes[0].set_ylabel("train loss (mean of last steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--widths", default="0.5,1,2")
    ap.add_argument("--lrs", default="0.01,0.03,0.1")
    ap.add_argument("--optimizer", default="muon")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="runs/hparam_transfer")
    args = ap.parse_args()
    widths = [float(w) for w in args.widths.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    results = grid(widths, lrs, args.steps, args.optimizer, args.out, batch=args.batch)
    print(table(results, widths, lrs))


if __name__ == "__main__":
    main()
