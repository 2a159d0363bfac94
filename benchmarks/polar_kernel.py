"""Muon's step polynomial I + A + kappa A^2 on [B, m, m]: the fused symmetric Mosaic GPU kernel (tilings) vs XLA.

XLA: cuBLAS for A A^T plus one elementwise pass; the kernel computes the tiles on and above the diagonal and
mirrors them.

    PYTHONUNBUFFERED=1 python3 benchmarks/polar_kernel.py --out $OUT/polar_kernel.json
Checks every tiling against the jnp reference (bf16 outputs, relative max error) before timing it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import peers  # noqa: E402
from pallas_kernels.moe.tiling import Tiling  # noqa: E402
from pallas_kernels.polar import gpu, reference  # noqa: E402

TILINGS = [Tiling(128, 64, 128, 4), Tiling(128, 64, 128, 3), Tiling(128, 128, 128, 2), Tiling(128, 128, 128, 3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="polar_kernel.json")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--m", type=int, default=768)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    b, m = args.batch, args.m
    a = jax.random.normal(jax.random.PRNGKey(0), (b, m, m), jnp.float32) / m ** 0.5
    sym = ((a + jnp.swapaxes(a, 1, 2)) * 0.5).astype(jnp.bfloat16)
    flops = 2 * b * m ** 3
    xla = jax.jit(lambda s: reference.gram_affine(s, s, 0.25, 1.0, 1.0))
    want = xla(sym).astype(jnp.float32)
    res = {"device": str(jax.devices()[0]), "shape": [b, m, m], "rows": []}
    ms = 1e3 * peers.bench(xla, sym, reps=args.reps)
    res["rows"].append({"impl": "xla (cuBLAS + pass)", "ms": ms, "tflops": flops / ms / 1e9, "rel_err": 0.0})
    for t in TILINGS:
        name = f"fused tm{t.tm} tk{t.tk} tn{t.tn} s{t.stages}"
        try:
            f = jax.jit(lambda s, t=t: gpu.gram_affine(s, s, 0.25, 1.0, 1.0, tiling=t))
            err = float(jnp.max(jnp.abs(f(sym).astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
            assert err < 1e-2, (name, err)
            ms = 1e3 * peers.bench(f, sym, reps=args.reps)
            res["rows"].append({"impl": name, "ms": ms, "tflops": flops / ms / 1e9, "rel_err": err})
        except Exception as e:  # a tiling the compiler rejects (shared memory, layouts) is reported, not fatal
            res["rows"].append({"impl": name, "error": str(e).splitlines()[0][:200]})
        print(res["rows"][-1], flush=True)
    print(f"\n[{b}, {m}, {m}] bf16, I + A + 0.25 A A^T\n| impl | ms | TFLOP/s | rel err |\n|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['impl']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['rel_err']:.1e} |" if "ms" in r else
              f"| {r['impl']} | - | - | {r['error']} |")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
