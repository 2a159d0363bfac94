"""CPU proxy for the gradient-accumulation overhead: compile the train step (no device, no weights: shapes
only) and list what the microbatch loop's body writes per microbatch, by kind: the fp32 accumulator update
(`multiply_add_fusion`), zero fills (`wrapped_broadcast`), copies (`copy`), scatters. XLA:CPU, not XLA:GPU:
it shows aliasing and copy insertion, not GPU-only lowering (dynamic slices as D2D memcpys).

    JAX_PLATFORMS=cpu python benchmarks/accum_hlo.py --size tiny --layers 4 --batch 2 --seq 32 --accum 4
    JAX_PLATFORMS=cpu python benchmarks/accum_hlo.py --layers 3 --batch 1 --seq 256 --accum 2   # full width
    ... --set train.grad_accum_first_outside=true
    ... --loops          # also every while loop (the layer scans inside the microbatch body): trips, writes
    ... --loops --set model.scan_layers=false   # the same step with one leaf per layer, no layer scans
"""
import argparse
import collections
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from train_step import slice_config, synthetic_batch  # noqa: E402
from kanana_jax.train.builder import build_trainer  # noqa: E402

_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2, "pred": 1, "s8": 1, "u8": 1}


def shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string ('f32[3,4]{1,0}' or a tuple of them)."""
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dtype, 1)
    return total


def computations(text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines, from compiled HLO text."""
    comps, name = {}, None
    for line in text.splitlines():
        m = None if line.startswith(" ") else re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m:
            name, comps[m.group(1)] = m.group(1), []
        elif line.startswith("}"):
            name = None
        elif name:
            comps[name].append(line)
    return comps


def writes_by_kind(lines: list[str]) -> dict[str, tuple[int, int]]:
    """{kind: (count, bytes written)} of a computation's instructions; fusions by name without the number."""
    out = collections.defaultdict(lambda: [0, 0])
    for line in lines:
        m = re.match(r"\s*%?([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\(", line)
        if not m or m.group(3) in ("get-tuple-element", "tuple", "parameter", "bitcast", "constant"):
            continue
        kind = re.sub(r"[.\d]+$", "", m.group(1)) if m.group(3) == "fusion" else m.group(3)
        out[kind][0] += 1
        out[kind][1] += shape_bytes(m.group(2))
    return {k: tuple(v) for k, v in out.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="kanana2_30b_a3b")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="config override, e.g. model.dtype=bfloat16")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--loops", action="store_true", help="also list every while loop's trips and per-trip writes")
    args = p.parse_args()
    cfg = slice_config(args.layers, args.batch, args.seq, "reference", "ragged_dot", "muon", "none", muon_clip=True,
                       size=args.size, accum=args.accum, overrides=tuple(args.set))
    trainer = build_trainer(cfg)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(args.batch * args.accum, args.seq,
                                                            cfg.model.vocab_size).items()}
    t0 = time.perf_counter()
    with trainer.context():
        state = jax.eval_shape(trainer.init, jax.random.PRNGKey(0))
        text = trainer.train_step.lower(state, batch).compile().as_text()
    comps = computations(text)
    bodies = [b for _, b in re.findall(r" while\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)", text)]
    body = max(bodies, key=lambda b: len(comps[b]))  # the microbatch loop: the largest while body
    print(f"compiled in {time.perf_counter() - t0:.1f} s; {len(bodies)} while loops; microbatch body {body} "
          f"({len(comps[body])} instructions). Written per microbatch (nested loops not included):")
    kinds = writes_by_kind(comps[body])
    for kind, (n, b) in sorted(kinds.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"  {kind:<32} {n:>4} ops {b / 1e6:12.2f} MB")
    if args.loops:  # the layer scans: what each trip writes (per-layer weight slices, stacked residuals, grads)
        total = collections.defaultdict(float)
        for name in re.findall(r" while\(.*?condition=%?[\w.\-]+, body=%?([\w.\-]+)", text):
            m = re.search(rf"body=%?{re.escape(name)}\b.*?known_trip_count\D*(\d+)", text)
            trips = int(m.group(1)) if m else 1
            kinds = writes_by_kind(comps[name])
            print(f"  loop {name}: {trips} trips, {len(comps[name])} instructions; per trip: " + ", ".join(
                f"{k} {b / 1e6:.2f} MB" for k, (_, b) in sorted(kinds.items(), key=lambda kv: -kv[1][1])[:5]))
            if name != body:
                for k, (_, b) in kinds.items():
                    total[k] += trips * b
        print("  all other loops (the layer scans: per microbatch), by kind, trips x per-trip writes: " + ", ".join(
            f"{k} {b / 1e6:.2f} MB" for k, b in sorted(total.items(), key=lambda kv: -kv[1])[:args.top]))
    entry = next(v for k, v in comps.items() if re.search(rf"^ENTRY %?{re.escape(k)} ", text, re.M))
    once = writes_by_kind(entry)
    fills = sum(b for k, (_, b) in once.items() if k in ("copy", "wrapped_broadcast"))
    print(f"  once per step, outside the loop: zero fills + copies {fills / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
