"""Sampler decode speed: tokens/s and ms per step of the project's Sampler against the HBM roofline, by decode path.

    python3 benchmarks/sampler.py --layers 8 --batches 1,64,256 --variants first,new --out $OUT
    python3 benchmarks/sampler.py --layers 48 --batches 1,64,256,1024 --variants first,new --out $OUT
    python3 benchmarks/sampler.py --peer hf --layers 8 --batches 1,64 --out $OUT        # transformers on torch
    python3 benchmarks/sampler.py --size tiny --layers 3 --batches 1,4 --prompt-len 8 --new 4   # CPU check
    python3 benchmarks/sampler.py --sampling-only --sampling-batch 256 --sampling-methods sort,search --out $OUT
    python3 benchmarks/sampler.py --layers 48 --batches 512,1024,2048 --variants new --stop-after-error --out $OUT
    python3 benchmarks/sampler.py --layers 8 --batches 1,256 --variants new --profile 1,256 --out $OUT  # top ops

Model: the 30B-A3B reconstruction (experiments/sizes.py) at full width with --layers layers, random bf16 weights
made on the device. Each row: B random prompts of --prompt-len tokens, --new tokens sampled at temperature 1;
prefill (the Sampler's chunked prefill) and the decode loop (one jitted `lax.while_loop`, no host round trip
per token) timed apart, median of --reps. Variants (same weights, same process):
  first    the decode path as first landed: Pallas kernels in prefill, the model's MoE module (Pallas gmm) per
           decode step, MLA scores over a float32 copy of the latent cache
  xla_ref  our model without kernels (reference attention, jax.lax.ragged_dot MoE), first decode path (a peer)
  attn     `first` with the MLA matmuls on the bf16 cache (one lever alone)
  gather / capacity / kernel   the decode MoE paths of kanana_jax/generate/decode_moe.py with the bf16 MLA
  new      the default (DecodeOptions(): 'auto' = 'gather' at B*k <= E/4, else the model's MoE; bf16 MLA)
  unrolled `new` with the layer scan fully unrolled (straight-line layers in the decode loop's body)
Roofline per step: bytes a step must read over the copy bandwidth measured in the run (benchmarks/rl_step.py's
`copy_bandwidth`). 'all' counts every weight but the embedding table plus the mean KV cache (the issue's
definition); 'touched' counts the routed experts a batch of B rows is expected to touch under uniform routing,
E (1 - (1 - k/E)^B) per layer (at batch 1: 6 of 128), the bound that matters at small batch.
  new_sort `new` with top-k / top-p masks through a full sort (DecodeOptions(sampling_filter='sort'), the first
           version); give --top-p / --top-k to decode with those filters
Also: the sampling step alone (temperature / top-k / top-p over the vocabulary) at the largest batch (or
--sampling-batch), per --sampling-methods ('sort' = the first version, 'search' = the default threshold search;
`--sampling-only` skips the model). `--stop-after-error` with growing --batches finds the largest batch that fits.
One JSON object is printed and written to --out/sampler[_hf].json after every row.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

VARIANTS = {   # name: (model overrides, DecodeOptions kwargs)
    "first": ({"attention_impl": "kernel", "moe_impl": "pallas"}, {"moe": "model", "mla_matmul": "float32"}),
    "xla_ref": ({"attention_impl": "reference", "moe_impl": "ragged_dot"}, {"moe": "model", "mla_matmul": "float32"}),
    "attn": ({"attention_impl": "kernel", "moe_impl": "pallas"}, {"moe": "model"}),
    "gather": ({"attention_impl": "kernel", "moe_impl": "pallas"}, {"moe": "gather"}),
    "capacity": ({"attention_impl": "kernel", "moe_impl": "pallas"}, {"moe": "capacity"}),
    "kernel": ({"attention_impl": "kernel", "moe_impl": "pallas"}, {"moe": "kernel"}),
    "new": ({"attention_impl": "kernel", "moe_impl": "pallas"}, {}),
    "new_sort": ({"attention_impl": "kernel", "moe_impl": "pallas"}, {"sampling_filter": "sort"}),
    "unrolled": ({"attention_impl": "kernel", "moe_impl": "pallas"}, {"layer_unroll": 1024}),
}


def model_config(args, **overrides):
    from experiments import sizes
    from kanana_jax import config as config_lib
    values = sizes.model_overrides(args.size)
    values.update(n_layers=args.layers, remat_policy="none", **overrides)
    return config_lib.build(config_lib.ExperimentConfig, {"model": values}).model


def random_params(cfg, seed: int = 0):
    """Random normal weights (std cfg.init_std) of the model's tree made on the device: matrices in bf16 (the
    compute dtype), vectors in float32; norm scales 1. Leaf by leaf, so no float32 copy of the model exists."""
    import flax
    import jax
    import jax.numpy as jnp
    from kanana_jax.model import Transformer
    shapes = flax.linen.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0),
                                             jnp.zeros((1, 1), jnp.int32))["params"])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    make = jax.jit(lambda k, shape, dtype, std: (jax.random.normal(k, shape, jnp.float32) * std).astype(dtype),
                   static_argnums=(1, 2))
    out = []
    for (path, leaf), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            out.append(jnp.ones(leaf.shape, jnp.bfloat16 if leaf.ndim >= 2 else jnp.float32))
        elif name.endswith("['bias']"):
            out.append(jnp.zeros(leaf.shape, leaf.dtype))
        else:
            out.append(make(k, leaf.shape, jnp.bfloat16 if leaf.ndim >= 2 else jnp.float32, cfg.init_std))
    return jax.tree_util.tree_unflatten(treedef, out)


def roofline_bytes(cfg, batch: int, cache_len: int) -> dict:
    """{'all', 'touched'}: bytes one decode step reads (bf16 weights but the embedding table, + KV cache)."""
    from kanana_jax.generate import kv_cache
    from kanana_jax.model.flops import count_params
    total = count_params(cfg)["total"]
    weights = 2 * (total["all"] - total["embedding"])
    routed = 2 * total["routed_experts"]
    E, k = cfg.n_routed_experts, cfg.top_k
    touched_fraction = (1.0 - (1.0 - k / E) ** batch) if E else 1.0
    kv = kv_cache.cache_bytes(cfg, batch, cache_len)
    return {"all": weights + kv, "touched": weights - routed + routed * touched_fraction + kv,
            "kv": kv, "touched_experts_per_layer": E * touched_fraction}


def timed_generation(sampler, cfg, batch: int, prompt_len: int, new: int, reps: int, rng, top_k=0, top_p=1.0):
    """(prefill s, decode s, compile s): medians of the Sampler's prefill and decode loop on `batch` random
    prompts, sampling at temperature 1 with the given top-k / top-p."""
    import jax
    tokens, lengths, controls, static, cache_len = generation_inputs(sampler, cfg, batch, prompt_len, new, rng,
                                                                     top_k, top_p)
    pre, dec = [], []
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        cache, logits = sampler._prefill_in_chunks(tokens, lengths, cache_len)
        jax.block_until_ready(logits)
        t1 = time.perf_counter()
        out = sampler._decode(sampler.params, cache, logits, lengths, jax.random.PRNGKey(rep), controls, **static)
        jax.block_until_ready(out["tokens"])
        t2 = time.perf_counter()
        if rep:   # rep 0 compiles
            pre.append(t1 - t0)
            dec.append(t2 - t1)
        else:
            compile_s = t2 - t0
        del out, cache
    return float(np.median(pre)), float(np.median(dec)), compile_s


def generation_inputs(sampler, cfg, batch: int, prompt_len: int, new: int, rng, top_k=0, top_p=1.0):
    """(tokens, lengths, controls, static, cache_len) of `batch` random prompts, temperature 1."""
    from kanana_jax.generate.sampler import SamplingParams, _bucket, make_controls
    ids = [list(rng.integers(3, cfg.vocab_size, prompt_len)) for _ in range(batch)]
    Pb = _bucket(prompt_len, sampler.min_prompt_bucket)
    tokens, lengths = sampler._left_padded(ids, batch, Pb)
    sampling = SamplingParams(max_new_tokens=new, temperature=1.0, top_k=top_k, top_p=top_p)
    controls, static = make_controls(sampling, (), 0)
    return tokens, lengths, controls, static, Pb + new - 1


def profiled_generation(sampler, cfg, batch: int, prompt_len: int, new: int, rng, top_k=0, top_p=1.0, top=20):
    """Device ops of 3 traced generations (prefill + decode loop; compiled before the trace): [(op name, ms per
    decode step, share of device time)] with each op's time over the whole generation divided by new - 1 steps,
    and (busy ms, span ms) per generation (span > busy: the device waited on the host)."""
    import jax
    from benchmarks.device_ops import device_op_ms
    tokens, lengths, controls, static, cache_len = generation_inputs(sampler, cfg, batch, prompt_len, new, rng,
                                                                     top_k, top_p)

    def one():
        cache, logits = sampler._prefill_in_chunks(tokens, lengths, cache_len)
        return sampler._decode(sampler.params, cache, logits, lengths, jax.random.PRNGKey(0), controls,
                               **static)["tokens"]

    rows, (busy_ms, span_ms) = device_op_ms(one, runs=3, top=top, with_span=True)
    return [(name, ms / (new - 1), share) for name, ms, share in rows], (busy_ms, span_ms)


SAMPLING_SETTINGS = {   # name: sample() kwargs; names ending in _bf16ties use the logits rounded to bfloat16
    "temperature_1": {}, "greedy": {"temperature": 0.0}, "top_k_50": {"top_k": 50}, "top_p_0.95": {"top_p": 0.95},
    "top_k_50_top_p_0.95": {"top_k": 50, "top_p": 0.95},
    "top_k_50_bf16ties": {"top_k": 50}, "top_p_0.95_bf16ties": {"top_p": 0.95}}
SAMPLING_METHODS = {   # name: sample() kwargs ('search': sampling.SEARCH_BITS key bits per pass)
    "sort": {"method": "sort"}, "search": {"method": "search"},
    "search_bits4": {"method": "search", "search_bits": 4}}


def sampling_times(batch: int, vocab: int, methods, reps: int = 20) -> dict:
    """{method: {setting: ms}} of one `sampling.sample` call on [batch, vocab] float32 logits (N(0, 3^2); rounded
    to bfloat16 values for the *_bf16ties settings, so the top-k / top-p boundaries are tied and cut by id), and
    {method: {setting: mask entries differing from 'sort'}} on the same logits."""
    import jax
    import jax.numpy as jnp
    from kanana_jax.generate import sampling
    f32 = jax.random.normal(jax.random.PRNGKey(0), (batch, vocab), jnp.float32) * 3
    bf16ties = f32.astype(jnp.bfloat16).astype(jnp.float32)
    mask = jax.jit(lambda x, opts: jnp.isfinite(sampling.filter_logits(x, **dict(opts))), static_argnames="opts")
    out, mismatch, ref = {}, {}, {}
    for method in methods:
        out[method], mismatch[method] = {}, {}
        method_kw = SAMPLING_METHODS[method]
        for name, kw in SAMPLING_SETTINGS.items():
            logits = bf16ties if name.endswith("_bf16ties") else f32
            opts = {**kw, **method_kw}
            f = jax.jit(lambda x, key, opts=opts: sampling.sample(x, key, **opts)[0])
            jax.block_until_ready(f(logits, jax.random.PRNGKey(1)))
            ts = []
            for i in range(reps):
                t = time.perf_counter()
                jax.block_until_ready(f(logits, jax.random.PRNGKey(i)))
                ts.append(time.perf_counter() - t)
            out[method][name] = 1e3 * float(np.median(ts))
            if "top" in name:
                if name not in ref:
                    ref[name] = mask(logits, tuple({**kw, "method": "sort"}.items()))
                mismatch[method][name] = int(jnp.sum(ref[name] != mask(logits, tuple(opts.items()))))
        print(json.dumps({"sampling_ms": {method: out[method]}, "masks_differing_from_sort": {
            method: mismatch[method]}}), flush=True)
    return {"ms": out, "masks_differing_from_sort": mismatch}


def write(report, args, suffix=""):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"sampler{suffix}.json"), "w") as f:
        json.dump(report, f, indent=1)


def run_jax(args):
    import jax
    from benchmarks.rl_step import copy_bandwidth
    from kanana_jax.generate.decode_model import DecodeOptions
    from kanana_jax.generate.sampler import Sampler
    report = {"device": jax.devices()[0].device_kind, "args": vars(args), "rows": []}
    base = model_config(args)
    if args.sampling_only:
        batch = args.sampling_batch or max(args.batches)
        report["sampling"] = {"batch": batch, "vocab": base.vocab_size,
                              **sampling_times(batch, base.vocab_size, args.sampling_methods)}
        write(report, args)
        return
    t = time.perf_counter()
    params = random_params(base)
    jax.block_until_ready(params)
    report["init_s"] = round(time.perf_counter() - t, 1)
    bw = copy_bandwidth()
    report["copy_bandwidth_GBps"] = bw / 1e9
    rng = np.random.default_rng(0)
    failed = False
    for batch in args.batches:
        if failed and args.stop_after_error:
            break
        roof = roofline_bytes(base, batch, args.prompt_len + args.new // 2)   # the mean cache length read
        for name in args.variants:
            overrides, options = VARIANTS[name]
            cfg = model_config(args, **overrides)
            row = {"variant": name, "batch": batch}
            try:
                sampler = Sampler(cfg, params, decode_options=DecodeOptions(**options))
                pre, dec, comp = timed_generation(sampler, cfg, batch, args.prompt_len, args.new, args.reps, rng,
                                                  args.top_k, args.top_p)
            except Exception as err:  # a variant that cannot run here is reported, the others still run
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                print(json.dumps(row), flush=True)
                report["rows"].append(row)
                write(report, args)
                failed = True
                continue
            steps = args.new - 1
            ms = 1e3 * dec / steps
            row.update(compile_s=round(comp, 1), prefill_ms=1e3 * pre, decode_ms_per_step=ms,
                       decode_tokens_per_s=batch * steps / dec,
                       tokens_per_s_incl_prefill=batch * args.new / (pre + dec),
                       roofline_ms_all=1e3 * roof["all"] / bw, roofline_ms_touched=1e3 * roof["touched"] / bw,
                       touched_experts_per_layer=roof["touched_experts_per_layer"])
            row["fraction_of_roofline_all"] = row["roofline_ms_all"] / ms
            row["fraction_of_roofline_touched"] = row["roofline_ms_touched"] / ms
            if batch in args.profile:
                row["top_ops_ms_per_step"], (busy, span) = profiled_generation(
                    sampler, cfg, batch, args.prompt_len, args.new, rng, args.top_k, args.top_p)
                row.update(profile_busy_ms=busy, profile_span_ms=span)
            print(json.dumps(row), flush=True)
            report["rows"].append(row)
            write(report, args)
            del sampler
    if args.sampling:
        batch = args.sampling_batch or max(args.batches)
        report["sampling"] = {"batch": batch, "vocab": base.vocab_size,
                              **sampling_times(batch, base.vocab_size, args.sampling_methods)}
    write(report, args)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    table(report)


def run_hf(args):
    """transformers' DeepseekV3ForCausalLM.generate on the same shapes (random bf16 weights on the GPU)."""
    import torch
    import transformers
    from kanana_jax.convert.hf_config import hf_config_from_model
    cfg = model_config(args)
    hf = hf_config_from_model(cfg, torch_dtype="bfloat16")
    report = {"peer": f"transformers {transformers.__version__} DeepseekV3ForCausalLM.generate, torch "
                      f"{torch.__version__}", "device": torch.cuda.get_device_name(), "args": vars(args), "rows": []}
    torch.set_default_dtype(torch.bfloat16)
    t = time.perf_counter()
    with torch.device("cuda"):
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**hf)).eval()
    torch.cuda.synchronize()
    report["init_s"] = round(time.perf_counter() - t, 1)
    report["experts_implementation"] = str(getattr(model.config, "_experts_implementation", None))
    gen = torch.Generator(device="cuda").manual_seed(0)

    def run(batch, new):
        ids = torch.randint(3, cfg.vocab_size, (batch, args.prompt_len), device="cuda", generator=gen)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    for batch in args.batches:
        row = {"variant": "hf", "batch": batch}
        try:
            run(batch, 2)
            pre = float(np.median([run(batch, 1) for _ in range(args.reps)]))
            full = float(np.median([run(batch, args.new) for _ in range(args.reps)]))
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        else:
            dec = max(full - pre, 1e-9)
            row.update(prefill_ms=1e3 * pre, decode_ms_per_step=1e3 * dec / (args.new - 1),
                       decode_tokens_per_s=batch * (args.new - 1) / dec, tokens_per_s_incl_prefill=batch * args.new / full)
        print(json.dumps(row), flush=True)
        report["rows"].append(row)
        write(report, args, "_hf")


