"""End-to-end training step of a Kanana-2-30B-A3B slice on one GPU: tokens/s, step time, peak memory, MFU.

    python3 benchmarks/train_step.py --layers 4 --batch 2 --seq 4096 --variants kernels,xla,tokamax --out $OUT
    python3 benchmarks/train_step.py --layers 8 --batch 4 --accum 4 --seq 4096 --remat none --variants kernels,tokamax --out $OUT

The slice keeps the full width of the 30B-A3B reconstruction (hidden 2048, 16 MLA heads, 128 experts top-6,
2 shared, vocab 128,256) with fewer layers. Each variant times the real jitted train step (forward, backward,
optimizer, MuonClip when configured) on synthetic packed batches after warm-up. MFU = tokens/s x model FLOPs per
token (`kanana_jax.model.flops.flops_per_token`: 6 x active matmul parameters + causal attention, no remat
recompute) / the bf16 matmul ceiling measured in the same process (8192^3).

Variants: kernels = Pallas attention + Pallas MoE gmm; xla = reference attention (XLA) + jax.lax.ragged_dot;
tokamax = tokamax attention and ragged_dot in the model's two seams (attention without max logits: MuonClip off).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD_ENV = dict(os.environ)
if "--only" not in sys.argv:  # the parent only coordinates: keep XLA from reserving most of the GPU
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.device_ops import device_op_ms  # noqa: E402
from benchmarks.peers import bench  # noqa: E402
from kanana_jax import config as config_lib  # noqa: E402
from kanana_jax.model.flops import count_params, flops_per_token  # noqa: E402
from kanana_jax.train.builder import build_trainer  # noqa: E402


def slice_config(layers: int, batch: int, seq: int, attention_impl: str, moe_impl: str, optimizer: str,
                 remat: str, muon_clip: bool, size: str = "kanana2_30b_a3b", accum: int = 1, overrides=()):
    """A named size (default the 30B-A3B reconstruction) at full width with `layers` layers, validated;
    `batch` rows per microbatch, `accum` microbatches per optimizer step; `overrides`: 'dotted.key=value'
    strings applied last, as `kanana-jax run --set` does (e.g. 'precision.matmul=fp8')."""
    from experiments import sizes
    model = sizes.model_overrides(size)
    model.update(n_layers=layers, attention_impl=attention_impl, moe_impl=moe_impl, remat_policy=remat)
    values = {
        "model": model,
        "optimizer": {"name": optimizer, "learning_rate": 1e-3, "warmup_steps": 0, "schedule": "constant"},
        "data": {"seq_len": seq, "global_batch_size": batch * accum},
        "train": {"steps": 1000, "grad_accum_steps": accum},
        "mesh": {"data": -1},
    }
    if optimizer == "muon":
        values["optimizer"]["muon_clip_tau"] = 100.0 if muon_clip else 0.0
    return with_overrides(config_lib.build(config_lib.ExperimentConfig, values), overrides)


def with_overrides(cfg, overrides=()):
    """`cfg` with 'dotted.key=value' overrides applied (values parsed by the key's type) and validated again."""
    if not overrides:
        return cfg
    import ml_collections
    config = ml_collections.ConfigDict(config_lib.to_dict(cfg))
    pairs = [item.split("=", 1) for item in overrides]
    bad = [item for item, pair in zip(overrides, pairs) if len(pair) != 2]
    if bad:
        raise config_lib.ConfigError(f"--set expects dotted.key=value, got {bad[0]!r}")
    config_lib.apply_overrides(config, dict(pairs))
    return config_lib.load(config)


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0):
    """Packed batch of 2 documents per row with random tokens (the loss is irrelevant, the shapes are not)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    half = seq // 2
    segment = np.concatenate([np.ones((batch, half), np.int32), np.full((batch, seq - half), 2, np.int32)], 1)
    positions = np.concatenate([np.arange(half), np.arange(seq - half)])[None].repeat(batch, 0).astype(np.int32)
    return {"inputs_BxT": tokens[:, :-1], "targets_BxT": tokens[:, 1:], "segment_ids_BxT": segment,
            "positions_BxT": positions, "loss_mask_BxT": np.ones((batch, seq), np.float32)}


def matmul_ceiling_tflops() -> float:
    """bf16 8192^3 matmul rate on this device, median of 10."""
    a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16)
    f = jax.jit(lambda a: a @ a)
    return 2 * 8192 ** 3 / bench(f, a, reps=10) / 1e12


def install_tokamax_seams():
    """Routes the model's attention and grouped matmul through tokamax (no max logits: returns zeros)."""
    import tokamax
    from kanana_jax.model import attention as attention_mod
    from kanana_jax.model import moe as moe_mod

    def attend(q, k, v, *, segment_ids_BxT=None, causal=True, sm_scale=None, logit_soft_cap=None, impl=None):
        del impl
        out = tokamax.dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale,
                                            logits_soft_cap=logit_soft_cap, implementation="mosaic")
        B, T, H, _ = q.shape
        return out, jnp.zeros((B, H, T), jnp.float32)

    attention_mod.attend = attend
    moe_mod.grouped_matmul = lambda impl, block: (lambda l, r, g: tokamax.ragged_dot(l, r, g))


def profile_top_ops(trainer, state, batch, out_dir: str, top: int = 15):
    """Traces 3 steps (after one more untraced) -> (state, [(op name, ms per step, share of device time)])."""
    latest = {"state": state}

    def one_step():
        latest["state"], metrics = trainer.train_step(latest["state"], batch)
        return metrics

    rows = device_op_ms(one_step, runs=3, top=top, trace_dir=os.path.join(out_dir, "trace"))
    return latest["state"], rows


