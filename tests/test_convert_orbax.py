"""HF checkpoint -> training workdir (step 0) -> `kanana-jax run` resumes from it -> HF export, through the CLI."""
import json
import os
import subprocess
import sys

import flax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import pretrain
from kanana_jax import cli
from kanana_jax import config as config_lib
from kanana_jax.convert import hf_config
from kanana_jax.convert.hf_export import export_hf
from kanana_jax.convert.hf_import import expected_tree
from kanana_jax.convert.orbax_hf import restore_params
from kanana_jax.convert.safetensors_io import SafetensorsCheckpoint

SPEC = "experiments/pretrain.py:size=tiny,steps=2,batch=4,seq_len=32"
SETS = ["train.eval_every=0", "train.tensorboard=false", "train.progress_bar=false", "train.async_checkpoint=false",
        "train.log_every=1"]


def _experiment():
    c = pretrain.get_config("size=tiny,steps=2,batch=4,seq_len=32")
    config_lib.apply_overrides(c, cli.parse_overrides(SETS))
    return config_lib.load(c)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A HF checkpoint of random tiny-model params with a non-zero router bias (written by our exporter)."""
    cfg = _experiment().model
    rng = np.random.default_rng(7)
    shapes = flax.traverse_util.flatten_dict(expected_tree(cfg))
    params = {p: (1.0 + 0.1 * rng.standard_normal(s.shape) if p[-1] == "scale" else
                  0.1 * rng.random(s.shape) if p[-1] == "bias" else 0.05 * rng.standard_normal(s.shape))
              for p, s in shapes.items()}
    params = flax.traverse_util.unflatten_dict({p: jnp.asarray(v, s.dtype) for (p, v), s in
                                                zip(params.items(), shapes.values())})
    out = tmp_path_factory.mktemp("hf") / "tiny"
    export_hf(params, cfg, str(out), max_shard_bytes=200_000)
    return out


def test_hf_to_orbax_train_and_back(hf_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    workdir = tmp_path / "run"
    cli.main(["convert", "hf-config", str(hf_dir)])
    printed = capsys.readouterr().out
    assert '"n_group": 2' in printed and "--set model.d_model=128" in printed

    set_args = [a for s in SETS for a in ("--set", s)]
    cli.main(["convert", "hf-to-orbax", str(hf_dir), SPEC, "--workdir", str(workdir), *set_args])
    # The step-0 checkpoint holds exactly the HF weights: export it back, bit for bit.
    cli.main(["convert", "orbax-to-hf", str(workdir), str(tmp_path / "back0"), "--step", "0"])
    original, back = SafetensorsCheckpoint(str(hf_dir)), SafetensorsCheckpoint(str(tmp_path / "back0"))
    assert original.names() == back.names()
    assert all(original.get(n).tobytes() == back.get(n).tobytes() for n in original.names())

    # `kanana-jax run` resumes from the imported step 0 and trains; the export of its last step has moved.
    cli.main(["run", SPEC, "--workdir", str(workdir), *set_args])
    assert "finished step 2 of 2" in capsys.readouterr().out
    with open(workdir / "metrics.jsonl") as f:
        row = json.loads(f.read().strip().splitlines()[-1])
    assert np.isfinite(row["loss"])
    cli.main(["convert", "orbax-to-hf", str(workdir), str(tmp_path / "back2"), "--dtype", "bfloat16",
              "--base", str(hf_dir)])
    trained = SafetensorsCheckpoint(str(tmp_path / "back2"))
    assert trained.names() == original.names()
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    assert trained.get(name).dtype == jnp.bfloat16
    assert not np.array_equal(trained.get(name).astype(np.float32), original.get(name).astype(np.float32))
    step, params = restore_params(str(workdir))
    assert step == 2 and "opt_state" not in params


def test_hf_to_orbax_refuses_a_different_architecture(hf_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = ["convert", "hf-to-orbax", str(hf_dir), SPEC, "--workdir", str(tmp_path / "x"), "--set", "model.n_heads=8"]
    with pytest.raises(SystemExit) as e:     # a user error: one line, exit status 2
        cli.main(argv)
    assert e.value.code == 2 and "--set model.n_heads=4" in capsys.readouterr().err
    with pytest.raises(hf_config.HFConfigError, match=r"--set model.n_heads=4"):
        cli.main(["--debug", *argv])


SHARDED_IMPORT = """
import sys, jax, numpy as np
from kanana_jax import config as config_lib
from kanana_jax.convert.hf_import import load_hf_checkpoint
from kanana_jax.train.builder import build_trainer
from experiments import pretrain
c = pretrain.get_config("size=tiny")
c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.rules = 1, 2, 2, "fsdp_ep"
trainer = build_trainer(config_lib.load(c))
with trainer.context():
    _, sharded, _ = load_hf_checkpoint(sys.argv[1], shardings=trainer.state_sharding.params)
_, single, _ = load_hf_checkpoint(sys.argv[1])
for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
w = sharded["moe_layers"]["moe"]["experts"]["w_gate"]
print(len(w.addressable_shards), w.addressable_shards[0].data.shape, w.shape)
"""


def test_import_straight_into_sharded_layout(hf_dir):
    """On 4 (fake CPU) devices with fsdp x expert sharding each device gets its block; values match one device."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", SHARDED_IMPORT, str(hf_dir)], capture_output=True, text=True,
                          env=env, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "4 (2, 4, 64, 128) (2, 8, 128, 128)"
