"""Expert-parallel MoE dispatch (shard_map + all-to-all) equals the reference dispatch: outputs and gradients,
dropless and capacity modes, with and without the expert hidden width split over the tensor axis, and fp8 dropless
with the experts' fp8 copies made outside the shard_map; the dense emulation of ragged_all_to_all follows its
semantics. Runs this file as a script on 8 fake CPU devices."""
import sys

import numpy as np
import pytest

from kanana_jax.config import ModelConfig
from kanana_jax.parallel import expert as ep
from kanana_jax.parallel.fake_devices import REPO_ROOT, main_for_checks, run_checks

# (name, rules preset, mode, capacity factor); mesh (data, fsdp, expert, tensor) = (1, 2, 2, 2) or (1, 2, 4, 1)
CASES = [("dropless_ep4", "fsdp_ep", "dropless", 1.0), ("dropless_tp", "fsdp_tp_ep", "dropless", 1.0),
         ("capacity_nodrop_ep4", "fsdp_ep", "capacity", 8.0), ("capacity_drop_tp", "fsdp_tp_ep", "capacity", 0.5)]


def test_capacity_is_ceil_of_factor_times_copies_per_expert():
    assert ep.capacity(96, 8, 1.25) == 15 and ep.capacity(4, 64, 0.1) == 1


def test_capacity_slots_keep_the_first_copies_of_each_expert_in_token_order():
    import jax.numpy as jnp
    ids = jnp.array([[0, 1], [0, 2], [0, 1], [3, 0]], jnp.int32)
    order, token, slot = ep.capacity_slots(ids, 4, 2)
    by_copy = {(int(t), int(ids.reshape(-1)[o])): int(s) for o, t, s in zip(order, token, slot)}
    assert by_copy[(0, 0)] == 0 and by_copy[(1, 0)] == 1 and by_copy[(2, 0)] == 8 and by_copy[(3, 0)] == 8
    assert by_copy[(0, 1)] == 2 and by_copy[(2, 1)] == 3 and by_copy[(1, 2)] == 4 and by_copy[(3, 3)] == 6


def test_no_plan_without_an_expert_axis_and_clear_errors_for_bad_layouts():
    from kanana_jax import sharding
    mesh = type("M", (), {"shape": {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}})()
    assert ep.make_plan(ModelConfig(), mesh, sharding.RULES["fsdp_ep"]) is None
    mesh.shape = {"data": 1, "fsdp": 1, "expert": 3, "tensor": 1}
    with pytest.raises(ValueError, match="n_routed_experts=8 is not divisible"):
        ep.make_plan(ModelConfig(), mesh, sharding.RULES["fsdp_ep"])
    mesh.shape = {"data": 1, "fsdp": 1, "expert": 2, "tensor": 1}
    assert ep.make_plan(ModelConfig(expert_parallel="off"), mesh, sharding.RULES["fsdp_ep"]) is None
    rules = [r for r in sharding.RULES["fsdp_ep"] if r[0] != "activation_batch"] + [("activation_batch", "data")]
    with pytest.raises(ValueError, match="batch split over it"):
        ep.make_plan(ModelConfig(), mesh, rules)


# ----- 8 fake devices (script side) -----

def _ragged_reference(operands, in_off, send, out_off, recv, out_rows):
    """numpy semantics of ragged_all_to_all over G devices: device i's rows in_off[i][j]:+send[i][j] go to
    device j at out_off[i][j]."""
    G = len(operands)
    outs = [np.zeros((out_rows,) + operands[0].shape[1:], operands[0].dtype) for _ in range(G)]
    for i in range(G):
        for j in range(G):
            assert send[i][j] == recv[j][i]
            outs[j][out_off[i][j]:out_off[i][j] + send[i][j]] = operands[i][in_off[i][j]:in_off[i][j] + send[i][j]]
    return outs