def table(report):
    print(f"\n{'variant':9} {'batch':>5} {'prefill ms':>10} {'ms/step':>8} {'tok/s':>9} {'roof all':>8} "
          f"{'frac':>5} {'roof touched':>12} {'frac':>5}")
    for r in report["rows"]:
        if "error" in r:
            print(f"{r['variant']:9} {r['batch']:>5} error: {r['error'][:90]}")
            continue
        print(f"{r['variant']:9} {r['batch']:>5} {r['prefill_ms']:>10.1f} {r['decode_ms_per_step']:>8.2f} "
              f"{r['decode_tokens_per_s']:>9.0f} {r['roofline_ms_all']:>8.2f} {r['fraction_of_roofline_all']:>5.2f} "
              f"{r['roofline_ms_touched']:>12.2f} {r['fraction_of_roofline_touched']:>5.2f}")
    for r in report["rows"]:
        if r.get("top_ops_ms_per_step"):
            print(f"\n{r['variant']} batch {r['batch']}: device busy {r['profile_busy_ms']:.1f} ms of a "
                  f"{r['profile_span_ms']:.1f} ms generation; top ops, ms per decode step (prefill's spread in):")
            for name, ms, share in r["top_ops_ms_per_step"]:
                print(f"  {ms:8.3f} ms {share:6.1%}  {name[:100]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="kanana2_30b_a3b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 256])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--variants", type=lambda s: s.split(","), default=["first", "new"])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--sampling", type=int, default=1, help="also time the sampling step alone")
    p.add_argument("--sampling-only", action="store_true", help="time only the sampling step (no model)")
    p.add_argument("--sampling-batch", type=int, default=0, help="its batch (default: the largest of --batches)")
    p.add_argument("--sampling-methods", type=lambda s: s.split(","), default=["sort", "search"],
                   help=f"mask implementations to time: {', '.join(SAMPLING_METHODS)}")
    p.add_argument("--top-k", type=int, default=0, help="the decode rows' top-k (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="the decode rows' top-p (1: off)")
    p.add_argument("--stop-after-error", action="store_true",
                   help="no larger batch after one that failed (growing --batches: the largest that fits)")
    p.add_argument("--peer", default="", help="'hf': transformers' generate instead of our Sampler")
    p.add_argument("--profile", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                   help="batches whose generation is also traced: the top device ops per decode step")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/sampler_bench"))
    args = p.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown --variants {unknown}; allowed: {', '.join(VARIANTS)}")
    unknown = [m for m in args.sampling_methods if m not in SAMPLING_METHODS]
    if unknown:
        p.error(f"unknown --sampling-methods {unknown}; allowed: {', '.join(SAMPLING_METHODS)}")
    if args.new < 2:
        p.error("--new must be >= 2 (the first token comes from the prefill; decode steps are new - 1)")
    run_hf(args) if args.peer == "hf" else run_jax(args)


if __name__ == "__main__":
    main()
