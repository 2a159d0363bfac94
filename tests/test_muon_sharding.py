"""Sharding-aware Muon on 8 fake CPU devices: same update as unsharded, and the only collectives are reshards.

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

    import numpy as np
    ops = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
    out = {op: 0 for op in ops}
    out["gram_all_reduce"] = 0
    out["max_result_bytes"] = 0
    nbytes = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4}
    for line in hlo.splitlines():
        for op in ops:
            if f" {op}(" in line or f" {op}-start(" in line:
                out[op] += 1
                result = line.split(" = ", 1)[1].split(f" {op}")[0]
                size = sum(nbytes.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
                           for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", result))
                out["max_result_bytes"] = max(out["max_result_bytes"], size)
                if op == "all-reduce":
                    result = line.split(" = ", 1)[1].split(f" {op}")[0]
                    dims = [d.split(",") for d in re.findall(r"\[([\d,]+)\]", result)]
                    out["gram_all_reduce"] += sum(len(d) >= 2 and d[-1] == d[-2] for d in dims)
    return out


# name -> (mesh shape, mesh axes, {leaf: (shape, spec)}). "fsdp": every matrix split along its 64-wide model
# axis over 'fsdp' (the contraction axis of the Gram matrix). "ep": the pod layout (experts over 'expert', model
# dims over fsdp x expert) with batch axes (3 layers, 3 x 8 experts) that the 8 devices do not divide and a leaf
# that holds a single matrix.
SCENARIOS = {
    "fsdp": ((2, 4), ("data", "fsdp"), {
        "moe/experts/w_up": ((2, 4, 64, 24), (None, None, "fsdp", None)),
        "mlp/w_down": ((1, 96, 64), (None, None, "fsdp")),
        "attn/wq": ((1, 64, 4, 8), (None, "fsdp", None, None)),
        "attn/wo": ((1, 4, 8, 64), (None, None, None, "fsdp"))}),
    "ep": ((2, 4), ("fsdp", "expert"), {
        "moe/experts/w_up": ((3, 8, 64, 24), (None, "expert", "fsdp", None)),
        "moe/experts/w_down": ((3, 8, 24, 64), (None, "expert", None, "fsdp")),
        "mlp/w_up": ((3, 64, 96), (None, ("fsdp", "expert"), None)),
        "dense/w_down": ((1, 96, 64), (None, None, ("fsdp", "expert"))),
        "attn/wq": ((3, 64, 4, 8), (None, ("fsdp", "expert"), None, None))}),
}


def _tree(flat):
    out = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return out


def _run():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from kanana_jax.optim import muon as kmuon

    rng = np.random.default_rng(0)
    result = {}
    for scenario, (mesh_shape, axis_names, leaves) in SCENARIOS.items():
        mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), axis_names)
        grads = _tree({k: jnp.asarray(rng.standard_normal(shape), jnp.float32) for k, (shape, _) in leaves.items()})
        shard = _tree({k: NamedSharding(mesh, P(*spec)) for k, (_, spec) in leaves.items()})
        g_sharded = jax.device_put(grads, shard)
        out = {}
        for name, m in (("ours", mesh), ("naive", None)):
            tx = kmuon.scale_by_muon(mesh=m, dtype=jnp.float32)
            state_sharding = kmuon.MuonState(count=NamedSharding(mesh, P()), mu=shard)
            state = jax.device_put(tx.init(grads), state_sharding)
            step = jax.jit(tx.update, in_shardings=(shard, state_sharding), out_shardings=(shard, state_sharding))
            compiled = step.lower(g_sharded, state).compile()
            upd, _ = compiled(g_sharded, state)
            out[name] = {"collectives": _collectives(compiled.as_text()),
                         "update": jax.tree.map(lambda x: np.asarray(x).tolist(), upd)}
        ref_tx = kmuon.scale_by_muon(dtype=jnp.float32)
        with jax.default_device(jax.devices()[0]):
            ref, _ = jax.jit(ref_tx.update)(grads, ref_tx.init(grads))
        out["reference"] = jax.tree.map(lambda x: np.asarray(x).tolist(), ref)
        # Bytes one device may receive in one collective: its share of a leaf's matrices (in fp32), or the whole
        # leaf when it holds a single matrix (every device orthogonalizes it).
        shares = []
        for k, (shape, _) in leaves.items():
            n_mat = shape[0] * shape[1] if k.startswith("moe/") else shape[0]
            shares.append(4 * int(np.prod(shape)) // n_mat * -(-n_mat // 8))
        out["max_share_bytes"] = max(shares)
        result[scenario] = out
    print("JSON" + json.dumps(result))


def _subprocess_result():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("JSON", 1)[1])


def test_sharded_update_equals_unsharded_and_collectives_are_reshards():
    import numpy as np
    for scenario, out in _subprocess_result().items():
        ours, naive = out["ours"], out["naive"]
        print(scenario, "collectives ours:", ours["collectives"], "naive GSPMD:", naive["collectives"])
        # Each device orthogonalizes whole matrices: no all-reduce at all (plain GSPMD partitioning all-reduces
        # partial Gram matrices), only all-to-all reshards and the all-gather of a single-matrix leaf, and no
        # collective brings a device more than its share of one leaf.
        assert ours["collectives"]["all-reduce"] == 0, ours["collectives"]
        assert ours["collectives"]["reduce-scatter"] == 0, ours["collectives"]
        assert ours["collectives"]["all-to-all"] > 0, ours["collectives"]
        assert ours["collectives"]["max_result_bytes"] <= out["max_share_bytes"], (ours["collectives"],
                                                                                   out["max_share_bytes"])
        assert naive["collectives"]["gram_all_reduce"] > 0, naive["collectives"]
        flat = lambda t: [np.asarray(x) for x in _leaves(t)]
        for a, b in zip(flat(ours["update"]), flat(out["reference"])):
            np.testing.assert_allclose(a, b, atol=2e-5)
        for a, b in zip(flat(naive["update"]), flat(out["reference"])):
            np.testing.assert_allclose(a, b, atol=2e-5)


def test_shard_plan_spreads_batch_axes_over_the_mesh():
    from kanana_jax.optim.muon import shard_plan
    pod = [("data", 1), ("fsdp", 8), ("expert", 8), ("tensor", 1)]
    # 30B expert weights [47 layers, 128 experts]: all 64 devices on the experts axis, expert outermost (as stored).
    assert shard_plan([47, 128], pod) == ([(), ("expert", "fsdp")], [47, 128])
    # 47 dense-layer matrices over 64 devices: padded to 64, mesh order (that of the model-dim sharding).
    assert shard_plan([47], pod) == ([("fsdp", "expert")], [64])
    # A single matrix is not split; every device orthogonalizes it.
    assert shard_plan([1], pod) == ([()], [1])
    assert shard_plan([], pod) == ([], [])
    # 155B on v5p-512: experts keep 'expert', the 59 layers take fsdp 32 (padded to 64), not a 4x-padded split.
    assert shard_plan([59, 128], [("fsdp", 32), ("expert", 8)]) == ([("fsdp",), ("expert",)], [64, 128])
    # Uneven batch axes are padded only as far as the device count needs.
    assert shard_plan([3, 5], [("data", 2), ("fsdp", 4)]) == ([("fsdp",), ("data",)], [4, 6])


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _leaves(tree[k])]
    return [tree]


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _run()