def dense_exchange_matches_ragged_semantics():
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P
    from kanana_jax.parallel.exchange import ragged_exchange
    G, M, D = 8, 6, 3
    rng = np.random.default_rng(0)
    send = np.zeros((G, G), np.int32)
    for i in range(G):  # random split of up to M rows of device i over the receivers
        cuts = np.sort(rng.integers(0, rng.integers(1, M + 1) + 1, G - 1))
        send[i] = np.diff(np.concatenate([[0], cuts, [cuts[-1]]]))
    in_off = np.cumsum(send, 1) - send
    out_off = (np.cumsum(send, 0) - send)
    recv = send.T.copy()
    x = rng.normal(size=(G, M, D)).astype(np.float32)
    want = _ragged_reference(list(x), in_off, send, out_off, recv, G * M)
    mesh = Mesh(np.array(jax.devices()), ("x",))
    fn = jax.shard_map(lambda x, a, b, c, d: ragged_exchange(x[0], G * M, a[0], b[0], c[0], d[0], axis_name="x",
                                                            exchange="dense", max_send=M)[None],
                       mesh=mesh, in_specs=P("x"), out_specs=P("x"))
    got = jax.jit(fn)(jnp.asarray(x), in_off, send, out_off, recv)
    return float(np.max(np.abs(np.asarray(got) - np.stack(want))))


def _moe_inputs(N=64, E=8, D=16, F=12, k=2):
    import jax
    import jax.numpy as jnp
    from kanana_jax.model import moe
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    x = jax.random.normal(keys[0], (N, D))
    ids, weights, _ = moe.route(jax.random.normal(keys[1], (N, E)), jnp.zeros(E), top_k=k, score_func="sigmoid",
                                n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0)
    w = [0.3 * jax.random.normal(keys[2], (E, D, F)), 0.3 * jax.random.normal(keys[3], (E, D, F)),
         0.3 * jax.random.normal(keys[4], (E, F, D))]
    return x, ids, weights, w


def expert_parallel_equals_reference():
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from kanana_jax import sharding
    from kanana_jax.model import moe
    x, ids, weights, (wg, wu, wd) = _moe_inputs()
    gmm = moe.grouped_matmul("blocked", 8)
    out = {}
    for name, preset, mode, factor in CASES:
        shape = (1, 2, 4, 1) if name.endswith("ep4") else (1, 2, 2, 2)
        mesh = Mesh(np.array(jax.devices()).reshape(shape), sharding.MESH_AXES)
        plan = ep.make_plan(ModelConfig(expert_parallel=mode, expert_capacity_factor=factor), mesh,
                            sharding.RULES[preset])
        keep = np.ones(ids.shape, np.float32)
        if mode == "capacity":  # the copies capacity dispatch keeps, computed per token shard
            n_local = ids.shape[0] // plan.n_token_shards
            cap = ep.capacity(n_local * ids.shape[1], 8, factor)
            for s in range(plan.n_token_shards):
                order, _, slot = ep.capacity_slots(ids[s * n_local:(s + 1) * n_local], 8, cap)
                kept = np.zeros(n_local * ids.shape[1], np.float32)
                kept[np.asarray(order)] = np.asarray(slot) < 8 * cap
                keep[s * n_local:(s + 1) * n_local] = kept.reshape(n_local, -1)
        keep = jnp.asarray(keep)

        def par(x, w, a, b, c):
            return ep.dispatch(plan, x, ids, w, a, b, c, gmm)

        def ref(x, w, a, b, c):
            return moe.dispatch_experts(x, ids, w * keep, a, b, c, gmm)

        def loss(f):
            return lambda *args: jnp.sum(jnp.sin(f(*args)) * jnp.arange(x.shape[1]))

        args = (x, weights, wg, wu, wd)
        with jax.set_mesh(mesh):
            y_par = jax.jit(par)(*args)
            g_par = jax.jit(jax.grad(loss(par), argnums=tuple(range(5))))(*args)
        y_ref = ref(*args)
        g_ref = jax.grad(loss(ref), argnums=tuple(range(5)))(*args)
        out[name] = {"exchange": plan.exchange, "mlp_axis": plan.mlp_axis, "kept": float(jnp.mean(keep)),
                     "out_diff": float(jnp.max(jnp.abs(y_par - y_ref))), "out_scale": float(jnp.max(jnp.abs(y_ref))),
                     "grad_diffs": [float(jnp.max(jnp.abs(a - b))) for a, b in zip(g_par, g_ref)],
                     "grad_scales": [float(jnp.max(jnp.abs(b))) for b in g_ref]}
    return out


