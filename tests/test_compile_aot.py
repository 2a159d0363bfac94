"""AOT compile of the real train step for a TPU topology on this CPU machine (libtpu): the tiny config with expert
parallelism (shard_map + ragged all-to-all) on v5p-8 fits, with sane memory and FLOP numbers; exit codes."""
import json
import os
import subprocess
import sys

import pytest

from launch import compile_aot
from kanana_jax.parallel.fake_devices import REPO_ROOT


OVERRIDES = ["model.n_layers=2", "data.seq_len=64", "data.global_batch_size=8", "mesh.rules=fsdp_ep",
             "mesh.data=1", "mesh.fsdp=-1", "mesh.expert=2", "model.moe_impl=ragged_dot"]


@pytest.fixture(scope="module")
def report():
    cmd = [sys.executable, "-m", "launch.compile_aot", "--config", "experiments/pretrain.py:size=tiny",
           "--topology", "v5p-8"]
    for item in OVERRIDES:
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # exactly one JSON object on stdout
    return json.loads(lines[0])


def test_tiny_expert_parallel_step_fits_v5p_8(report):
    assert report["fits"] is True and report["topology"] == "v5p-8" and report["chips"] == 4
    assert report["device_kind"].startswith("TPU v5")
    assert report["mesh"] == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 1}
    assert report["hbm_per_chip"] > 90 * 2**30


def test_memory_numbers_are_consistent(report):
    mem = report["per_chip_bytes"]
    params = 2_500_000  # tiny with 2 layers: ~0.6M parameters, fp32 params + 2 Adam moments, split over 4 chips
    assert params < mem["argument"] < 40 * params
    assert 0 < mem["alias"] <= min(mem["argument"], mem["output"])  # the donated state is reused
    assert mem["total"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]
    assert mem["total"] < report["hbm_per_chip"]


def test_compiled_flops_are_close_to_the_model_count(report):
    ratio = report["flops_per_step_per_chip"] / report["model_flops_per_step_per_chip"]
    assert 0.5 < ratio < 5.0, report  # compiled work includes attention, routing and the optimizer
    assert report["compile_seconds"] > 0


def test_exit_code_is_1_when_it_does_not_fit(monkeypatch, capsys):
    monkeypatch.setattr(compile_aot, "compile_for_topology", lambda cfg, s, compile=True: {"fits": False, "chips": s.chips})
    assert compile_aot.main(["--config", "experiments/pretrain.py:size=tiny", "--topology", "v5p-8"]) == 1
    assert json.loads(capsys.readouterr().out)["fits"] is False


def test_a_layout_that_cannot_exist_names_the_key_and_points_to_the_pod_configs(capsys):
    # the README's old command: pretrain.py's batch of 16 does not split over the 64 chips of a v5p-128
    assert compile_aot.main(["--config", "experiments/pretrain.py:size=kanana2_30b_a3b", "--topology", "v5p-128",
                             "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "error: data.global_batch_size=16 cannot be split" in err and "hint: experiments/pod.py" in err


def test_out_of_hbm_messages_are_parsed():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (2.09T) "
           "exceeds available HBM (95.73G). HLO module: jit_train_step.")  # libtpu 0.0.48, tiny at B4096 T8192
    out = compile_aot.parse_oom(msg)
    assert out["used"] == int(2.09 * 2**40) and out["capacity"] == int(95.73 * 2**30)
    old = "Ran out of memory in memory space hbm. Used 842.77G of 95.73G hbm. Exceeded hbm capacity by 747.04G."
    assert compile_aot.parse_oom(old)["used"] == int(842.77 * 2**30)
    assert compile_aot.parse_oom("INVALID_ARGUMENT: something else") is None


def test_config_without_topology_needs_the_flag():
    from launch.topologies import config_topology
    assert config_topology("experiments/pod.py:model=155b_a17b") == "v5p-512"
    with pytest.raises(ValueError, match="pass --topology"):
        config_topology("experiments/pretrain.py:size=tiny")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
