"""Expert-parallel + FSDP training step on every GPU count the machine has (1, 2, 4, 8): correctness and scaling.

    python3 benchmarks/multi_gpu.py --out $OUT                    # all GPUs of the machine; tiny, small, 30b slice
    python3 benchmarks/multi_gpu.py --configs tiny --fake-cpu 8    # CPU dry run on 8 fake devices (no timing claims)

For each config and each device count n in {1, 2, 4, 8} (up to the machine's GPUs):
  check: the `fsdp_ep` step on n devices (mesh fsdp x expert, batch split over both) gives the same loss and
         grad norm as the one-device step on the same global batch (fp32 tiny: 1e-5; bf16: 2e-2 relative);
  speed: tokens/s per device with a fixed per-device batch (weak scaling), median of --steps timed steps;
  profile (largest n): share of device time spent in all-to-all / ragged-all-to-all (the expert exchange),
         in all-gather / reduce-scatter / all-reduce (FSDP), from a jax.profiler trace.
Configs: tiny and small (experiments/sizes.py), '30b' = the Kanana-2-30B-A3B reconstruction at full width with
--layers layers. Prints a table and writes multi_gpu.json to --out.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {  # name -> (size, per-device batch, seq_len, extra model overrides)
    "tiny": ("tiny", 4, 128, {}),
    "small": ("small", 4, 1024, {"moe_impl": "ragged_dot"}),
    "30b": ("kanana2_30b_a3b", 1, 4096, {"moe_impl": "ragged_dot", "remat_policy": "full"}),
}
COLLECTIVES = {"all_to_all": ("all-to-all", "alltoall", "all_to_all", "ragged-all-to-all"),
               "fsdp_collectives": ("all-gather", "allgather", "reduce-scatter", "reducescatter", "all-reduce",
                                    "allreduce")}


def make_config(name: str, n_devices: int, global_batch: int, layers: int):
    """Validated ExperimentConfig of `name` under fsdp_ep on `n_devices` (expert axis as wide as divides E, <= 8)."""
    from experiments import sizes
    from kanana_jax import config as config_lib
    size, _, seq, extra = CONFIGS[name]
    model = sizes.model_overrides(size)
    model.update(extra)
    if name == "30b":
        model["n_layers"] = layers
    expert = 1
    while expert * 2 <= min(n_devices, 8) and model["n_routed_experts"] % (expert * 2) == 0 \
            and n_devices % (expert * 2) == 0:
        expert *= 2
    return config_lib.build(config_lib.ExperimentConfig, {
        "model": model, "data": {"seq_len": seq, "global_batch_size": global_batch},
        "optimizer": {"learning_rate": 1e-3, "warmup_steps": 0, "schedule": "constant"},
        "train": {"steps": 1000},
        "mesh": {"rules": "fsdp_ep", "data": 1, "fsdp": n_devices // expert, "expert": expert, "tensor": 1}})


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """Random tokens in 2 packed documents per row (shapes are what matter)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    half = seq // 2
    segments = np.where(np.arange(seq) < half, 1, 2).astype(np.int32)[None].repeat(batch, 0)
    positions = np.where(np.arange(seq) < half, np.arange(seq), np.arange(seq) - half)[None].repeat(batch, 0)
    return {"inputs_BxT": tokens[:, :-1], "targets_BxT": tokens[:, 1:], "segment_ids_BxT": segments,
            "positions_BxT": positions.astype(np.int32), "loss_mask_BxT": np.ones((batch, seq), np.float32)}


def one_step(cfg, devices, batch):
    """(trainer, state after one step, metrics) of cfg on `devices` from the seed-0 initial state."""
    import jax
    from kanana_jax import sharding
    from kanana_jax.train.builder import build_trainer
    trainer = build_trainer(cfg, devices=devices)
    with trainer.context():
        state = trainer.init(jax.random.PRNGKey(0))
        state, metrics = trainer.train_step(state, sharding.put_batch(batch, trainer.batch_sharding))
        return trainer, state, jax.device_get(metrics)


def time_steps(trainer, state, batch, steps: int):
    """Median seconds per train step over `steps` timed steps (after one more warm-up step)."""
    import jax
    from kanana_jax import sharding
    with trainer.context():
        placed = sharding.put_batch(batch, trainer.batch_sharding)
        state, metrics = trainer.train_step(state, placed)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = trainer.train_step(state, placed)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    return state, statistics.median(times)


