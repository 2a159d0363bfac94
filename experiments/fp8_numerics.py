"""FP8 vs bf16 numerics: the same model, seed and data order trained with bf16 matmuls and with fp8 matmuls.

    python -m experiments.fp8_numerics --size tiny --steps 300 --out experiments/results     # CPU, ~10 min
    python -m experiments.fp8_numerics --size tiny --fp8-set precision.fp8_scaling=delayed  # another recipe
    python3 -m experiments.fp8_numerics --size small --steps 300 --out $OUT   # one H200: real fp8 GEMMs, ~1-2 min

Both runs use model.dtype=bfloat16 (bf16 activations, fp32 master weights and optimizer state); the fp8 run is
the same config with `precision.matmul=fp8` (plus any --fp8-set overrides), which quantizes the attention
projections, dense/shared MLPs and routed experts (kanana_jax/model/fp8.py, pallas_kernels/moe/fp8.py: e4m3
forward, e5m2 output gradients, current per-tensor scaling by default). On CPU the fp8
products are emulated exactly (the same rounding, float32 accumulation), so the numerics are those of the GPU
path; only speed differs. Records loss and gradient norm per step; writes fp8_numerics_<size>.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def get_config(size: str, steps: int, lr: float, seed: int = 0, batch: int = 16, seq_len: int = 128):
    from experiments import common
    c = common.base_config(size)
    common.ablation_run(c, steps=steps, seed=seed, batch=batch, seq_len=seq_len, lr=lr)
    c.model.dtype = "bfloat16"
    c.train.progress_bar = False
    c.train.tensorboard = False
    return c


def train(cfg) -> list[dict]:
    """Per-step {step, loss, grad_norm} of cfg trained in-process (its `precision` section picks the matmuls)."""
    import jax

    from kanana_jax import sharding
    from kanana_jax.data import pipeline
    from kanana_jax.train.builder import build_trainer
    trainer = build_trainer(cfg)
    rows = []
    with trainer.context():
        state = trainer.init(jax.random.PRNGKey(cfg.train.seed))
        data = pipeline.make_iterator(cfg.data, split="train", seed=cfg.train.seed)
        for step in range(cfg.train.steps):
            state, metrics = trainer.train_step(state, sharding.put_batch(next(data), trainer.batch_sharding))
            rows.append({"step": step + 1, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])})
            if (step + 1) % 50 == 0:
                print(f"  step {step + 1}: loss {rows[-1]['loss']:.4f}", flush=True)
    return rows


FP8 = ("precision.matmul=fp8",)


def configs(size: str, steps: int, lr: float, fp8_sets=()) -> dict:
    """{'bf16': cfg, 'fp8': the same cfg with precision.matmul=fp8 and `fp8_sets` ('dotted.key=value')}."""
    from kanana_jax import config as config_lib
    out = {}
    for name, sets in (("bf16", ()), ("fp8", (*FP8, *fp8_sets))):
        c = get_config(size, steps, lr)
        config_lib.apply_overrides(c, dict(item.split("=", 1) for item in sets))
        out[name] = config_lib.load(c)
    return out


def compare(size: str, steps: int, lr: float, out_dir: str, fp8_sets=()) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    cfgs = configs(size, steps, lr, fp8_sets)
    result = {"size": size, "steps": steps, "lr": lr, "optimizer": cfgs["bf16"].optimizer.name,
              "fp8_overrides": [*FP8, *fp8_sets]}
    for name, cfg in cfgs.items():
        print(f"{name}:", flush=True)
        result[name] = train(cfg)
    result["summary"] = summarize(result["bf16"], result["fp8"])
    print(json.dumps(result["summary"], indent=1))
    with open(os.path.join(out_dir, f"fp8_numerics_{size}.json"), "w") as f:
        json.dump(result, f)
    plot(result, os.path.join(out_dir, f"fp8_numerics_{size}.png"))
    return result


def summarize(bf16: list[dict], fp8: list[dict]) -> dict:
    """Relative loss deviation (fp8 - bf16) / bf16 over windows of 20 steps, and the grad-norm ratio."""
    import numpy as np
    lb, lf = np.array([r["loss"] for r in bf16]), np.array([r["loss"] for r in fp8])
    gb, gf = np.array([r["grad_norm"] for r in bf16]), np.array([r["grad_norm"] for r in fp8])
    n = len(lb) // 20 * 20
    wb, wf = lb[:n].reshape(-1, 20).mean(1), lf[:n].reshape(-1, 20).mean(1)
    rel = (wf - wb) / wb
    tail = slice(len(lb) // 2, None)
    return {"loss_bf16_last20": float(lb[-20:].mean()), "loss_fp8_last20": float(lf[-20:].mean()),
            "rel_dev_windows20": [float(x) for x in rel], "max_abs_rel_dev_window20_second_half":
            float(np.abs(rel[len(rel) // 2:]).max()), "grad_norm_ratio_median_second_half":
            float(np.median(gf[tail] / gb[tail])), "grad_norm_ratio_range_second_half":
            [float(np.min(gf[tail] / gb[tail])), float(np.max(gf[tail] / gb[tail]))]}


def plot(result: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, style in (("bf16", "-"), ("fp8", "--")):
        rows = result[name]
        a.plot([r["step"] for r in rows], [r["loss"] for r in rows], style, lw=0.9, label=name)
    lb = np.array([r["loss"] for r in result["bf16"]])
    lf = np.array([r["loss"] for r in result["fp8"]])
    k = 20
    smooth = lambda v: np.convolve(v, np.ones(k) / k, mode="valid")
    b.plot(np.arange(k, len(lb) + 1), 100 * (smooth(lf) - smooth(lb)) / smooth(lb))
    b.axhline(0, color="gray", lw=0.8)
    gb = np.array([r["grad_norm"] for r in result["bf16"]])
    gf = np.array([r["grad_norm"] for r in result["fp8"]])
    c.plot(np.arange(1, len(gb) + 1), gf / gb, lw=0.8)
    c.axhline(1, color="gray", lw=0.8)
    a.set(xlabel="step", ylabel="train loss", title=f"{result['size']}: loss")
    b.set(xlabel="step", ylabel="%", title="(fp8 - bf16) / bf16, 20-step means")
    c.set(xlabel="step", ylabel="ratio", title="grad norm fp8 / bf16")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--fp8-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override of the fp8 run, e.g. precision.fp8_scaling=delayed")
    args = ap.parse_args()
    compare(args.size, args.steps, args.lr, args.out, tuple(args.fp8_set))


if __name__ == "__main__":
    main()
