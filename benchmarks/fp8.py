"""FP8 vs bf16 on one H200: dense projection matmuls, the grouped matmul (ours fp8 / ours bf16 / tokamax), the MoE
layer, and the train step of the 30B-A3B slice. Each mode runs in its own process; fp8 never runs on CPU.

    python3 benchmarks/fp8.py dense --out $OUT/dense.json       # fp8.matmul fwd+bwd (both dot forms) vs bf16 einsum
    python3 benchmarks/fp8.py gmm --out $OUT/gmm.json           # device check, then fp8 gmm vs bf16 gmm vs tokamax
    python3 benchmarks/fp8.py layer --out $OUT/layer.json       # MoE layer fwd+bwd, fp8 vs bf16, same process
    python3 benchmarks/fp8.py wgrad --out $OUT/wgrad.json       # device check, then fp8 vs bf16 weight-gradient tgmm
    python3 benchmarks/fp8.py step --layers 8 --batch 4 --accum 4 --out $OUT/step.json   # train step bf16 vs fp8
    python3 benchmarks/fp8.py table $OUT/*.json

The step mode builds its variants through the config like any run: bf16 is the slice config (plus `--set`
overrides), fp8 adds `precision.matmul=fp8`, `precision.fp8_grad_dtype=<--grad-dtype>`,
`precision.fp8_lm_head=<--lm-head>` and any `--fp8-set` overrides (e.g. --fp8-set precision.fp8_scaling=delayed);
fp8_percall is fp8 with `precision.fp8_prequantize=false` (every matmul call quantizes its weight, as before the
step made the copies once: `--variants bf16,fp8_percall,fp8` measures both in one run).

Shapes: the 30B-A3B reconstruction (hidden 2048, MLA 16 heads, 128 experts of 768, top-6) at 4 x 4096 tokens
per microbatch. XLA's fp8 GEMMs are autotuned per shape at compile time (25-42 s each with the default flags,
PERFORMANCE.md); `--xla-flags` passes flags to the child processes (e.g. --xla_gpu_autotune_level=0).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import peers  # noqa: E402

DENSE_SHAPES = {  # (M tokens, K, N): attention q/out projections, shared-expert MLP, dense MLP, LM head
    "proj_2048x2048": (16384, 2048, 2048), "wkv_b_512x4096": (16384, 512, 4096),
    "shared_2048x1536": (16384, 2048, 1536), "lm_head_2048x128256": (16384, 2048, 128256)}


def _require_fp8_gpu():
    from kanana_jax.model import fp8
    fp8.check_supported(fp8.Fp8Recipe(), for_timing=True)


def _timed(fn, *args, reps):
    """(compile seconds, median seconds per call) of a jitted fn."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    return compile_s, peers.bench(fn, *args, reps=reps, warm=2)


