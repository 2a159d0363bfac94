"""Multi-host data path with two real JAX processes on this machine (CPU, gloo collectives, 2 devices each):
`multihost.initialize` joins them, each process loads only its share of the batch
(`make_iterator(shard_index=process_index, shard_count=process_count)`), `sharding.put_batch` assembles the global
array, and a jitted reduction over it sees exactly the rows of the whole global batch; then both processes save one
orbax checkpoint together and restore it."""
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from kanana_jax.parallel.fake_devices import REPO_ROOT, fake_device_env

N_PROCESSES, DEVICES_PER_PROCESS = 2, 2
CONFIG = ["data.global_batch_size=8", "data.seq_len=32", "mesh.data=1", "mesh.fsdp=-1"]


def worker(process_id: int, port: int, ckpt_dir: str) -> dict:
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(N_PROCESSES),
                      JAX_PROCESS_ID=str(process_id))
    import jax
    import jax.numpy as jnp
    from kanana_jax import sharding
    from kanana_jax.cli import build_config
    from kanana_jax.config import MeshConfig
    from kanana_jax.data import pipeline
    from kanana_jax.parallel import multihost
    from kanana_jax.train.checkpoint import Checkpointer

    info = multihost.initialize()
    _, cfg = build_config("experiments/pretrain.py:size=tiny", CONFIG)
    it = pipeline.make_iterator(cfg.data, split="train", seed=0, shard_index=jax.process_index(),
                                shard_count=jax.process_count())
    local = next(it)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1))
    batch = sharding.put_batch(local, sharding.batch_sharding(mesh, sharding.RULES["fsdp"]))
    x = batch["inputs_BxT"]
    row_sums = jax.jit(lambda t: jnp.sum(t.astype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32), axis=1),
                       out_shardings=sharding.replicated(mesh))(x)
    ckpt = Checkpointer(ckpt_dir, keep=1, async_save=False)
    ckpt.save(1, {"x": x}, {"position": 3})
    ckpt.wait()
    out = ckpt.restore(1, {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)})
    restored = out.state if hasattr(out, "state") else out[0]
    same = bool(jax.jit(lambda a, b: jnp.all(a == b), out_shardings=sharding.replicated(mesh))(restored["x"], x))
    ckpt.close()
    return {**info, "global_shape": list(x.shape), "local_rows": local["inputs_BxT"].shape[0],
            "local_row_sums": np.asarray(local["inputs_BxT"], np.int64).sum(axis=1).tolist(),
            "global_row_sums": np.asarray(row_sums).tolist(), "restored_equal": same}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    port = _free_port()
    env = fake_device_env(DEVICES_PER_PROCESS)
    with tempfile.TemporaryDirectory() as ckpt_dir:
        procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), ckpt_dir], env=env, cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(N_PROCESSES)]
        outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def test_processes_join_one_runtime(results):
    assert [r["process_index"] for r in results] == [0, 1]
    assert all(r["process_count"] == 2 and r["devices"] == 4 and r["local_devices"] == 2 for r in results)


def test_each_host_loads_its_share_and_the_global_batch_holds_all_rows(results):
    from kanana_jax.cli import build_config
    from kanana_jax.data import pipeline
    _, cfg = build_config("experiments/pretrain.py:size=tiny", CONFIG)
    whole = next(pipeline.make_iterator(cfg.data, split="train", seed=0))["inputs_BxT"]
    expected = sorted(np.asarray(whole, np.int64).sum(axis=1).tolist())
    assert all(r["local_rows"] == 4 and r["global_shape"] == [8, 32] for r in results)
    assert sorted(results[0]["local_row_sums"] + results[1]["local_row_sums"]) == expected
    assert sorted(results[0]["global_row_sums"]) == expected == sorted(results[1]["global_row_sums"])


def test_checkpoint_saved_by_both_hosts_restores(results):
    assert all(r["restored_equal"] for r in results)


if __name__ == "__main__":
    sys.path.insert(0, REPO_ROOT)
    print(json.dumps(worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])))
