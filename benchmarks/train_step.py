"""End-to-end training step of a Kanana-2-30B-A3B slice on one GPU: tokens/s, step time, peak memory, MFU.

    python3 benchmarks/train_step.py --layers 4 --batch 2 --seq 4096 --variants kernels,xla,tokamax --out $OUT
    python3 benchmarks/train_step.py --layers 8 --batch 4 --accum 4 --seq 4096 --remat none --variants kernels,tokamax --out $OUT
    python3 benchmarks/train_step.py ... --variants kernels --compare "" --compare "model.scan_layers=false" --child-timeout 200

The slice keeps the full width of the 30B-A3B reconstruction (hidden 2048, 16 MLA heads, 128 experts top-6,
2 shared, vocab 128,256) with fewer layers. Each variant times the real jitted train step (forward, backward,
optimizer, MuonClip when configured) on synthetic packed batches after warm-up. Model TFLOP/s = tokens/s x model
FLOPs per token (`kanana_jax.model.flops.flops_per_token`: 6 x active matmul parameters + causal attention, no
remat recompute). MFU = that / the chip's spec dense bf16 peak (`kanana_jax.train.metrics.PEAK_TFLOPS`: 989 on
the H100/H200), as MaxText and most papers report it. Second column, "of achievable": that / the bf16 matmul
ceiling measured in a child process of the same run, the median over CEILING_SHAPES of each shape's median rate.

Variants: kernels = Pallas attention + Pallas MoE gmm; xla = reference attention (XLA) + jax.lax.ragged_dot;
tokamax = tokamax attention and ragged_dot in the model's two seams (attention without max logits: MuonClip off).
`--compare` runs each variant once per group of overrides (space-separated key=value, "" = none) on top of
`--set`, each in its own process of the same run, so a change and its baseline share one ceiling and one machine.
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


# (M, K, N) of the matmul ceiling: the square 8192^3 and 4096^3 and three of the slice's own GEMM shapes at 16K
# tokens per microbatch (hidden 2048 -> 16 heads x 192 q, the LM head's vocab chunk, a dense MLP's down-projection).
CEILING_SHAPES = ((8192, 8192, 8192), (4096, 4096, 4096), (16384, 2048, 3072), (16384, 2048, 16384),
                  (16384, 8192, 2048))


def matmul_ceiling_tflops(shapes=CEILING_SHAPES) -> float:
    """Median over shapes of the bf16 matmul rates of matmul_ceiling_by_shape."""
    return statistics.median(matmul_ceiling_by_shape(shapes).values())  # benchmarks/fp8.py uses this one


def matmul_ceiling_by_shape(shapes=CEILING_SHAPES, reps: int = 7, inner: int = 10) -> dict[str, float]:
    """{'MxKxN': TFLOP/s} of bf16 matmuls (random normal operands, fp32 accumulation, bf16 out), each the median
    over `reps` timings of `inner` back-to-back calls (dispatch overlaps the previous call: no per-call host gap)."""
    rates = {}
    for i, (m, k, n) in enumerate(shapes):
        ka, kb = jax.random.split(jax.random.PRNGKey(i))
        a = jax.random.normal(ka, (m, k), jnp.bfloat16)
        b = jax.random.normal(kb, (k, n), jnp.bfloat16)
        f = jax.jit(lambda a, b: a @ b)
        jax.block_until_ready([f(a, b) for _ in range(3)])
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready([f(a, b) for _ in range(inner)])
            times.append((time.perf_counter() - t) / inner)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / statistics.median(times) / 1e12
    return rates


def spec_peak(device_kind: str) -> float:
    """The chip's spec dense bf16 TFLOP/s (metrics.PEAK_TFLOPS); ValueError naming the table if unlisted."""
    from kanana_jax.train.metrics import spec_peak_tflops
    peak = spec_peak_tflops(device_kind)
    if peak is None:
        raise ValueError(f"no spec peak for device kind {device_kind!r}: add it to PEAK_TFLOPS in "
                         "kanana_jax/train/metrics.py (or pass --peak-tflops)")
    return peak


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