def run_variant(name, args, ceiling):
    attention_impl, moe_impl = {"kernels": ("kernel", "pallas"), "xla": ("reference", "ragged_dot"),
                                "tokamax": ("reference", "ragged_dot")}[name]
    if name == "tokamax":
        install_tokamax_seams()
    cfg = slice_config(args.layers, args.batch, args.seq, attention_impl, moe_impl, args.optimizer, args.remat,
                       muon_clip=name != "tokamax", size=args.size, accum=args.accum,
                       overrides=getattr(args, "set", ()))
    trainer = build_trainer(cfg)
    rows = args.batch * args.accum
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(rows, args.seq, cfg.model.vocab_size).items()}
    with trainer.context():
        state = trainer.init(jax.random.PRNGKey(0))
        t0 = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        for _ in range(2):
            state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            state, metrics = trainer.train_step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        top_ops = []
        if args.profile and name == args.profile:
            state, top_ops = profile_top_ops(trainer, state, batch, args.out)
    step_s = statistics.median(times)
    tokens = args.batch * args.accum * args.seq
    fpt = flops_per_token(cfg.model, args.seq)
    stats = jax.devices()[0].memory_stats() or {}
    return {"variant": name, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "mfu": tokens / step_s * fpt / (ceiling * 1e12), "model_tflops_per_s": tokens / step_s * fpt / 1e12,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30, "compile_s": compile_s,
            "loss": float(metrics["loss"]), "top_ops": top_ops}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="kanana2_30b_a3b", help="model width (a name from experiments/sizes.py)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2, help="rows per microbatch")
    p.add_argument("--accum", type=int, default=1, help="microbatches per optimizer step (train.grad_accum_steps)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--optimizer", default="muon")
    p.add_argument("--remat", default="full")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--variants", default="kernels,xla,tokamax")
    p.add_argument("--profile", default="kernels", help="variant to trace (empty: none)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every variant, e.g. --set precision.matmul=fp8")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/train_step_bench"))
    p.add_argument("--only", default="", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    p.add_argument("--ceiling", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.only == "ceiling":
        print(f"RESULT {matmul_ceiling_tflops()}", flush=True)
        return
    if args.only:
        print("RESULT " + json.dumps(run_variant(args.only, args, args.ceiling), default=str), flush=True)
        return
    # The parent holds no device memory: the ceiling and every variant run in their own processes.
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--only", "ceiling"], capture_output=True,
                         text=True, env=CHILD_ENV).stdout
    ceiling = float([l for l in out.splitlines() if l.startswith("RESULT ")][-1].split()[1])
    cfg = slice_config(args.layers, args.batch, args.seq, "reference", "ragged_dot", args.optimizer, args.remat,
                       muon_clip=False, size=args.size, accum=args.accum)
    counts = count_params(cfg.model)
    results = {"device": str(jax.devices()[0]), "jax": jax.__version__, "matmul_ceiling_tflops": ceiling,
               "layers": args.layers, "batch": args.batch, "accum": args.accum, "seq": args.seq, "optimizer": args.optimizer,
               "params_total": counts["total"]["all"], "params_active": counts["active"]["all"],
               "flops_per_token": flops_per_token(cfg.model, args.seq), "variants": []}
    for name in args.variants.split(","):  # one process per variant: clean peak memory, no leaked seams
        cmd = [sys.executable, os.path.abspath(__file__), "--only", name, "--ceiling", str(ceiling)] + [
            f"--{k}={getattr(args, k)}" for k in ("size", "layers", "batch", "accum", "seq", "optimizer", "remat", "reps", "profile",
                                                  "out")] + [f"--set={s}" for s in args.set]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if lines:
            results["variants"].append(json.loads(lines[-1][len("RESULT "):]))
        else:  # a variant that cannot run is reported, not hidden
            results["variants"].append({"variant": name, "error": (proc.stderr or proc.stdout)[-600:]})
        print(json.dumps(results["variants"][-1], default=str)[:2000], flush=True)
    with open(os.path.join(args.out, "train_step.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\nmatmul ceiling {ceiling:.0f} TFLOP/s; slice: {args.layers} layers, {counts['total']['all']/1e9:.2f}B "
          f"total, {counts['active']['all']/1e9:.2f}B active, batch {args.accum} x {args.batch}x{args.seq}")
    print(f"{'variant':<10} {'step ms':>9} {'tok/s':>9} {'MFU':>6} {'peak GiB':>9} {'compile s':>9}")
    base = {r["variant"]: r for r in results["variants"] if "step_s" in r}
    for r in results["variants"]:
        if "error" in r:
            print(f"{r['variant']:<10} error: {r['error'][:150]}")
            continue
        print(f"{r['variant']:<10} {r['step_s']*1e3:>9.1f} {r['tokens_per_s']:>9.0f} {r['mfu']:>6.1%} "
              f"{r['peak_gib']:>9.1f} {r['compile_s']:>9.1f}")
    if "kernels" in base:
        for other in ("xla", "tokamax"):
            if other in base:
                print(f"kernels vs {other}: {base[other]['step_s'] / base['kernels']['step_s']:.2f}x")
    for r in results["variants"]:
        for name, ms, share in r.get("top_ops", []):
            print(f"  {r['variant']}: {ms:8.2f} ms {share:6.1%}  {name[:90]}")


if __name__ == "__main__":
    main()
