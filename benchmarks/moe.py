"""MoE benchmark on one GPU: grouped matmul vs jax.lax.ragged_dot and tokamax, and a full MoE layer.

Run on the H200 (each mode is its own process, so peak memory is per implementation):
    python3 benchmarks/moe.py kernels --sweep --out $OUT/kernels.json     # correctness, tile sweep, gmm table
    python3 benchmarks/moe.py shapes --out $OUT/shapes.json               # any M, N=384: correct or named error
    python3 benchmarks/moe.py layer --impl ours --tilings $OUT/kernels.json --out $OUT/layer_ours.json
    python3 benchmarks/moe.py layer --impl ragged_dot --out $OUT/layer_ragged_dot.json
    python3 benchmarks/moe.py layer --impl tokamax --out $OUT/layer_tokamax.json
    python3 benchmarks/moe.py table $OUT/*.json                           # the markdown table
    python3 benchmarks/moe.py kernels --tokens 16384 --dims 768,2048 --candidates "drhs=64,256,128,3"  # own tilings
Shape: Kanana-2-30B-A3B, 8192 tokens x top-6 = 49,152 rows, E=128, D=2048, F=768. `--tiny --interpret` runs
the same code on CPU with the GPU kernels in interpret mode (a smoke test of this script).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import peers  # noqa: E402
from pallas_kernels.moe import GmmTilings, Tiling, combine, gmm, permute, route, tgmm  # noqa: E402

FULL = dict(tokens=8192, k=6, E=128, D=2048, F=768)
TINY = dict(tokens=256, k=2, E=4, D=128, F=128)
SWEEP = {
    "fwd": [Tiling(128, 64, 256, 3), Tiling(128, 64, 128, 4), Tiling(64, 64, 256, 4), Tiling(64, 64, 384, 3)],
    "dlhs": [Tiling(128, 64, 256, 3), Tiling(128, 64, 128, 4), Tiling(64, 64, 256, 4), Tiling(64, 64, 512, 2)],
    "drhs": [Tiling(64, 256, 128, 3), Tiling(64, 128, 256, 3), Tiling(128, 128, 128, 3), Tiling(64, 128, 128, 5)],
}
TINY_SWEEP = {"fwd": [Tiling(64, 64, 128, 2)], "dlhs": [Tiling(64, 64, 128, 2)], "drhs": [Tiling(64, 128, 128, 2)]}


def rel_err(a, b):
    """max |a-b| / max |b| in fp32."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def oracle_gmm(lhs, rhs, gs, transpose_rhs=False):
    """XLA ragged_dot in fp32 accumulation; rows past sum(gs) are 0 there as well."""
    r = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    return jax.lax.ragged_dot(lhs, r, gs, preferred_element_type=jnp.float32)


def oracle_tgmm(lhs_MxK, rhs_MxN, gs):
    dn = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(lhs_MxK, rhs_MxN, gs, dn, preferred_element_type=jnp.float32)