def fp8_copies_made_ahead_pass_through_the_shard_map():
    """fp8 dispatch given the experts' fp8 copies made outside the shard_map (QuantizedExperts, as the train step
    makes them) vs quantizing inside it and vs the one-device dispatch given the same copies."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from kanana_jax import sharding
    from kanana_jax.model import fp8, moe
    from pallas_kernels.moe.fp8 import QuantizedExperts
    x, ids, weights, (wg, wu, wd) = _moe_inputs()
    gmm = moe.grouped_matmul("blocked", 8, fp8.Fp8Recipe())
    ahead = lambda ws: [QuantizedExperts.of(w) for w in ws]
    out = {}
    for name, preset, mode, factor in CASES[:2]:
        shape = (1, 2, 4, 1) if name.endswith("ep4") else (1, 2, 2, 2)
        mesh = Mesh(np.array(jax.devices()).reshape(shape), sharding.MESH_AXES)
        plan = ep.make_plan(ModelConfig(expert_parallel=mode), mesh, sharding.RULES[preset])
        fns = {"par_ahead": lambda x, *ws: ep.dispatch(plan, x, ids, weights, *ahead(ws), gmm),
               "par_in_call": lambda x, *ws: ep.dispatch(plan, x, ids, weights, *ws, gmm),
               "ref_ahead": lambda x, *ws: moe.dispatch_experts(x, ids, weights, *ahead(ws), gmm)}
        res = {}
        for label, f in fns.items():
            loss = lambda *args, f=f: jnp.sum(jnp.sin(f(*args)) * jnp.arange(x.shape[1]))
            with jax.set_mesh(mesh):
                res[label] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, wg, wu, wd)
        diff = lambda a, b: max(float(jnp.max(jnp.abs(u - v))) for u, v in
                                zip(jax.tree.leaves(res[a]), jax.tree.leaves(res[b])))
        out[name] = {"ahead_vs_in_call": diff("par_ahead", "par_in_call"), "ahead_vs_ref": diff("par_ahead", "ref_ahead"),
                     "scale": max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(res["ref_ahead"]))}
    return out


@pytest.fixture(scope="module")
def results():
    return run_checks(__file__, ["dense_exchange_matches_ragged_semantics", "expert_parallel_equals_reference",
                                 "fp8_copies_made_ahead_pass_through_the_shard_map"])


def test_dense_exchange_follows_ragged_all_to_all_semantics(results):
    assert results["dense_exchange_matches_ragged_semantics"] == 0.0


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_expert_parallel_outputs_and_grads_equal_reference(results, case):
    r = results["expert_parallel_equals_reference"][case]
    assert r["exchange"] == "dense" and (r["mlp_axis"] == "tensor") == case.endswith("tp")
    if case == "capacity_drop_tp":
        assert 0.2 < r["kept"] < 0.9          # capacity 0.5 really drops copies
    else:
        assert r["kept"] == 1.0
    assert r["out_scale"] > 0.5 and r["out_diff"] < 1e-5 * r["out_scale"] * 10, r
    for diff, scale in zip(r["grad_diffs"], r["grad_scales"]):
        assert scale > 1e-3 and diff < 1e-5 * max(scale, 1.0) * 10, r


def test_fp8_expert_copies_made_ahead_pass_through_the_shard_map(results):
    r = results["fp8_copies_made_ahead_pass_through_the_shard_map"]
    # experts split over devices, whole experts per device: the copies are the ones each device would make
    assert r["dropless_ep4"]["ahead_vs_in_call"] == 0.0, r
    # hidden width split over the tensor axis too: the copies made ahead have one scale per whole expert, as on
    # one device (inside the shard_map each device scales its slice; powers of two, here the same scales);
    # against one device: the order of the sums over token (and width) shards only
    for case in r.values():
        assert case["scale"] > 0.5 and case["ahead_vs_ref"] < 1e-6 * case["scale"] * 10, r
        assert case["ahead_vs_in_call"] < 1e-6 * case["scale"] * 10, r

if __name__ == "__main__":
    sys.path.insert(0, REPO_ROOT)
    main_for_checks({"dense_exchange_matches_ragged_semantics": dense_exchange_matches_ragged_semantics,
                     "expert_parallel_equals_reference": expert_parallel_equals_reference,
                     "fp8_copies_made_ahead_pass_through_the_shard_map": fp8_copies_made_ahead_pass_through_the_shard_map})
