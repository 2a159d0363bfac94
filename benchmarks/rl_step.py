"""One RL step of a Kanana-2-30B-A3B slice on one GPU, split into rollout and learner (what RL's wall time is made of).

    python3 benchmarks/rl_step.py --layers 8 --prompts 32 --group 8 --prompt-len 128 --new 128 --out $OUT
    python3 benchmarks/rl_step.py --size tiny --layers 2 --prompts 4 --group 2 --prompt-len 16 --new 8   # CPU check

Rollout: the project's Sampler (the one RL and rejection sampling use) on P prompts x G samples, the G samples of
a prompt sharing its prefill, bf16 weights; timed apart: prefill, and the decode loop (tokens/s). Beside each,
the HBM roofline of a decode step: the bytes it must read (every weight except the embedding table - at these
batches top-6 of 128 experts touches every expert - plus the KV cache) over the device-copy bandwidth measured in
the same process. Learner: the RL stage's jitted train step (GRPO loss with the chunked log-probs, bf16
compute, Pallas attention and MoE kernels, Muon as in BENCHMARKS.md's end-to-end step) on a [P, G, P+N] rollout batch, plus the two training-forward
log-prob passes the rollout source runs (old and reference). Random init: speeds, not quality. One JSON object
is printed and written to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kanana_jax import config as config_lib  # noqa: E402
from kanana_jax.generate import kv_cache  # noqa: E402
from kanana_jax.generate.sampler import Sampler, SamplingParams  # noqa: E402
from kanana_jax.model.flops import count_params  # noqa: E402
from kanana_jax.model.logprobs import head_weight, token_logprobs  # noqa: E402
from kanana_jax.train.builder import build_trainer  # noqa: E402


def rl_config(args):
    from experiments import sizes
    model = sizes.model_overrides(args.size)
    model.update(n_layers=args.layers, remat_policy=args.remat)
    if args.kernels:
        model.update(attention_impl="kernel", moe_impl="pallas")
    values = {"model": model, "train": {"stage": "rl", "steps": 100, "grad_accum_steps": args.accum},
              "optimizer": {"name": args.optimizer, "learning_rate": 1e-6, "warmup_steps": 0, "schedule": "constant"},
              "data": {"seq_len": args.prompt_len + args.new, "global_batch_size": args.prompts},
              "rl": {"group_size": args.group, "max_new_tokens": args.new}, "mesh": {"data": -1}}
    return config_lib.build(config_lib.ExperimentConfig, values)


def copy_bandwidth() -> float:
    """Device read+write bytes/s of a 2 GiB copy (median of 5)."""
    x = jnp.ones((1 << 28,), jnp.float32) if jax.default_backend() != "cpu" else jnp.ones((1 << 22,), jnp.float32)
    f = jax.jit(lambda x: x + 1)
    f(x).block_until_ready()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * x.nbytes / float(np.median(ts))


def rollout_batch(trainer, rng):
    """A rollout-shaped batch: random tokens, response masks, log-probs and advantages."""
    out = {}
    for k, f in trainer.batch_spec.items():
        if k.startswith(("inputs", "targets")):
            out[k] = rng.integers(0, trainer.cfg.model.vocab_size, f.shape).astype(f.dtype)
        elif k.startswith("positions"):
            out[k] = np.broadcast_to(np.arange(f.shape[-1], dtype=np.int32), f.shape).copy()
        elif k.startswith(("segment_ids", "sample_mask")):
            out[k] = np.ones(f.shape, f.dtype)
        elif k.startswith("loss_mask"):
            m = np.zeros(f.shape, f.dtype)
            m[..., -trainer.cfg.rl.max_new_tokens:] = 1
            out[k] = m
        elif k.startswith("track_ids"):
            out[k] = np.zeros(f.shape, f.dtype)
        else:
            out[k] = (rng.standard_normal(f.shape) * (0.1 if "logp" not in k else 0.3)
                      - (2.0 if "logp" in k else 0.0)).astype(f.dtype)
    return {k: jax.device_put(v, trainer.batch_sharding[k]) for k, v in out.items()}


def timed(f, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="kanana2_30b_a3b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--remat", default="none")
    p.add_argument("--optimizer", default="muon", help="muon (one moment: the 8-layer slice fits) or adamw")
    p.add_argument("--accum", type=int, default=1, help="learner microbatches (train.grad_accum_steps; splits P)")
    p.add_argument("--kernels", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/rl_step_bench"))
    args = p.parse_args()
    cfg = rl_config(args)
    rng = np.random.default_rng(0)
    report = {"device": jax.devices()[0].device_kind, "args": vars(args)}
    trainer = build_trainer(cfg)
    with trainer.context():
        t = time.perf_counter()
        state = trainer.init(jax.random.PRNGKey(0))
        batch = rollout_batch(trainer, rng)
        state, _ = trainer.train_step(state, batch)
        jax.block_until_ready(state.step)
        report["learner_compile_s"] = round(time.perf_counter() - t, 1)
        def step():
            nonlocal state
            state, m = trainer.train_step(state, batch)
            return m["loss"]
        report["learner_step_s"] = timed(step, args.reps)
        model = trainer.model
        def logprobs(params, b):
            h = model.apply({"params": params}, b["inputs_PxGxT"].reshape(-1, cfg.data.seq_len), return_hidden=True)
            return token_logprobs(h, head_weight(params, cfg.model), b["targets_PxGxT"].reshape(-1, cfg.data.seq_len))[0]
        lp = jax.jit(logprobs)
        jax.block_until_ready(lp(state.params, batch))
        report["logprob_pass_s"] = timed(lambda: lp(state.params, batch), args.reps)
        params16 = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, p))(
            state.params)
        del state
    sampler = Sampler(cfg.model, params16)
    prompts = [list(rng.integers(3, cfg.model.vocab_size, args.prompt_len)) for _ in range(args.prompts)]
    rows = [p_ for p_ in prompts for _ in range(args.group)]
    sampling = SamplingParams(max_new_tokens=args.new, temperature=1.0)
    t = time.perf_counter()
    sampler.generate_arrays(rows, sampling, jax.random.PRNGKey(1))
    report["rollout_compile_s"] = round(time.perf_counter() - t, 1)
    report["rollout_s"] = timed(lambda: sampler.generate_arrays(rows, sampling, jax.random.PRNGKey(2))["tokens"],
                                args.reps)
    short = SamplingParams(max_new_tokens=1, temperature=1.0)
    sampler.generate_arrays(rows, short, jax.random.PRNGKey(1))
    report["prefill_s"] = timed(lambda: sampler.generate_arrays(rows, short, jax.random.PRNGKey(3))["tokens"], args.reps)
    n_rows = len(rows)
    decode_s = max(report["rollout_s"] - report["prefill_s"], 1e-9)
    report["decode_tokens_per_s"] = n_rows * (args.new - 1) / decode_s
    report["decode_ms_per_step"] = 1e3 * decode_s / (args.new - 1)
    counts = count_params(cfg.model)
    weight_bytes = 2 * (counts["total"]["all"] - counts["total"]["embedding"])
    kv = kv_cache.cache_bytes(cfg.model, n_rows, args.prompt_len + args.new // 2)   # the mean cache length read
    bw = copy_bandwidth()
    report["copy_bandwidth_GBps"] = bw / 1e9
    report["roofline_ms_per_step"] = 1e3 * (weight_bytes + kv) / bw
    report["decode_fraction_of_roofline"] = report["roofline_ms_per_step"] / report["decode_ms_per_step"]
    report["rollout_share_of_rl_step"] = report["rollout_s"] / (report["rollout_s"] + 2 * report["logprob_pass_s"]
                                                                + report["learner_step_s"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rl_step.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