def dense(args):
    _require_fp8_gpu()
    from kanana_jax.model import fp8
    out = {"device": str(jax.devices()[0]), "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": []}
    names = args.shapes.split(",") if args.shapes else list(DENSE_SHAPES)
    for name in names:
        m, k, n = DENSE_SHAPES[name]
        x = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.bfloat16)
        w = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32).astype(jnp.bfloat16) * 0.02
        flops = 3 * 2 * m * k * n
        variants = {"bf16": lambda x, w: jnp.einsum("mk,kn->mn", x, w)}
        for form in args.forms.split(","):
            r = fp8.Fp8Recipe(dot_form=form)
            variants[f"fp8_{form}"] = lambda x, w, r=r: fp8.matmul(x, w, r)
        for label, f in variants.items():
            step = jax.jit(jax.value_and_grad(lambda x, w, f=f: jnp.sum(f(x, w).astype(jnp.float32)),
                                              argnums=(0, 1)))
            try:
                c, s = _timed(step, x, w, reps=args.reps)
                rec = {"shape": name, "variant": label, "compile_s": c, "ms": 1e3 * s, "tflops": flops / s / 1e12}
            except Exception as e:
                rec = {"shape": name, "variant": label, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(rec, flush=True)
            out["rows"].append(rec)
    _write(args.out, out)


def gmm_mode(args):
    _require_fp8_gpu()
    from benchmarks.moe import FULL, oracle_gmm, ragged_sizes, rel_err, time_gmm
    from pallas_kernels.moe import gmm
    from pallas_kernels.moe.fp8 import gmm_fp8, gmm_fp8_reference
    E, K, N = FULL["E"], FULL["D"], FULL["F"]
    rows = FULL["tokens"] * FULL["k"]
    lhs, rhs, gs = peers.moe_inputs(E=E, K=K, N=N, rows=rows)
    out = {"device": str(jax.devices()[0]), "shape": dict(rows=rows, E=E, K=K, N=N)}
    # device check: ragged sizes with empty groups and rows past the groups
    gs_r = ragged_sizes(rows, E, 1)
    f8 = jax.jit(lambda l, r, g: gmm_fp8(l, r, g, backend="gpu"))
    got = f8(lhs, rhs, gs_r)
    out["check"] = {"fwd_vs_dequantized_rel": rel_err(got, gmm_fp8_reference(lhs, rhs, gs_r)),
                    "fwd_vs_bf16_exact_rel": rel_err(got, oracle_gmm(lhs, rhs, gs_r)),
                    "rows_past_groups_zero": bool(jnp.all(got[int(gs_r.sum()):] == 0))}
    dout = jax.random.normal(jax.random.PRNGKey(7), (rows, N), jnp.bfloat16)
    # dout is an argument: closed over, XLA would constant-fold its amax (minutes of compile)
    loss = lambda fn: (lambda l, r, g, d: jnp.sum(fn(l, r, g).astype(jnp.float32) * d.astype(jnp.float32)))
    g8 = jax.jit(jax.grad(loss(lambda l, r, g: gmm_fp8(l, r, g, backend="gpu")), argnums=(0, 1)))(
        lhs, rhs, gs_r, dout)
    gref = jax.jit(jax.grad(loss(oracle_gmm), argnums=(0, 1)))(lhs, rhs, gs_r, dout)
    out["check"].update(dlhs_rel=rel_err(g8[0], gref[0]), drhs_rel=rel_err(g8[1], gref[1]))
    print("check", out["check"], flush=True)
    # the kernels alone on pre-quantized operands (what fp8 saves before the quantizing passes)
    from pallas_kernels.moe import Tiling
    from pallas_kernels.moe.fp8 import quantize_tensor, quantize_weights, scaled_gmm
    qx, sx = quantize_tensor(lhs)
    qw, qw_t, sw = quantize_weights(rhs)
    qg, sg = quantize_tensor(dout, "e5m2")
    flops = 2 * rows * K * N
    out["kernels"] = {}
    calls = {"bf16_fwd": (lambda: jax.jit(lambda l, r, g: gmm(l, r, g, backend="gpu")), (lhs, rhs, gs)),
             "bf16_dlhs": (lambda: jax.jit(lambda d, r, g: gmm(d, r, g, transpose_rhs=True, backend="gpu")),
                           (dout, rhs, gs))}
    for t in [None, Tiling(128, 128, 128, 4), Tiling(64, 128, 256, 3)]:
        tag = "default" if t is None else f"{t.tm}x{t.tk}x{t.tn}x{t.stages}"
        calls[f"fp8_fwd_{tag}"] = (lambda t=t: jax.jit(lambda q, r, g, s: scaled_gmm(
            q, r, g, s, out_dtype=jnp.bfloat16, tiling=t, backend="gpu")), (qx, qw_t, gs, sx * sw))
        calls[f"fp8_dlhs_{tag}"] = (lambda t=t: jax.jit(lambda q, r, g, s: scaled_gmm(
            q, r, g, s, out_dtype=jnp.bfloat16, tiling=t, backend="gpu")), (qg, qw, gs, sg * sw))
    for name, (make, a) in calls.items():
        try:
            ms = 1e3 * peers.bench(make(), *a, reps=args.reps)
            out["kernels"][name] = {"ms": ms, "tflops": flops / ms / 1e9}
        except Exception as e:
            out["kernels"][name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(name, out["kernels"][name], flush=True)
    quant = {"x": (jax.jit(quantize_tensor), (lhs,)), "w": (jax.jit(quantize_weights), (rhs,))}
    for name, (f, a) in quant.items():
        out["kernels"][f"quantize_{name}"] = {"ms": 1e3 * peers.bench(f, *a, reps=args.reps)}
    print("quantize", {k: v for k, v in out["kernels"].items() if k.startswith("quantize")}, flush=True)
    impls = {"ours_fp8": lambda l, r, g: gmm_fp8(l, r, g, backend="gpu"),
             "ours_bf16": lambda l, r, g: gmm(l, r, g, backend="gpu"),
             "tokamax_bf16": peers.peer_grouped_matmul("tokamax")}
    out["gmm"] = {}
    for name, fn in impls.items():
        try:
            fwd, fb = time_gmm(fn, lhs, rhs, gs, reps=args.reps)
            out["gmm"][name] = {"fwd_tflops": fwd, "fwdbwd_tflops": fb}
        except Exception as e:
            out["gmm"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(name, out["gmm"][name], flush=True)
    _write(args.out, out)


def layer(args):
    _require_fp8_gpu()
    from benchmarks.moe import FULL, layer_params, moe_layer
    from pallas_kernels.moe import gmm
    from pallas_kernels.moe.fp8 import gmm_fp8
    shape = FULL
    params = layer_params(shape)
    x = jax.random.normal(jax.random.PRNGKey(5), (shape["tokens"], shape["D"]), jnp.bfloat16)
    out = {"device": str(jax.devices()[0]), "rows": []}
    M, D, F = shape["tokens"] * shape["k"], shape["D"], shape["F"]
    for name, fn in {"bf16": lambda l, r, g: gmm(l, r, g, backend="gpu"),
                     "fp8": lambda l, r, g: gmm_fp8(l, r, g, backend="gpu")}.items():
        loss = lambda p, x, fn=fn: jnp.sum(moe_layer(p, x, fn, k=shape["k"]).astype(jnp.float32))
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        c, s = _timed(step, params, x, reps=args.reps)
        val, grads = step(params, x)
        rec = {"variant": name, "fwdbwd_ms": 1e3 * s, "gmm_tflops": 18 * M * D * F / s / 1e12, "compile_s": c,
               "loss": float(val),
               "grad_norms": {n: float(jnp.linalg.norm(g.astype(jnp.float32))) for n, g in grads[0].items()}}
        print(rec, flush=True)
        out["rows"].append(rec)
    _write(args.out, out)


def layout_variants():
    """Ways to make the group-padded K-major copy [K, P] of an fp8 [M, K] (the fp8 weight gradient's operands),
    timed by `wgrad --layout-only`; fp8.kmajor_by_group is the one kept."""
    from pallas_kernels.moe.tiling import padded_group_rows
    bar = jax.lax.optimization_barrier

    def fused(q, gs):  # one XLA expression: XLA fuses the index math into the gather-transpose
        src, valid = padded_group_rows(gs, q.shape[0], 128)
        return jnp.where(valid[:, None], q[src], jnp.zeros((), q.dtype)).T

    def split(q, gs):  # indices, row gather [P, K] and transpose each its own pass
        src, valid = bar(padded_group_rows(gs, q.shape[0], 128))
        return bar(jnp.where(valid[:, None], q[src], jnp.zeros((), q.dtype))).T

    def split_u32(q, gs):  # as split, the row gather on 4-byte words
        src, valid = bar(padded_group_rows(gs, q.shape[0], 128))
        m, k = q.shape
        u = jax.lax.bitcast_convert_type(q.reshape(m, k // 4, 4), jnp.uint32)
        rows = bar(jnp.where(valid[:, None], u[src], jnp.zeros((), jnp.uint32)))
        return jax.lax.bitcast_convert_type(rows, q.dtype).reshape(-1, k).T

    def transpose_first(q, gs):  # transpose [K, M], then gather along the minor dim
        src, valid = bar(padded_group_rows(gs, q.shape[0], 128))
        return jnp.where(valid[None], bar(q.T)[:, src], jnp.zeros((), q.dtype))

    return {"fused": fused, "split": split, "split_u32": split_u32, "transpose_first": transpose_first}


def wgrad_layouts(args):
    """`wgrad --layout-only`: the layout variants at the gate/up operands, each checked equal to the kept one."""
    from benchmarks.moe import FULL
    from pallas_kernels.moe import gpu as moe_gpu
    from pallas_kernels.moe.fp8 import kmajor_by_group, quantize_tensor
    rows, E = FULL["tokens"] * FULL["k"], FULL["E"]
    _, _, gs = peers.moe_inputs(E=E, K=8, N=8, rows=rows)
    out = {"device": str(jax.devices()[0]), "rows": rows, "E": E, "layouts": {}}
    ops_ = {}
    for width, tag in ((FULL["D"], "x"), (FULL["F"], "g")):
        q, _ = quantize_tensor(jax.random.normal(jax.random.PRNGKey(width), (rows, width), jnp.bfloat16))
        want = jax.jit(kmajor_by_group, static_argnums=2)(q, gs, 128)
        for name, f in layout_variants().items():
            f = jax.jit(f)
            same = bool(jnp.all(f(q, gs).astype(jnp.float32) == want.astype(jnp.float32)))
            ms = 1e3 * peers.bench(f, q, gs, reps=args.reps)
            out["layouts"][f"{tag}_{width}/{name}"] = {"ms": ms, "equal": same, "GBps": 2 * q.size / ms / 1e6}
            print(tag, width, name, out["layouts"][f"{tag}_{width}/{name}"], flush=True)
        ops_[tag] = q
    t = moe_gpu.default_tgmm_kmajor_tiling(FULL["D"], FULL["F"], ops_["x"].dtype)
    from pallas_kernels.moe.fp8 import scaled_tgmm
    f = jax.jit(lambda a, b, c: scaled_tgmm(a, b, c, 1.0, out_dtype=jnp.bfloat16, tiling=t, backend="gpu"))
    out["fp8_tgmm_with_layout_ms"] = 1e3 * peers.bench(f, ops_["x"], ops_["g"], gs, reps=args.reps)
    print("fp8 tgmm with the kept layout (gate/up)", out["fp8_tgmm_with_layout_ms"], flush=True)
    from benchmarks.moe import time_gmm
    from pallas_kernels.moe.fp8 import gmm_fp8
    lhs, rhs, gs = peers.moe_inputs(E=E, K=FULL["D"], N=FULL["F"], rows=rows)
    for w in ("bf16", "fp8"):
        fwd, fb = time_gmm(lambda l, r, g, w=w: gmm_fp8(l, r, g, wgrad=w, backend="gpu"), lhs, rhs, gs,
                           reps=args.reps)
        out[f"fp8_gmm_wgrad_{w}"] = {"fwd_tflops": fwd, "fwdbwd_tflops": fb}
        print("gmm_fp8 wgrad", w, out[f"fp8_gmm_wgrad_{w}"], flush=True)
    _write(args.out, out)


def wgrad_mode(args):
    """The routed experts' weight gradient: bf16 tgmm vs the fp8 K-major tgmm (gpu.tgmm_kmajor) on the group-padded
    layout (pallas_kernels/moe/fp8.py kmajor_by_group), at the gate/up (K=2048, N=768) and down (768, 2048)
    shapes; first a device check of gmm_fp8(wgrad='fp8')'s gradients on ragged sizes with empty groups."""
    _require_fp8_gpu()
    if args.layout_only:
        return wgrad_layouts(args)
    from benchmarks.moe import FULL, oracle_gmm, ragged_sizes, rel_err
    from pallas_kernels import fp8 as fp8_lib
    from pallas_kernels.moe import Tiling, reference, tgmm
    from pallas_kernels.moe import gpu as moe_gpu
    from pallas_kernels.moe.fp8 import gmm_fp8, kmajor_by_group, quantize_tensor, scaled_tgmm
    E, rows = FULL["E"], FULL["tokens"] * FULL["k"]
    out = {"device": str(jax.devices()[0]), "rows": rows, "E": E, "check": {}, "kernels": {}}
    lhs, rhs, gs = peers.moe_inputs(E=E, K=FULL["D"], N=FULL["F"], rows=rows)
    gs_r = ragged_sizes(rows, E, 1)
    dout = jax.random.normal(jax.random.PRNGKey(7), (rows, FULL["F"]), jnp.bfloat16)
    loss = lambda fn: (lambda l, r, g, d: jnp.sum(fn(l, r, g).astype(jnp.float32) * d.astype(jnp.float32)))
    grads = {w: jax.jit(jax.grad(loss(lambda l, r, g, w=w: gmm_fp8(l, r, g, wgrad=w, backend="gpu")),
                                 argnums=(0, 1)))(lhs, rhs, gs_r, dout) for w in ("bf16", "fp8")}
    gref = jax.jit(jax.grad(loss(oracle_gmm), argnums=(0, 1)))(lhs, rhs, gs_r, dout)
    qx, sx = quantize_tensor(lhs)
    qg, sg = quantize_tensor(dout, "e5m2")
    sim = jax.jit(lambda a, b, g: reference.tgmm_reference(a.T, b, g, out_dtype=jnp.float32))(
        fp8_lib.dequantize(qx, sx), fp8_lib.dequantize(qg, sg), gs_r)
    empty = np.asarray(gs_r) == 0
    out["check"] = {"drhs_fp8_vs_f32_rel": rel_err(grads["fp8"][1], gref[1]),
                    "drhs_bf16_vs_f32_rel": rel_err(grads["bf16"][1], gref[1]),
                    "drhs_fp8_vs_dequantized_rel": rel_err(grads["fp8"][1], sim),
                    "empty_groups": int(empty.sum()),
                    "empty_groups_zero": bool(jnp.all(grads["fp8"][1][np.flatnonzero(empty)] == 0)),
                    "dlhs_equal_to_bf16_wgrad": bool(jnp.all(grads["fp8"][0] == grads["bf16"][0]))}
    print("check", out["check"], flush=True)
    for label, (k, n) in {"gate_up": (FULL["D"], FULL["F"]), "down": (FULL["F"], FULL["D"])}.items():
        x = jax.random.normal(jax.random.PRNGKey(3), (rows, k), jnp.bfloat16)
        g = jax.random.normal(jax.random.PRNGKey(4), (rows, n), jnp.bfloat16)
        qx, sx = quantize_tensor(x)
        qg, sg = quantize_tensor(g, "e5m2")
        flops = 2 * rows * k * n
        calls = {"bf16_tgmm": (jax.jit(lambda a, b, c: tgmm(a.T, b, c, backend="gpu")), (x, g, gs)),
                 "fp8_tgmm_with_layout": (jax.jit(lambda a, b, c, s: scaled_tgmm(
                     a, b, c, s, out_dtype=jnp.bfloat16, backend="gpu")), (qx, qg, gs, sx * sg))}
        for t in [None, Tiling(128, 128, 128, 4), Tiling(128, 256, 128, 3), Tiling(128, 64, 256, 4)]:
            tt = t or moe_gpu.default_tgmm_kmajor_tiling(k, n, qx.dtype)
            a, b = kmajor_by_group(qx, gs, tt.tm), kmajor_by_group(qg, gs, tt.tm)
            calls[f"fp8_kernel_{tt.tm}x{tt.tk}x{tt.tn}x{tt.stages}"] = (jax.jit(
                lambda a, b, c, tt=tt: moe_gpu.tgmm_kmajor(a, b, c, tiling=tt)), (a, b, gs))
        calls["layout_x"] = (jax.jit(lambda a, c: kmajor_by_group(a, c, 128)), (qx, gs))
        calls["layout_g"] = (jax.jit(lambda a, c: kmajor_by_group(a, c, 128)), (qg, gs))
        from pallas_kernels.moe.tiling import padded_group_rows  # the same layout, transposed before the gather
        calls["layout_x_transpose_first"] = (jax.jit(lambda a, c: (lambda s, v: jnp.where(
            v[None], a.T[:, s], jnp.zeros((), a.dtype)))(*padded_group_rows(c, a.shape[0], 128))), (qx, gs))
        for name, (f, a) in calls.items():
            try:
                ms = 1e3 * peers.bench(f, *a, reps=args.reps)
                rec = {"ms": ms} if name.startswith("layout") else {"ms": ms, "tflops": flops / ms / 1e9}
            except Exception as e:
                rec = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            out["kernels"][f"{label}/{name}"] = rec
            print(label, name, rec, flush=True)
    from benchmarks.moe import time_gmm
    out["gmm"] = {}
    for w in ("bf16", "fp8"):
        fwd, fb = time_gmm(lambda l, r, g, w=w: gmm_fp8(l, r, g, wgrad=w, backend="gpu"), lhs, rhs, gs,
                           reps=args.reps)
        out["gmm"][f"fp8_gmm_wgrad_{w}"] = {"fwd_tflops": fwd, "fwdbwd_tflops": fb}
        print("gmm_fp8 wgrad", w, out["gmm"][f"fp8_gmm_wgrad_{w}"], flush=True)
    _write(args.out, out)


# step variants besides 'bf16': the fp8 config, plus these overrides
FP8_VARIANTS = {"fp8": [],                                                   # weights quantized once per step
                "fp8_percall": ["precision.fp8_prequantize=false"],        # ... in every matmul call (before)
                "fp8_delayed": ["precision.fp8_scaling=delayed"],          # dense sites: delayed scaling
                "fp8_wgrad": ["precision.fp8_expert_wgrad=true"]}          # routed experts' dW in fp8


def fp8_overrides(grad_dtype: str = "e5m2", lm_head: bool = False, extra=()) -> list[str]:
    """The config overrides of an fp8 run (the `precision` section), as `kanana-jax run --set` takes them."""
    return ["precision.matmul=fp8", f"precision.fp8_grad_dtype={grad_dtype}",
            f"precision.fp8_lm_head={str(bool(lm_head)).lower()}", *extra]


def step_child(args):
    from benchmarks import train_step as ts
    overrides = list(args.set)
    if args.only in FP8_VARIANTS:
        _require_fp8_gpu()
        overrides += fp8_overrides(args.grad_dtype, args.lm_head, args.fp8_set) + FP8_VARIANTS[args.only]
    ns = argparse.Namespace(layers=args.layers, batch=args.batch, accum=args.accum, seq=args.seq,
                            optimizer="muon", remat="none", reps=args.reps, profile="kernels" if args.profile
                            == args.only else "", out=args.trace_dir, size="kanana2_30b_a3b", set=overrides)
    os.makedirs(ns.out, exist_ok=True)
    rec = ts.run_variant("kernels", ns, args.ceiling)
    rec["variant"], rec["overrides"] = args.only, overrides
    print("RESULT " + json.dumps(rec, default=str), flush=True)


def step(args):
    env = dict(os.environ)
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = env.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
    from benchmarks import train_step as ts
    ceiling = ts.matmul_ceiling_tflops()
    out = {"device": str(jax.devices()[0]), "xla_flags": os.environ.get("XLA_FLAGS", ""), "ceiling": ceiling,
           "layers": args.layers, "batch": args.batch, "accum": args.accum, "seq": args.seq, "variants": []}
    for name in args.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "step", "--only", name, "--ceiling", str(ceiling),
               "--layers", str(args.layers), "--batch", str(args.batch), "--accum", str(args.accum),
               "--seq", str(args.seq), "--reps", str(args.reps), "--grad-dtype", args.grad_dtype,
               "--profile", args.profile, "--trace-dir", os.path.join(args.trace_dir, name)]
        if args.lm_head:
            cmd.append("--lm-head")
        cmd += [f"--set={s}" for s in args.set] + [f"--fp8-set={s}" for s in args.fp8_set]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.child_timeout)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        rec = json.loads(lines[-1][7:]) if lines else {"variant": name, "error": (proc.stderr or proc.stdout)[-800:]}
        print(json.dumps(rec, default=str)[:1500], flush=True)
        out["variants"].append(rec)
    _write(args.out, out)


def table(args):
    recs = [json.load(open(f)) for f in sorted(sum((glob.glob(p) for p in args.files), []))]
    for r in recs:
        if "rows" in r and r["rows"] and "shape" in r["rows"][0]:
            print("| shape | variant | fwd+bwd ms | TFLOP/s | compile s |\n|---|---|---|---|---|")
            for x in r["rows"]:
                print(f"| {x['shape']} | {x['variant']} | " + (f"{x['ms']:.3f} | {x['tflops']:.0f} | "
                      f"{x['compile_s']:.1f} |" if "ms" in x else f"error {x['error'][:60]} | | |"))
        if "gmm" in r:
            print("check:", r.get("check"))
            for k, v in r["gmm"].items():
                print(f"| {k} | {v.get('fwd_tflops', 0):.0f} | {v.get('fwdbwd_tflops', 0):.0f} |")
        if "variants" in r:
            base = {v["variant"]: v for v in r["variants"] if "step_s" in v}
            for v in r["variants"]:
                print(v["variant"], {k: v.get(k) for k in ("step_s", "mfu", "peak_gib", "compile_s", "loss", "error")})
            for name in FP8_VARIANTS:
                if "bf16" in base and name in base:
                    print(f"{name} speed-up {base['bf16']['step_s'] / base[name]['step_s']:.3f}x")


def _write(path, obj):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=1, default=str)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["dense", "gmm", "layer", "wgrad", "step", "table"])
    p.add_argument("files", nargs="*")
    p.add_argument("--out", default=None)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--shapes", default="")
    p.add_argument("--forms", default="direct,dequant")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--variants", default="bf16,fp8")
    p.add_argument("--grad-dtype", default="e5m2")
    p.add_argument("--lm-head", action="store_true", help="fp8 variant: precision.fp8_lm_head=true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both step variants (e.g. model.remat_policy=full)")
    p.add_argument("--fp8-set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the fp8 step variant only (e.g. precision.fp8_scaling=delayed)")
    p.add_argument("--layout-only", action="store_true", help="wgrad: time only the K-major layout variants")
    p.add_argument("--profile", default="", help="variant to trace (bf16|fp8)")
    p.add_argument("--trace-dir", default="/tmp/fp8_step")
    p.add_argument("--child-timeout", type=int, default=560)
    p.add_argument("--only", default="", help=argparse.SUPPRESS)
    p.add_argument("--ceiling", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode == "step" and args.only:
        return step_child(args)
    {"dense": dense, "gmm": gmm_mode, "layer": layer, "wgrad": wgrad_mode, "step": step, "table": table}[args.mode](args)


if __name__ == "__main__":
    main()