def ragged_sizes(rows, E, seed, *, zeros=8, short=500):
    """Random group sizes with some empty groups, summing to rows - short (rows past the groups exist)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(E))
    p[rng.choice(E, min(zeros, E // 4), replace=False)] = 0
    return jnp.asarray(rng.multinomial(rows - short, p / p.sum()).astype(np.int32))


def parse_candidates(text: str) -> dict:
    """'drhs=64,128,256,3;128,128,256,3 fwd=...' -> {'drhs': [Tiling(64, 128, 256, 3), ...], ...}"""
    out = {}
    for item in text.split():
        op, _, tilings = item.partition("=")
        if op not in SWEEP:
            raise SystemExit(f"--candidates: unknown op {op!r}; allowed: {', '.join(SWEEP)}")
        try:
            out[op] = [Tiling(*map(int, t.split(","))) for t in tilings.split(";") if t]
        except (TypeError, ValueError):
            raise SystemExit(f"--candidates: {item!r}: each tiling is TM,TK,TN,STAGES (integers), ';' between "
                             "tilings, e.g. drhs=64,256,128,3;64,128,256,3") from None
    return out


def kernels(args):
    shape = dict(TINY if args.tiny else FULL)
    if args.tokens:  # e.g. 16384: one microbatch of the train-step benchmark (4 x 4096 tokens)
        shape["tokens"] = args.tokens
    if args.dims:  # K,N of the products, e.g. 768,2048 (the down projection) or 2048,1536 (gate|up fused)
        shape["D"], shape["F"] = map(int, args.dims.split(","))
    E, K, N = shape["E"], shape["D"], shape["F"]
    rows = shape["tokens"] * shape["k"]
    interp = bool(args.interpret)
    lhs, rhs, gs = peers.moe_inputs(E=E, K=K, N=N, rows=rows)
    dout = jax.random.normal(jax.random.PRNGKey(7), (rows, N), jnp.bfloat16)
    lhs_t = lhs.T
    out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "shape": dict(rows=rows, E=E, K=K, N=N)}
    flops = 2 * rows * K * N
    reps = 3 if interp else 20

    ops = {
        "fwd": lambda t: jax.jit(lambda l, r, g: gmm(l, r, g, tiling=t, backend="gpu", interpret=interp)),
        "dlhs": lambda t: jax.jit(lambda d, r, g: gmm(d, r, g, transpose_rhs=True, tiling=t, backend="gpu",
                                                     interpret=interp)),
        "drhs": lambda t: jax.jit(lambda lt, d, g: tgmm(lt, d, g, tiling=t, backend="gpu", interpret=interp)),
    }
    op_args = {"fwd": (lhs, rhs, gs), "dlhs": (dout, rhs, gs), "drhs": (lhs_t, dout, gs)}
    gs_ragged = ragged_sizes(rows, E, 1, short=min(500, rows // 4))
    checks = {
        "fwd": lambda f: rel_err(f(lhs, rhs, gs_ragged), oracle_gmm(lhs, rhs, gs_ragged)),
        "dlhs": lambda f: rel_err(f(dout, rhs, gs_ragged), oracle_gmm(dout, rhs, gs_ragged, transpose_rhs=True)),
        "drhs": lambda f: rel_err(f(lhs_t, dout, gs_ragged), oracle_tgmm(lhs, dout, gs_ragged)),
    }
    sweep = (TINY_SWEEP if args.tiny else SWEEP) if args.sweep else {
        op: [t] for op, t in zip(("fwd", "dlhs", "drhs"), default_tilings())}
    if args.candidates:  # only these ops, these tilings (the defaults first, as the baseline of the same run)
        defaults = dict(zip(("fwd", "dlhs", "drhs"), default_tilings()))
        sweep = {op: [defaults[op]] + [t for t in cands if t != defaults[op]]
                 for op, cands in parse_candidates(args.candidates).items()}
    best = {}
    out["sweep"] = {}
    for op, cands in sweep.items():
        rows_out = []
        for t in cands:
            rec = {"tiling": list(dataclass_tuple(t))}
            try:
                f = ops[op](t)
                rec["rel_err"] = checks[op](f)
                rec["ms"] = 1e3 * peers.bench(f, *op_args[op], reps=reps, warm=1 if interp else 3)
                rec["tflops"] = flops / rec["ms"] / 1e9
            except Exception as e:  # a tiling that does not fit (smem, registers) is reported, not fatal
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(op, rec, flush=True)
            rows_out.append(rec)
        out["sweep"][op] = rows_out
        ok = [r for r in rows_out if "ms" in r and r["rel_err"] < 2e-2]
        if ok:
            best[op] = min(ok, key=lambda r: r["ms"])["tiling"]
    out["best_tilings"] = best
    tilings = GmmTilings(*(Tiling(*best[op]) if op in best else None for op in ("fwd", "dlhs", "drhs")))
    if args.candidates:  # a tiling sweep only: no peers
        write(args.out, out)
        return

    # gradients of the custom_vjp against autodiff of the oracle
    def loss(fn):
        return lambda l, r, g: jnp.sum(fn(l, r, g).astype(jnp.float32) * dout.astype(jnp.float32))
    ours = lambda l, r, g: gmm(l, r, g, tiling=tilings, backend="gpu", interpret=interp)
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(lhs, rhs, gs_ragged)
    g_ref = jax.jit(jax.grad(loss(oracle_gmm), argnums=(0, 1)))(lhs, rhs, gs_ragged)
    out["grad_rel_err"] = {"dlhs": rel_err(g_ours[0], g_ref[0]), "drhs": rel_err(g_ours[1], g_ref[1])}
    print("grad check", out["grad_rel_err"], flush=True)

    impls = {"ours": ours, "ragged_dot": peers.peer_grouped_matmul("ragged_dot")}
    if not args.tiny:
        impls["tokamax"] = peers.peer_grouped_matmul("tokamax")
    out["gmm"] = {}
    for name, fn in impls.items():
        try:
            fwd, fb = time_gmm(fn, lhs, rhs, gs, reps=reps if name != "ragged_dot" else min(reps, 5))
            out["gmm"][name] = {"fwd_tflops": fwd, "fwdbwd_tflops": fb}
        except Exception as e:
            out["gmm"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(name, out["gmm"][name], flush=True)
    out["permute_combine"] = time_permute_combine(shape, reps)
    print("permute/combine", out["permute_combine"], flush=True)
    write(args.out, out)


# Shapes a user may pass (issue 24): row counts no multiple of 8 or of the tile, one row, N=384 (default tn=256 does
# not divide it); default tilings throughout (the op picks), ragged sizes with empty groups and rows past the groups.
ANY_SHAPES = [dict(m=3001, n=768), dict(m=100, n=768), dict(m=4097, n=768), dict(m=2049, n=768), dict(m=1, n=768),
              dict(m=3001, n=384), dict(m=49152, n=384)]
TINY_ANY_SHAPES = [dict(m=201, n=384), dict(m=1, n=128)]


def shapes(args):
    """Device check at ANY_SHAPES: gmm forward, custom_vjp dlhs/drhs vs autodiff of ragged_dot (fp32 accumulation),
    each shape's max error / max value; a shape that raises is recorded with its message. Exit status 1 if any fails."""
    E, K = (4, 128) if args.tiny else (128, 2048)
    interp = bool(args.interpret)
    out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "E": E, "K": K, "cases": []}
    for i, case in enumerate(TINY_ANY_SHAPES if args.tiny else ANY_SHAPES):
        m, n = case["m"], case["n"]
        ks = jax.random.split(jax.random.PRNGKey(i), 3)
        lhs = jax.random.normal(ks[0], (m, K), jnp.bfloat16)
        rhs = (jax.random.normal(ks[1], (E, K, n), jnp.float32) / np.sqrt(K)).astype(jnp.bfloat16)
        dout = jax.random.normal(ks[2], (m, n), jnp.bfloat16)
        gs = ragged_sizes(m, E, i, zeros=8, short=min(37, m // 4))
        rec = dict(case, rows_in_groups=int(gs.sum()))
        try:
            def loss(fn):
                return lambda l, r: jnp.sum(fn(l, r, gs).astype(jnp.float32) * dout.astype(jnp.float32))
            ours = lambda l, r, g: gmm(l, r, g, backend="gpu", interpret=interp)
            y = jax.jit(ours)(lhs, rhs, gs)
            g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(lhs, rhs)
            g_ref = jax.jit(jax.grad(loss(oracle_gmm), argnums=(0, 1)))(lhs, rhs)
            rec.update(fwd=rel_err(y, oracle_gmm(lhs, rhs, gs)), dlhs=rel_err(g_ours[0], g_ref[0]),
                       drhs=rel_err(g_ours[1], g_ref[1]),
                       tail_zero=bool(np.all(np.asarray(y[int(gs.sum()):], np.float32) == 0)))
            rec["ok"] = max(rec["fwd"], rec["dlhs"], rec["drhs"]) < 2e-2 and rec["tail_zero"]
        except Exception as e:
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
        print(rec, flush=True)
        out["cases"].append(rec)
    write(args.out, out)
    if not all(r["ok"] for r in out["cases"]):
        sys.exit(1)


def time_gmm(fn, lhs, rhs, gs, reps):
    """(fwd, fwd+bwd) TFLOP/s. Unlike peers.time_grouped_matmul (jax.grad), fwd+bwd uses value_and_grad: under
    jax.grad of a sum the forward product is dead code that XLA may drop, so only the backward would be timed."""
    flops = 2 * lhs.shape[0] * lhs.shape[1] * rhs.shape[2]
    f = jax.jit(fn)
    g = jax.jit(jax.value_and_grad(lambda l, r, s: fn(l, r, s).astype(jnp.float32).sum(), argnums=(0, 1)))
    return (flops / peers.bench(f, lhs, rhs, gs, reps=reps) / 1e12,
            3 * flops / peers.bench(g, lhs, rhs, gs, reps=reps) / 1e12)


def time_permute_combine(shape, reps):
    """ms of permute + combine fwd+bwd, gather-only custom VJPs vs XLA indexing (scatter-add backward)."""
    T, D, E, k = shape["tokens"], shape["D"], shape["E"], shape["k"]
    x = jax.random.normal(jax.random.PRNGKey(0), (T, D), jnp.bfloat16)
    logits = jax.random.normal(jax.random.PRNGKey(1), (T, E), jnp.float32)
    res = {}
    for impl in ("gather", "xla"):
        def f(x, logits):
            r = route(logits, k=k, score="sigmoid")
            return jnp.sum(combine(permute(x, r, impl=impl) * 2, r, impl=impl).astype(jnp.float32))
        g = jax.jit(jax.grad(f, argnums=(0, 1)))
        res[impl + "_ms"] = 1e3 * peers.bench(g, x, logits, reps=reps)
    route_fb = jax.jit(jax.grad(lambda lg: jnp.sum(route(lg, k=k, score="sigmoid", n_group=8 if E % 8 == 0 else 1,
                                                         topk_group=4 if E % 8 == 0 else 1).weights_TxK)))
    res["route_fwdbwd_ms"] = 1e3 * peers.bench(route_fb, logits, reps=reps)
    return res


def default_tilings():
    from pallas_kernels.moe import gpu
    return gpu.DEFAULT_GMM, gpu.DEFAULT_GMM, gpu.DEFAULT_TGMM


def dataclass_tuple(t: Tiling):
    return (t.tm, t.tk, t.tn, t.stages)


def layer_params(shape, seed=0):
    E, D, F = shape["E"], shape["D"], shape["F"]
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {
        "router": jax.random.normal(ks[0], (D, E), jnp.float32) * D ** -0.5,
        "bias": jax.random.normal(ks[1], (E,), jnp.float32) * 0.01,
        "w_gate_up": (jax.random.normal(ks[2], (E, D, 2 * F), jnp.float32) * D ** -0.5).astype(jnp.bfloat16),
        "w_down": (jax.random.normal(ks[3], (E, F, D), jnp.float32) * F ** -0.5).astype(jnp.bfloat16),
    }


def moe_layer(params, x_TxD, gmm_fn, *, k, perm_impl="gather"):
    """Routed experts of one Kanana-2 MoE layer: route, permute, gate|up gmm, SwiGLU, down gmm, combine."""
    E = params["w_down"].shape[0]
    n_group = 8 if E % 8 == 0 and E >= 16 else 1
    r = route(x_TxD, params["router"], params["bias"], k=k, score="sigmoid", n_group=n_group,
              topk_group=max(1, n_group // 2), norm_topk_prob=True, routed_scaling_factor=2.5)
    xs_MxD = permute(x_TxD, r, impl=perm_impl)
    h_MxF2 = gmm_fn(xs_MxD, params["w_gate_up"], r.group_sizes_E)
    gate, up = jnp.split(h_MxF2, 2, axis=-1)
    a_MxF = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x_TxD.dtype)
    y_MxD = gmm_fn(a_MxF, params["w_down"], r.group_sizes_E)
    return combine(y_MxD, r, impl=perm_impl)


def layer(args):
    shape = TINY if args.tiny else FULL
    interp = bool(args.interpret)
    if args.impl == "ours":
        tilings = GmmTilings()
        if args.tilings:
            best = json.load(open(args.tilings)).get("best_tilings", {})
            tilings = GmmTilings(*(Tiling(*best[o]) if o in best else None for o in ("fwd", "dlhs", "drhs")))
        gmm_fn = lambda l, r, g: gmm(l, r, g, tiling=tilings, backend="gpu", interpret=interp)
    else:
        gmm_fn = peers.peer_grouped_matmul(args.impl)
    params = layer_params(shape)
    x = jax.random.normal(jax.random.PRNGKey(5), (shape["tokens"], shape["D"]), jnp.bfloat16)
    loss = lambda p, x: jnp.sum(moe_layer(p, x, gmm_fn, k=shape["k"], perm_impl=args.perm).astype(jnp.float32))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    dev = jax.devices()[0]
    stats = getattr(dev, "memory_stats", lambda: None)() or {}
    base = stats.get("bytes_in_use", 0)
    out = {"impl": args.impl, "perm": args.perm, "device": str(dev)}
    try:
        reps = 3 if interp else (5 if args.impl == "ragged_dot" else 20)
        val, grads = step(params, x)
        out["loss"] = float(val)
        out["grad_norms"] = {n: float(jnp.linalg.norm(g.astype(jnp.float32))) for n, g in grads[0].items()}
        ms = 1e3 * peers.bench(step, params, x, reps=reps, warm=1)
        M, D, F = shape["tokens"] * shape["k"], shape["D"], shape["F"]
        out["fwdbwd_ms"] = ms
        out["gmm_tflops"] = 18 * M * D * F / ms / 1e9
        stats = getattr(dev, "memory_stats", lambda: None)() or {}
        out["peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2 ** 30
        out["inputs_gib"] = base / 2 ** 30
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        traceback.print_exc()
    print(out, flush=True)
    write(args.out, out)


def table(args):
    """Markdown tables from the JSON files of one run."""
    files = sorted(sum((glob.glob(p) for p in args.files), []))
    recs = [json.load(open(f)) for f in files]
    for r in recs:
        if "gmm" in r:
            rd = r["gmm"].get("ragged_dot", {})
            tk = r["gmm"].get("tokamax", {})
            print("| gmm | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd+bwd vs ragged_dot | fwd+bwd vs tokamax |")
            print("|---|---|---|---|---|")
            for name, v in r["gmm"].items():
                if "error" in v:
                    print(f"| {name} | error: {v['error'][:80]} | | | |")
                    continue
                vr = v["fwdbwd_tflops"] / rd["fwdbwd_tflops"] if "fwdbwd_tflops" in rd else float("nan")
                vt = v["fwdbwd_tflops"] / tk["fwdbwd_tflops"] if "fwdbwd_tflops" in tk else float("nan")
                print(f"| {name} | {v['fwd_tflops']:.1f} | {v['fwdbwd_tflops']:.1f} | {vr:.1f}x | {vt:.2f}x |")
            print("best tilings:", r.get("best_tilings"), "grad rel err:", r.get("grad_rel_err"))
            print("permute/combine:", r.get("permute_combine"))
    layers = [r for r in recs if "impl" in r]
    if layers:
        print("\n| MoE layer fwd+bwd | ms | gmm TFLOP/s | peak GiB |")
        print("|---|---|---|---|")
        for r in layers:
            if "error" in r:
                print(f"| {r['impl']} ({r['perm']}) | error: {r['error'][:80]} | | |")
            else:
                print(f"| {r['impl']} ({r['perm']}) | {r['fwdbwd_ms']:.2f} | {r['gmm_tflops']:.1f} | "
                      f"{r['peak_gib']:.2f} |")


def write(path, obj):
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["kernels", "shapes", "layer", "table"])
    p.add_argument("files", nargs="*")
    p.add_argument("--impl", default="ours", choices=["ours", "ragged_dot", "tokamax"])
    p.add_argument("--perm", default="gather", choices=["gather", "xla"])
    p.add_argument("--tilings", default=None)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--tokens", type=int, default=0, help="tokens (rows = tokens x top-6) instead of 8192")
    p.add_argument("--dims", default="", metavar="K,N", help="K,N of the products instead of 2048,768")
    p.add_argument("--candidates", default="", metavar='"OP=TM,TK,TN,STAGES;... ..."',
                   help="sweep only these tilings of these ops (fwd, dlhs, drhs), after the default of each")
    p.add_argument("--interpret", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    {"kernels": kernels, "shapes": shapes, "layer": layer, "table": table}[args.mode](args)


if __name__ == "__main__":
    main()