def collective_shares(trainer, state, batch, trace_dir: str, steps: int = 3) -> dict:
    """Share of device time per collective family (COLLECTIVES) over `steps` traced steps."""
    import jax
    from kanana_jax import sharding
    with trainer.context():
        placed = sharding.put_batch(batch, trainer.batch_sharding)
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(steps):
            state, metrics = trainer.train_step(state, placed)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
    paths = [os.path.join(r, f) for r, _, fs in os.walk(trace_dir) for f in fs if f.endswith(".trace.json.gz")]
    if not paths:
        return {"error": "no perfetto trace written"}
    with gzip.open(paths[0]) as f:
        events = json.load(f).get("traceEvents", [])
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {p for p, n in names.items() if "/device:" in n.lower() or "gpu" in n.lower()}
    busy, per_family = 0.0, defaultdict(float)
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device_pids:
            continue
        busy += e.get("dur", 0.0)
        lowered = e.get("name", "").lower()
        for family, keys in COLLECTIVES.items():
            if any(k in lowered for k in keys):
                per_family[family] += e.get("dur", 0.0)
                break
    return {family: per_family[family] / busy if busy else 0.0 for family in COLLECTIVES}


def tolerance(cfg) -> float:
    return 1e-5 if cfg.model.dtype == "float32" else 2e-2


def run(names, counts, steps: int, layers: int, out_dir: str) -> list[dict]:
    import jax
    devices = jax.devices()
    rows = []
    for name in names:
        _, per_device, seq, _ = CONFIGS[name]
        for n in counts:
            cfg = make_config(name, n, per_device * n, layers)
            batch = synthetic_batch(per_device * n, seq, cfg.model.vocab_size)
            trainer, state, metrics = one_step(cfg, devices[:n], batch)
            row = {"config": name, "devices": n, "mesh": {k: int(v) for k, v in trainer.mesh.shape.items()},
                   "global_batch": per_device * n, "seq_len": seq, "loss": float(metrics["loss"]),
                   "grad_norm": float(metrics["grad_norm"])}
            if n > 1:  # the same global batch on one device
                ref_cfg = make_config(name, 1, per_device * n, layers)
                _, _, ref = one_step(ref_cfg, devices[:1], batch)
                row["ref_loss"], row["ref_grad_norm"] = float(ref["loss"]), float(ref["grad_norm"])
                rel = abs(row["loss"] - row["ref_loss"]) / abs(row["ref_loss"])
                row["loss_rel_diff"], row["loss_matches"] = rel, rel <= tolerance(cfg)
            state, seconds = time_steps(trainer, state, batch, steps)
            row["step_ms"] = seconds * 1e3
            row["tokens_per_s_per_device"] = per_device * seq / seconds
            if n == max(counts) and out_dir:
                row["profile"] = collective_shares(trainer, state, batch, os.path.join(out_dir, f"trace_{name}_{n}"))
            rows.append(row)
            print(json.dumps(row), flush=True)
            del trainer, state
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,small,30b")
    parser.add_argument("--counts", default="", help="device counts (default: 1,2,4,8 up to the machine's)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4, help="layers of the 30b slice")
    parser.add_argument("--out", default=os.environ.get("OUT", ""))
    parser.add_argument("--fake-cpu", type=int, default=0, help="run on this many fake CPU devices instead")
    args = parser.parse_args()
    if args.fake_cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.fake_cpu}").strip()
    import jax
    available = len(jax.devices())
    counts = [int(c) for c in args.counts.split(",") if c] or [c for c in (1, 2, 4, 8) if c <= available]
    if max(counts) > available:
        raise SystemExit(f"--counts asks for {max(counts)} devices but this machine has {available}")
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; allowed: {', '.join(CONFIGS)}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    rows = run(names, counts, args.steps, args.layers, args.out)
    device = jax.devices()[0].device_kind
    print(f"\n{device} x{available}  (fsdp_ep; weak scaling, per-device batch fixed)")
    print(f"{'config':<7}{'n':>3} {'mesh f x e':>11}{'loss':>9}{'1-dev loss':>11}{'match':>6}"
          f"{'ms/step':>9}{'tok/s/dev':>11}{'a2a share':>10}")
    for r in rows:
        share = r.get("profile", {}).get("all_to_all")
        print(f"{r['config']:<7}{r['devices']:>3} {r['mesh']['fsdp']:>5} x {r['mesh']['expert']:<3}{r['loss']:>9.4f}"
              f"{r.get('ref_loss', r['loss']):>11.4f}{str(r.get('loss_matches', '-')):>6}{r['step_ms']:>9.1f}"
              f"{r['tokens_per_s_per_device']:>11.0f}{'' if share is None else f'{share:.1%}':>10}")
    if args.out:
        with open(os.path.join(args.out, "multi_gpu.json"), "w") as f:
            json.dump({"device": device, "devices": available, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
