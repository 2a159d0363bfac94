"""LM head + cross-entropy of one training microbatch, forward+backward: full [B,T,V] float32 logits (what the
pretrain loss does today) vs the chunked log-probs of `kanana_jax.model.logprobs.token_logprobs` (never more than
[chunk, V] logits; the backward recomputes each chunk). Issue 24, section 2: the expected gain before integrating it.

    python3 benchmarks/lm_head.py --out $OUT/lm_head.json                 # H200: 4 x 4096 tokens, D 2048, V 128,256
    python3 benchmarks/lm_head.py --tokens 256 --vocab 1024 --reps 2      # CPU smoke run

Per variant: ms (median), TFLOP/s on 3 x 2 N D V (the recompute not counted), XLA's temp buffer bytes
(`memory_analysis`), and the loss and gradient differences against the full variant.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.peers import bench  # noqa: E402
from kanana_jax.model.layers import logits_matmul  # noqa: E402
from kanana_jax.model.logprobs import token_logprobs  # noqa: E402


def full_loss(h_BxTxD, w_DxV, t_BxT):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_matmul(h_BxTxD, w_DxV), t_BxT))


def chunked_loss(chunk):
    return lambda h_BxTxD, w_DxV, t_BxT: -jnp.mean(token_logprobs(h_BxTxD, w_DxV, t_BxT, chunk=chunk)[0])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per row")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunks", default="2048,4096,8192")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    B, T, D, V = args.rows, args.tokens, args.dim, args.vocab
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    h = jax.random.normal(ks[0], (B, T, D), jnp.bfloat16)
    w = jax.random.normal(ks[1], (D, V), jnp.float32) / np.sqrt(D)
    t = jax.random.randint(ks[2], (B, T), 0, V)
    flops = 6 * B * T * D * V
    variants = {"full": full_loss} | {f"chunk{c}": chunked_loss(int(c)) for c in args.chunks.split(",")}
    out = {"device": str(jax.devices()[0]), "shape": dict(B=B, T=T, D=D, V=V), "variants": {}}
    ref = None
    for name, fn in variants.items():
        f = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        mem = f.lower(h, w, t).compile().memory_analysis()
        loss, (dh, dw) = f(h, w, t)
        if ref is None:
            ref = (loss, dh, dw)
        rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
        s = bench(f, h, w, t, reps=args.reps)
        rec = {"ms": s * 1e3, "tflops": flops / s / 1e12, "temp_gib": getattr(mem, "temp_size_in_bytes", 0) / 2 ** 30,
               "loss": float(loss), "dh_rel": rel(dh, ref[1]), "dw_rel": rel(dw, ref[2])}
        out["variants"][name] = rec
        print(name, json.dumps(rec), flush=True)
    base = out["variants"]["full"]["ms"]
    print(f"\nLM head + CE fwd+bwd, {B}x{T} tokens, D {D}, V {V}")
    for name, r in out["variants"].items():
        print(f"  {name:10} {r['ms']:8.2f} ms {r['tflops']:6.0f} TFLOP/s  temp {r['temp_gib']:6.2f} GiB  "
              f"{base / r['ms']:.2f}x vs full  dw err {r['dw_rel']:.1e}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
