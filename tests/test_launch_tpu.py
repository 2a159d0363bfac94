"""TPU slice names and the pod launcher: golden gcloud / xpk command lines, sweeps, multi-slice, clear errors."""
import shlex

import pytest

from launch import topologies, tpu

GOLDEN_GCLOUD = [
    "gcloud compute tpus tpu-vm create kj-pod-30b-a3b --project=my-proj --zone=us-east5-a "
    "--accelerator-type=v5p-128 --version=v2-alpha-tpuv5",
    "gcloud compute tpus tpu-vm ssh kj-pod-30b-a3b --project=my-proj --zone=us-east5-a --worker=all "
    "'--command=(command -v ~/.local/bin/uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh) && "
    "(test -d ~/kanana_jax || git clone https://github.com/me/kanana_jax.git ~/kanana_jax) && "
    "cd ~/kanana_jax && git fetch --all --quiet && git checkout --quiet abc123 && "
    "~/.local/bin/uv venv --allow-existing --python 3.12 ~/kanana_venv && "
    "~/.local/bin/uv pip install --python ~/kanana_venv/bin/python -e '\"'\"'.[tpu,data]'\"'\"''",
    "gcloud compute tpus tpu-vm ssh kj-pod-30b-a3b --project=my-proj --zone=us-east5-a --worker=all "
    "'--command=cd ~/kanana_jax && ~/kanana_venv/bin/python -m kanana_jax.parallel.worker "
    "experiments/pod.py:model=30b_a3b --workdir gs://bkt/run --set train.steps=10'",
    "# when done: gcloud compute tpus tpu-vm delete kj-pod-30b-a3b --project=my-proj --zone=us-east5-a --quiet",
]

GOLDEN_XPK_SWEEP = [
    "xpk workload create --cluster=c1 --project=my-proj --zone=us-east5-a --workload=kj-pod-30b-a3b-s{i} "
    "--tpu-type=v5p-128 --num-slices=2 --base-docker-image=python:3.12 --script-dir=. "
    "'--command=python3 -m pip install --quiet -e '\"'\"'.[tpu,data]'\"'\"' && python3 -m kanana_jax.parallel.worker "
    "experiments/pod.py:model=30b_a3b --workdir gs://bkt/run/s{i} --set mesh.dcn_data=2 "
    "--set optimizer.learning_rate={lr}'".format(i=i, lr=lr) for i, lr in enumerate(("0.0001", "0.0002", "0.0004"))
]

COMMON = ["--config", "experiments/pod.py:model=30b_a3b", "--project", "my-proj", "--zone", "us-east5-a",
          "--workdir", "gs://bkt/run"]


def _lines(capsys):
    return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("name,chips,topology,hosts", [
    ("v5p-8", 4, "2x2x1", 1), ("v5p-128", 64, "4x4x4", 16), ("v5p-512", 256, "4x8x8", 64), ("v4-32", 16, "2x2x4", 4),
    ("v5litepod-16", 16, "4x4", 4), ("v5e-8", 8, "2x4", 1), ("v6e-256", 256, "16x16", 64), ("v6e-1", 1, "1x1", 1)])
def test_slice_names_map_to_chips_topology_and_hosts(name, chips, topology, hosts):
    s = topologies.parse(name)
    assert (s.chips, s.topology, s.hosts) == (chips, topology, hosts)
    assert s.jax_topology_name.endswith(topology) and topologies.parse(s.name) == s


@pytest.mark.parametrize("bad,match", [("v5p-7", "even number"), ("v5p-96", "not a v5p slice size"),
                                       ("v7-8", "unknown TPU topology"), ("tpu", "unknown TPU topology")])
def test_invalid_topologies_say_what_is_allowed(bad, match):
    with pytest.raises(ValueError, match=match):
        topologies.parse(bad)


def test_zone_checks():
    v5p = topologies.GENERATIONS["v5p"]
    assert topologies.check_zone(v5p, "us-east5-a") == "us-east5-a"
    with pytest.raises(ValueError, match="does not offer TPU v5p"):
        topologies.check_zone(v5p, "us-west1-b")
    assert topologies.check_zone(v5p, "us-west1-b", skip=True)
    with pytest.raises(ValueError, match="not a Google Cloud zone"):
        topologies.check_zone(v5p, "east")


