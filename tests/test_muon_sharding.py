"""Sharding-aware Muon on 8 fake CPU devices: same update as unsharded, and no all-reduce in the compiled step.

The check runs in a subprocess (this file as a script) because the device count is fixed when jax starts.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _collectives(hlo: str) -> dict:
    """Counts per collective kind, plus all-reduces whose result is a square [..., m, m] (a Gram matrix)."""
    import re
    ops = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
    out = {op: 0 for op in ops}
    out["gram_all_reduce"] = 0
    for line in hlo.splitlines():
        for op in ops:
            if f" {op}(" in line or f" {op}-start(" in line:
                out[op] += 1
                if op == "all-reduce":
                    result = line.split(" = ", 1)[1].split(f" {op}")[0]
                    dims = [d.split(",") for d in re.findall(r"\[([\d,]+)\]", result)]
                    out["gram_all_reduce"] += sum(len(d) >= 2 and d[-1] == d[-2] for d in dims)
    return out


def _run():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from kanana_jax.optim import muon as kmuon

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    rng = np.random.default_rng(0)
    shapes = {"moe": {"experts": {"w_up": (2, 4, 64, 24)}}, "mlp": {"w_down": (1, 96, 64)},
              "attn": {"wq": (1, 64, 4, 8), "wo": (1, 4, 8, 64)}}
    grads = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32), shapes,
                         is_leaf=lambda x: isinstance(x, tuple))
    # FSDP: every matrix sharded along its 64-wide model axis over 'fsdp' (contraction axis of the Gram matrix).
    specs = {"moe": {"experts": {"w_up": P(None, None, "fsdp", None)}}, "mlp": {"w_down": P(None, None, "fsdp")},
             "attn": {"wq": P(None, "fsdp", None, None), "wo": P(None, None, None, "fsdp")}}
    shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    g_sharded = jax.device_put(grads, shard)
    out = {}
    for name, m in (("ours", mesh), ("naive", None)):
        tx = kmuon.scale_by_muon(mesh=m, dtype=jnp.float32)
        state = jax.device_put(tx.init(grads), kmuon.MuonState(count=NamedSharding(mesh, P()), mu=shard))
        step = jax.jit(tx.update, in_shardings=(shard, kmuon.MuonState(NamedSharding(mesh, P()), shard)),
                       out_shardings=(shard, kmuon.MuonState(NamedSharding(mesh, P()), shard)))
        compiled = step.lower(g_sharded, state).compile()
        upd, _ = compiled(g_sharded, state)
        out[name] = {"collectives": _collectives(compiled.as_text()),
                     "update": jax.tree.map(lambda x: np.asarray(x).tolist(), upd)}
    ref_tx = kmuon.scale_by_muon(dtype=jnp.float32)
    with jax.default_device(jax.devices()[0]):
        ref, _ = jax.jit(ref_tx.update)(grads, ref_tx.init(grads))
    out["reference"] = jax.tree.map(lambda x: np.asarray(x).tolist(), ref)
    print("JSON" + json.dumps(out))


def test_sharded_update_equals_unsharded_without_gram_all_reduce():
    import numpy as np
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("JSON", 1)[1])
    ours, naive = out["ours"], out["naive"]
    print("collectives ours:", ours["collectives"], "naive GSPMD:", naive["collectives"])
    # No Gram matrix is ever all-reduced: each device orthogonalizes whole matrices (the only all-reduce left is
    # XLA's way of moving a slice back to its FSDP layout). Plain GSPMD partitioning reduces partial Grams.
    assert ours["collectives"]["gram_all_reduce"] == 0, ours["collectives"]
    assert ours["collectives"]["all-to-all"] > 0            # the reshards are there
    assert naive["collectives"]["gram_all_reduce"] > 0, naive["collectives"]
    flat = lambda t: [np.asarray(x) for x in _leaves(t)]
    for a, b in zip(flat(ours["update"]), flat(out["reference"])):
        np.testing.assert_allclose(a, b, atol=2e-5)
    for a, b in zip(flat(naive["update"]), flat(out["reference"])):
        np.testing.assert_allclose(a, b, atol=2e-5)


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _leaves(tree[k])]
    return [tree]


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _run()