def run_variant(name, args, ceiling, peak=None):
    """One variant's step in this process -> its record; peak: spec TFLOP/s (None: metrics.PEAK_TFLOPS)."""
    peak = peak or spec_peak(jax.devices()[0].device_kind)
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
        loss_first = float(metrics["loss"])  # of the initial params: compares variants' forward numerics
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
            "mfu": tokens / step_s * fpt / (peak * 1e12), "of_achievable": tokens / step_s * fpt / (ceiling * 1e12),
            "model_tflops_per_s": tokens / step_s * fpt / 1e12,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30, "compile_s": compile_s,
            "loss_first": loss_first, "loss": float(metrics["loss"]), "top_ops": top_ops}


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
    p.add_argument("--compare", action="append", default=[], metavar='"KEY=VALUE ..."',
                   help="run every variant once per such group of overrides (on top of --set; \"\" = none)")
    p.add_argument("--child-timeout", type=float, default=0.0,
                   help="seconds each variant's process may run (0: no limit); one past it is reported as an error")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/train_step_bench"))
    p.add_argument("--only", default="", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    p.add_argument("--ceiling", type=float, default=0.0,
                   help="TFLOP/s of the matmul ceiling to use instead of measuring it (0: measure, the default)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="spec dense bf16 TFLOP/s per chip for MFU (0: metrics.PEAK_TFLOPS by device kind)")
    p.add_argument("--ceiling-only", action="store_true", help="only measure the matmul ceiling (CEILING_SHAPES)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.only == "ceiling":
        rates = matmul_ceiling_by_shape()
        print("RESULT " + json.dumps([statistics.median(rates.values()), rates]), flush=True)
        return
    peak = args.peak_tflops or spec_peak(jax.devices()[0].device_kind)
    if args.only:
        print("RESULT " + json.dumps(run_variant(args.only, args, args.ceiling, peak), default=str), flush=True)
        return
    # The parent holds no device memory: the ceiling and every variant run in their own processes.
    if args.ceiling:  # given (from an earlier run of the same machine kind), not measured: saves ~20 s
        ceiling, ceiling_by_shape = args.ceiling, {"given, not measured in this run": args.ceiling}
    else:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--only", "ceiling"], capture_output=True,
                             text=True, env=CHILD_ENV).stdout
        ceiling, ceiling_by_shape = json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:])
    print(f"matmul ceiling (median over {len(ceiling_by_shape)} shapes) {ceiling:.0f} TFLOP/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in ceiling_by_shape.items()) + f"; spec peak {peak:.0f}", flush=True)
    if args.ceiling_only:
        with open(os.path.join(args.out, "matmul_ceiling.json"), "w") as f:
            json.dump({"device": str(jax.devices()[0]), "jax": jax.__version__, "spec_peak_tflops": peak,
                       "matmul_ceiling_tflops": ceiling, "matmul_ceiling_by_shape": ceiling_by_shape}, f, indent=1)
        return
    cfg = slice_config(args.layers, args.batch, args.seq, "reference", "ragged_dot", args.optimizer, args.remat,
                       muon_clip=False, size=args.size, accum=args.accum)
    counts = count_params(cfg.model)
    results = {"device": str(jax.devices()[0]), "jax": jax.__version__, "spec_peak_tflops": peak,
               "matmul_ceiling_tflops": ceiling, "matmul_ceiling_by_shape": ceiling_by_shape,
               "layers": args.layers, "batch": args.batch, "accum": args.accum, "seq": args.seq, "optimizer": args.optimizer,
               "params_total": counts["total"]["all"], "params_active": counts["active"]["all"],
               "flops_per_token": flops_per_token(cfg.model, args.seq), "set": args.set, "variants": []}
    groups = [g.split() for g in args.compare] or [[]]
    for name in args.variants.split(","):  # one process per variant and group: clean peak memory, no leaked seams
        for group in groups:
            label = f"{name}[{' '.join(group)}]" if args.compare else name
            cmd = [sys.executable, os.path.abspath(__file__), "--only", name, "--ceiling", str(ceiling),
                   "--peak-tflops", str(peak)] + [
                f"--{k}={getattr(args, k)}" for k in ("size", "layers", "batch", "accum", "seq", "optimizer", "remat",
                                                      "reps", "profile", "out")] + [
                f"--set={s}" for s in args.set + group]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV,
                                      timeout=args.child_timeout or None)
                lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                record = (json.loads(lines[-1][len("RESULT "):]) if lines  # one that cannot run is reported
                          else {"variant": name, "error": (proc.stderr or proc.stdout)[-600:]})
            except subprocess.TimeoutExpired:
                record = {"variant": name, "error": f"stopped after --child-timeout {args.child_timeout:.0f} s"}
            record.update(label=label, overrides=group)
            results["variants"].append(record)
            print(json.dumps(record, default=str)[:2000], flush=True)
    with open(os.path.join(args.out, "train_step.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\nspec peak {peak:.0f} TFLOP/s, matmul ceiling {ceiling:.0f} TFLOP/s (median of {len(ceiling_by_shape)} "
          f"shapes); slice: {args.layers} layers, {counts['total']['all']/1e9:.2f}B "
          f"total, {counts['active']['all']/1e9:.2f}B active, batch {args.accum} x {args.batch}x{args.seq}")
    w = max([10] + [len(r["label"]) for r in results["variants"]])
    print(f"{'variant':<{w}} {'step ms':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'of ach.':>7} {'peak GiB':>9} "
          f"{'compile s':>9}")
    base = {r["variant"]: r for r in results["variants"] if "step_s" in r}
    for r in results["variants"]:
        if "error" in r:
            print(f"{r['label']:<{w}} error: {r['error'][:150]}")
            continue
        print(f"{r['label']:<{w}} {r['step_s']*1e3:>9.1f} {r['tokens_per_s']:>9.0f} {r['model_tflops_per_s']:>8.0f} "
              f"{r['mfu']:>6.1%} {r['of_achievable']:>7.1%} {r['peak_gib']:>9.1f} {r['compile_s']:>9.1f}")
    if args.compare:  # each group against the first of the same variant, same run
        for r in results["variants"]:
            ref = next(q for q in results["variants"] if q["variant"] == r["variant"])
            if r is not ref and "step_s" in r and "step_s" in ref:
                print(f"{r['label']} vs {ref['label']}: {ref['step_s'] / r['step_s']:.3f}x")
    if "kernels" in base:
        for other in ("xla", "tokamax"):
            if other in base:
                print(f"kernels vs {other}: {base[other]['step_s'] / base['kernels']['step_s']:.2f}x")
    for r in results["variants"]:
        for name, ms, share in r.get("top_ops", []):
            print(f"  {r['variant']}: {ms:8.2f} ms {share:6.1%}  {name[:90]}")


if __name__ == "__main__":
    main()
