"""Muon update on one GPU: ours (Polar Express, bf16, gram/direct schedules) vs optax.contrib.muon (Newton-Schulz).

Run on the H200:
    PYTHONUNBUFFERED=1 python3 benchmarks/muon.py --out $OUT/muon.json --hlo $OUT/muon_hlo.txt
Workload (shared/PERFORMANCE.md, `peers.muon_params`): experts_up [128,2048,768], experts_down [128,768,2048]
and wq [2048,4096], fp32 params and grads, first update from a zero state. Both optimizers: Nesterov momentum
0.95, 5 polynomial steps, width scaling sqrt(max(1, fan_out/fan_in)), learning rate 1e-3, no weight decay.
Orthogonality error: singular values of update / (lr * scale), from eigvalsh of the fp32 short-side Gram
matrix (HIGHEST precision), over 16 experts of each expert tensor and all of wq; reported as RMS and max of
|sigma - 1|. `--small` runs the same code at toy shapes (a CPU smoke test).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import peers  # noqa: E402
from kanana_jax.optim import muon as kmuon  # noqa: E402
from kanana_jax.optim import orthogonalize, polar_express  # noqa: E402

LR = 1e-3
VARIANTS = {  # name -> scale_by_muon keyword arguments
    "pe_gram": dict(algorithm="gram"),                          # default: restarts at steps 1 and 3
    "pe_gram_norestart": dict(algorithm="gram", max_segment_gain=float("inf"), max_segment_steps=99),
    "pe_direct": dict(algorithm="direct"),
    "pe_gram_mu_bf16": dict(algorithm="gram", mu_dtype=jnp.bfloat16),
    "pe_gram_xla_poly": dict(algorithm="gram", kernel_backend="reference"),  # Gram + polynomial in XLA (cuBLAS)
}


def optax_peer(params):
    """optax.contrib.muon exactly as shared/bench/peers.py times it (matrix = last two axes)."""
    dn = jax.tree.map(lambda p: optax.contrib.MuonDimensionNumbers(reduction_axis=p.ndim - 2,
                                                                   output_axis=p.ndim - 1), params)
    return optax.contrib.muon(learning_rate=LR, muon_weight_dimension_numbers=dn)


def ours(params, **kw):
    return optax.chain(kmuon.scale_by_muon(scaling="spectral", **kw), optax.scale_by_learning_rate(LR))


def width_scale(p):
    return math.sqrt(max(1.0, p.shape[-1] / p.shape[-2]))


def orth_error(updates, n_sample=16):
    """(rms, max) of |sigma - 1| of update / (lr * scale) over a sample of the matrices."""
    devs = []
    for name, u in updates.items():
        o = (u / (LR * width_scale(u))).astype(jnp.float32)
        o = o.reshape((-1,) + o.shape[-2:])[:n_sample]
        if o.shape[1] > o.shape[2]:
            o = jnp.swapaxes(o, 1, 2)
        gram = jnp.einsum("bij,bkj->bik", o, o, precision=jax.lax.Precision.HIGHEST)
        ev = jnp.linalg.eigvalsh(gram)
        devs.append(np.abs(np.sqrt(np.clip(np.asarray(ev, np.float64), 0, None)) - 1).ravel())
    d = np.concatenate(devs)
    return float(np.sqrt(np.mean(d**2))), float(d.max())


def update_flops(params, algorithm, max_segment_gain=16.0, max_segment_steps=2):
    sched = polar_express.resolve("polar_express_5")[0]
    restarts = orthogonalize.restart_steps(sched, max_segment_gain, max_segment_steps)
    total = 0
    for p in jax.tree.leaves(params):
        m, n = sorted(p.shape[-2:])
        alg = orthogonalize.choose_algorithm(m, n, len(sched), restarts) if algorithm == "auto" else algorithm
        total += math.prod(p.shape[:-2]) * orthogonalize.flops(m, n, len(sched), alg, restarts)
    return total


def hlo_summary(compiled_text):
    lines = compiled_text.splitlines()
    return {"custom_call_gemm": sum("__cublas" in ln and "custom-call(" in ln for ln in lines),
            "fusion_kernels": sum(" fusion(" in ln and "ROOT" not in ln for ln in lines),
            "triton_gemm": sum('"kind":"__triton_gemm"' in ln or "__triton_gemm" in ln for ln in lines)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="muon_bench.json")
    ap.add_argument("--hlo", default="")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    shape = dict(E=4, K=256, N=96) if args.small else {}
    params, grads = peers.muon_params(**shape)
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "optax": optax.__version__,
           "shapes": {k: list(v.shape) for k, v in params.items()}}

    peer = optax_peer(params)
    peer_upd = jax.jit(peer.update)
    peer_state = peer.init(params)
    peer_ms = 1e3 * peers.bench(peer_upd, grads, peer_state, params, reps=args.reps)
    u_peer, _ = peer_upd(grads, peer_state, params)
    peer_flops = sum(math.prod(p.shape[:-2]) * orthogonalize.flops(*sorted(p.shape[-2:]), 5, "direct")
                     for p in jax.tree.leaves(params))
    res["optax_muon_peers_py_ms"] = peers.time_optax_muon(params, grads)
    res["optax_muon"] = {"ms": peer_ms, "orth_err_rms_max": orth_error(u_peer), "tflops": peer_flops / peer_ms / 1e9}
    print(f"optax.contrib.muon: {peer_ms:.2f} ms  orth err (rms, max) {res['optax_muon']['orth_err_rms_max']}",
          flush=True)

    svd_tx = ours(params, method="svd")
    u_svd, _ = jax.jit(svd_tx.update)(grads, svd_tx.init(params), params)
    for name, kw in VARIANTS.items():
        tx = ours(params, **kw)
        upd = jax.jit(tx.update)
        state = tx.init(params)
        ms = 1e3 * peers.bench(upd, grads, state, params, reps=args.reps)
        u, _ = upd(grads, state, params)
        fl = update_flops(params, kw["algorithm"], kw.get("max_segment_gain", 16.0), kw.get("max_segment_steps", 2))
        dist = max(float(jnp.max(jnp.abs(u[k] - u_svd[k])) / (LR * width_scale(u[k]))) for k in u)
        res[name] = {"ms": ms, "ratio_vs_optax": peer_ms / ms, "orth_err_rms_max": orth_error(u),
                     "max_abs_diff_to_svd_polar": dist, "matmul_tflop": fl / 1e12, "tflops": fl / ms / 1e9}
        print(f"{name}: {ms:.2f} ms  {peer_ms / ms:.2f}x  {fl / ms / 1e9:.0f} TFLOP/s  "
              f"orth err {res[name]['orth_err_rms_max']}  |u - svd| {dist:.3f}", flush=True)
        if args.hlo and name == "pe_gram":
            text = upd.lower(grads, state, params).compile().as_text()
            res[name]["hlo"] = hlo_summary(text)
            with open(args.hlo, "w") as f:
                f.write(text)

    # The orthogonalization alone on the bf16 momentum (no momentum/scaling passes), per schedule.
    xs = [jnp.swapaxes(grads["experts_up"], 1, 2).astype(jnp.bfloat16), grads["experts_down"].astype(jnp.bfloat16)]
    wq = [grads["wq"][None].astype(jnp.bfloat16)]
    for alg in ("gram", "direct"):
        kw = dict(algorithm=alg, out_dtypes=[jnp.float32])
        f = jax.jit(lambda x1, x2, w: [orthogonalize.orthogonalize_group([x], **kw) for x in (x1, x2, w)])
        ms = 1e3 * peers.bench(f, xs[0], xs[1], wq[0], reps=args.reps)
        fl = update_flops(params, alg)
        res[f"orthogonalize_only_{alg}"] = {"ms": ms, "tflops": fl / ms / 1e9}
        print(f"orthogonalize only ({alg}): {ms:.2f} ms {fl / ms / 1e9:.0f} TFLOP/s", flush=True)

    # Calibration of the cost model: one batched m^3 GEMM, one m^2 n GEMM and one m x m elementwise pass.
    a = xs[1][:, :, :768] if not args.small else xs[1][:, :, :xs[1].shape[1]]
    mm3 = jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a, preferred_element_type=jnp.bfloat16))
    mmn = jax.jit(lambda x: jnp.einsum("bij,bkj->bik", x, x, preferred_element_type=jnp.bfloat16))
    ew = jax.jit(lambda a, b: (jnp.eye(a.shape[-1]) + a.astype(jnp.float32) + 0.3 * b.astype(jnp.float32)
                                ).astype(jnp.bfloat16))
    a = jnp.asarray(a)
    t3, tn, te = (1e3 * peers.bench(mm3, a, reps=args.reps), 1e3 * peers.bench(mmn, xs[1], reps=args.reps),
                  1e3 * peers.bench(ew, a, a, reps=args.reps))
    B, m, n = xs[1].shape
    res["calibration"] = {"bmm_m3_ms": t3, "bmm_m3_tflops": 2 * B * a.shape[1]**3 / t3 / 1e9,
                          "gram_m2n_ms": tn, "gram_m2n_tflops": 2 * B * m * m * n / tn / 1e9, "mxm_pass_ms": te}
    print("calibration", res["calibration"], flush=True)

    best = min(VARIANTS, key=lambda k: res[k]["ms"])
    print("\n| implementation | ms | vs optax | TFLOP/s | orth err rms / max |\n|---|---|---|---|---|")
    print(f"| optax.contrib.muon (NS, fp32) | {peer_ms:.2f} | 1.00x | {res['optax_muon']['tflops']:.0f} | "
          "{:.3f} / {:.3f} |".format(*res["optax_muon"]["orth_err_rms_max"]))
    for k in VARIANTS:
        r = res[k]
        print(f"| {k}{' (best)' if k == best else ''} | {r['ms']:.2f} | {r['ratio_vs_optax']:.2f}x | "
              f"{r['tflops']:.0f} | " + "{:.3f} / {:.3f} |".format(*r["orth_err_rms_max"]))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
