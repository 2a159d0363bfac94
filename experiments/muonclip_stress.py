"""MuonClip stress test, small: the same tiny model at a high Muon learning rate, with and without QK-clip.

    kanana-jax run experiments/muonclip_stress.py:clip=on --workdir runs/stress_clip      # through the main loop
    python -m experiments.muonclip_stress --steps 100 --out runs/muonclip_stress          # both runs + plot

Arguments (`key=value,...`): clip=on|off, tau (MuonClip threshold), lr, steps, size, init_std, dtype (Muon matmul dtype).
The in-process driver (`compare`) trains both variants with the project's Trainer (the same jitted train step, which
applies MuonClip after the update when optimizer.muon_clip_tau > 0) and records loss, the max attention logit of
each step's forward pass and the number of clipped heads.
"""
from __future__ import annotations

import argparse
import json
import os

from experiments import common

def get_config(arg: str | None = None):
    args = common.parse_arg(arg, clip="on", tau=100.0, lr=0.3, steps=100, size="tiny", init_std=0.02,
                            dtype="float32", batch=16, seq_len=128, seed=0)
    if args.clip not in ("on", "off"):
        raise ValueError(f"clip={args.clip!r}; allowed: on, off")
    c = common.base_config(args.size)
    common.ablation_run(c, steps=args.steps, seed=args.seed, batch=args.batch, seq_len=args.seq_len, lr=args.lr)
    c.model.init_std = args.init_std
    c.optimizer.name = "muon"
    c.optimizer.grad_clip_norm = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.muon_dtype = args.dtype
    c.optimizer.muon_clip_tau = args.tau if args.clip == "on" else 0.0
    return c


def sweep():
    """Both variants; `kanana-jax sweep experiments/muonclip_stress.py --workdir DIR`."""
    from experiments.sweep_dsl import param
    return param("optimizer.muon_clip_tau", [0.0, 100.0])


def train(cfg, steps: int | None = None, record_every: int = 1, init_transform=None) -> list[dict]:
    """Trains cfg in-process (no checkpoints); returns [{step, loss, max_logit, heads_clipped}] per step.

    init_transform(params) -> params is applied once to the fresh parameters (e.g. width-transfer init scaling).
    """
    import jax
    import jax.numpy as jnp

    from kanana_jax import sharding
    from kanana_jax.data import pipeline
    from kanana_jax.train.builder import build_trainer

    trainer = build_trainer(cfg)
    rows = []
    with trainer.context():
        state = trainer.init(jax.random.PRNGKey(cfg.train.seed))
        if init_transform is not None:
            state = state.replace(params=jax.jit(init_transform, out_shardings=trainer.state_sharding.params)(
                state.params))
        data = pipeline.make_iterator(cfg.data, split="train", seed=cfg.train.seed)
        for step in range(steps or cfg.train.steps):
            state, metrics = trainer.train_step(state, sharding.put_batch(next(data), trainer.batch_sharding))
            if (step + 1) % record_every:
                continue
            row = {"step": step + 1, "loss": float(metrics["loss"]),
                   "max_logit": float(metrics.get("max_attention_logit", jnp.nan))}
            if cfg.optimizer.muon_clip_tau > 0:
                row["heads_clipped"] = int(metrics["muon_clip/heads_clipped"])
            rows.append(row)
    return rows


def compare(steps: int, out_dir: str, tau: float = 100.0, lr: float = 0.3, extra: str = "") -> dict:
    from kanana_jax import config as config_lib
    os.makedirs(out_dir, exist_ok=True)
    result = {}
    for clip in ("off", "on"):
        arg = f"clip={clip},tau={tau},lr={lr},steps={steps}" + (f",{extra}" if extra else "")
        result[clip] = {"arg": arg, "rows": train(config_lib.load(get_config(arg)))}
        last = result[clip]["rows"][-1]
        print(f"clip={clip}: final loss {last['loss']:.3f}, max logit {max(r['max_logit'] for r in result[clip]['rows']):.2f}",
              flush=True)
    with open(os.path.join(out_dir, "muonclip_stress.json"), "w") as f:
        json.dump(result, f)
    plot(result, os.path.join(out_dir, "muonclip_stress.png"), tau)
    return result


def plot(result: dict, path: str, tau: float):
    """Max attention logit and loss per step, with and without MuonClip."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for clip, style in (("off", "-"), ("on", "--")):
        rows = result[clip]["rows"]
        steps = [r["step"] for r in rows]
        a.plot(steps, [r["max_logit"] for r in rows], style, label=f"MuonClip {clip}")
        b.plot(steps, [r["loss"] for r in rows], style, label=f"MuonClip {clip}")
    a.axhline(tau, color="gray", lw=0.8, ls=":", label=f"tau = {tau:g}")
    a.set(xlabel="step", ylabel="max pre-softmax logit", yscale="log", title="attention logits")
    b.set(xlabel="step", ylabel="train loss", title="loss")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--tau", type=float, default=100.0)
    ap.add_argument("--lr", type=float, default=0.3)
    ap.add_argument("--extra", default="", help="more key=value arguments of get_config")
    ap.add_argument("--out", default="runs/muonclip_stress")
    args = ap.parse_args()
    compare(args.steps, args.out, args.tau, args.lr, args.extra)


if __name__ == "__main__":
    main()