def test_gcloud_commands_golden(capsys):
    assert tpu.main(COMMON + ["--repo", "https://github.com/me/kanana_jax.git", "--ref", "abc123",
                              "--set", "train.steps=10"]) == 0
    assert _lines(capsys) == GOLDEN_GCLOUD
    assert shlex.split(GOLDEN_GCLOUD[2])[-1].startswith("--command=cd ~/kanana_jax && ")


def test_xpk_sweep_multislice_golden(capsys):
    assert tpu.main(COMMON + ["--mode", "xpk", "--cluster", "c1", "--num-slices", "2", "--sweep"]) == 0
    assert _lines(capsys) == GOLDEN_XPK_SWEEP


@pytest.mark.parametrize("extra,match", [
    (["--topology", "v5p-100"], "not a v5p slice size"),
    (["--zone", "europe-west9-z"], "does not offer TPU v5p"),
    (["--workdir", "/tmp/run"], "must share the workdir: use a gs:// path"),
    (["--mode", "xpk"], "needs --cluster"),
    (["--num-slices", "2"], "multi-slice runs go through xpk"),
    (["--set", "mesh.expert=0"], "mesh.expert"),
])
def test_invalid_requests_fail_with_clear_errors(capsys, extra, match):
    assert tpu.main(COMMON + ["--repo", "r", "--ref", "x"] + extra) == 2
    assert match in capsys.readouterr().err


def test_missing_project_is_an_error(capsys, monkeypatch):
    for key in tpu.PROJECT_ENV:
        monkeypatch.delenv(key, raising=False)
    args = [a for a in COMMON if a not in ("--project", "my-proj")]
    assert tpu.main(args + ["--repo", "r"]) == 2
    assert "no GCP project: pass --project" in capsys.readouterr().err


def test_default_names_are_valid_tpu_names():
    assert tpu.default_name("experiments/pod.py:model=155b_a17b,slice=v5p-512") == "kj-pod-155b-a17b-v5p-512"
    with pytest.raises(ValueError, match="lowercase"):
        tpu._name_ok("My_Run")


def test_pod_configs_validate_on_every_listed_slice():
    from experiments import pod
    from kanana_jax.cli import build_config
    from kanana_jax.sharding import mesh_shape
    for model, layouts in pod.SLICES.items():
        for name, (_, batch, seq_len) in layouts.items():
            _, cfg = build_config(f"experiments/pod.py:model={model},slice={name}")
            chips = topologies.parse(name).chips
            sizes = mesh_shape(cfg.mesh, chips)
            assert cfg.data.global_batch_size == batch and cfg.data.seq_len == seq_len
            assert batch % (sizes["data"] * sizes["fsdp"] * sizes["expert"]) == 0
            assert cfg.model.n_routed_experts % sizes["expert"] == 0 and cfg.mesh.rules == "fsdp_ep"


def test_a_local_origin_warns_in_a_dry_run_and_is_refused_with_execute(monkeypatch, capsys):
    assert tpu.reachable_repo("https://github.com/me/kanana_jax.git") and tpu.reachable_repo("git@github.com:me/k.git")
    assert tpu.reachable_repo("ssh://git@host/k.git")
    for local in ("/work/main", "./main", "~/src/kanana_jax", "file:///work/main", "../kanana_jax"):
        assert not tpu.reachable_repo(local), local
    monkeypatch.setattr(tpu, "_git", lambda *a: "/path/on/this/machine" if a[0] == "remote" else "abc123")
    assert tpu.main(COMMON) == 0
    captured = capsys.readouterr()
    assert "warning: this checkout's origin /path/on/this/machine is a path on this machine" in captured.err
    assert "git clone /path/on/this/machine" in captured.out          # the dry run still prints the plan
    assert tpu.main(COMMON + ["--execute"]) == 2
    assert "error: this checkout's origin /path/on/this/machine is a path" in capsys.readouterr().err
    assert tpu.main(COMMON + ["--repo", "https://github.com/me/kanana_jax.git"]) == 0
    assert "warning" not in capsys.readouterr().err
