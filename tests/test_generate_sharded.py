"""Generation sharded over 8 fake CPU devices (rows over data x fsdp x expert, parameters over fsdp, experts over
the expert axis with all-to-all dispatch) equals generation on one device."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    import jax, numpy as np
    assert jax.device_count() == 8, jax.devices()
    from jax.sharding import NamedSharding
    from kanana_jax import sharding
    from kanana_jax.config import MeshConfig
    from kanana_jax.generate.sampler import Sampler, SamplingParams, shard_params
    from test_generate import PROMPTS, _model

    cfg, _, params = _model("mla")
    prompts = PROMPTS + [[7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]   # 5 rows -> padded to 8
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=2, expert=2, rules="fsdp_ep"))
    rules = sharding.logical_rules("fsdp_ep")
    sharded = Sampler(cfg, shard_params(cfg, params, mesh, rules), mesh=mesh, rules=rules)
    assert sharded.row_multiple == 8 and sharded.batch_axes == ("data", "fsdp", "expert")
    single = Sampler(cfg, params)
    for sp in (SamplingParams(max_new_tokens=7, temperature=0.0),
               SamplingParams(max_new_tokens=7, temperature=1.0, top_k=5)):
        a = single.generate_arrays(prompts, sp, jax.random.PRNGKey(3))
        b = sharded.generate_arrays(prompts, sp, jax.random.PRNGKey(3))
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-4)
    # the cache really is split over the rows
    with sharded._context():
        tokens = jax.device_put(np.zeros((8, 16), np.int32), sharded._rows_2d)
        lengths = jax.device_put(np.ones((8,), np.int32), sharded._rows)
        cache, _ = sharded._prefill(sharded.params, tokens, lengths, cache_len=22)
    c_kv = cache["moe_layers"]["c_kv"]
    assert isinstance(c_kv.sharding, NamedSharding) and len(c_kv.addressable_shards) == 8
    assert c_kv.addressable_shards[0].data.shape[1] == 1, c_kv.addressable_shards[0].data.shape
    print("SHARDED_OK")
""")


def test_sharded_generation_on_8_fake_devices_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
