"""Every command in README.md's ```bash blocks runs, as written but shortened (fewer steps, --dry-run, a tiny AOT
compile), in subprocesses on CPU, in the README's order (the eval and the conversions use the tiny run's
checkpoint). `HOW` says how each README command is run here; a README command it does not know fails the first
test, so the README and this test change together."""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_AOT = ["--config", "experiments/pretrain.py:size=tiny", "--topology", "v5p-8", "--set", "model.n_layers=2",
            "--set", "data.seq_len=64", "--set", "data.global_batch_size=8", "--set", "mesh.rules=fsdp_ep",
            "--set", "mesh.data=1", "--set", "mesh.fsdp=-1", "--set", "mesh.expert=2", "--set",
            "model.moe_impl=ragged_dot"]
FAST = ["--set", "train.steps=2", "--set", "train.progress_bar=false"]

# README command (as written, without its comment) -> how this test runs it: (extra arguments, or 'ci' for the
# test command, which is checked against .ci/run instead of run inside the test suite, or 'pipeline' for the
# pipeline, whose stages are built here and which tests/test_pipeline.py runs end to end), plus the checks.
HOW = {
    "launch/local.sh kanana-jax run experiments/pretrain.py:size=tiny --workdir runs/pretrain_tiny":
        (FAST, ["finished step 2 of 2"]),
    "launch/local.sh python -m pytest -n 2 -q tests": ("ci", []),
    "kanana-jax run experiments/pretrain.py:size=tiny,steps=300 --workdir runs/a --set optimizer.learning_rate=1e-2":
        (FAST, ["finished step 2 of 2"]),
    "kanana-jax params experiments/pretrain.py:size=kanana2_30b_a3b": ([], ["total 30", "active 3"]),
    "kanana-jax sweep experiments/pretrain.py:size=tiny --workdir runs/lr_sweep": (["--dry-run"], ["learning_rate"]),
    "kanana-jax eval runs/pretrain_tiny --suite math,code,ifeval,tools --limit 8":
        (["--limit", "1", "--max-new-tokens", "2", "--max-turns", "1"], ["[4/4] tools: accuracy", "conf:"]),
    "kanana-jax convert orbax-to-hf runs/pretrain_tiny runs/pretrain_tiny_hf": ([], ["exported step 2"]),
    "kanana-jax convert hf-to-orbax runs/pretrain_tiny_hf experiments/pretrain.py:size=tiny --workdir runs/from_hf":
        ([], ["continue training with"]),
    "python -m launch.compile_aot --config experiments/pod.py:model=30b_a3b": (["--dry-run"], ['"dry_run": true']),
    "python -m launch.tpu --config experiments/pod.py:model=30b_a3b --zone us-east5-a --project P --workdir "
    "gs://b/run --repo https://github.com/ORG/kanana_jax.git": ([], ["gcloud compute tpus tpu-vm create"]),
    "kanana-jax run experiments/pipeline.py:size=tiny --workdir runs/pipeline_tiny": ("pipeline", []),
}


def readme_commands() -> list[str]:
    """The commands of README.md's ```bash blocks: comments dropped, backslash continuations joined."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def test_every_readme_command_is_covered_and_the_test_command_is_what_ci_runs():
    commands = readme_commands()
    assert commands == list(HOW), "README commands changed: update HOW in tests/test_readme.py"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert "launch/local.sh python -m pytest -n 2 -q tests" in ci


def _argv(command: str, runs: str) -> list[str]:
    argv = shlex.split(command.replace("runs/", runs + "/"))
    if argv[0] == "launch/local.sh":          # this test already runs inside the venv local.sh makes
        argv = argv[1:]
    if argv[0] == "kanana-jax":
        return [sys.executable, "-m", "kanana_jax.cli", *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    raise AssertionError(f"cannot run {command!r}")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("readme")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "KANANA_DEBUG", "KANANA_LAUNCHER")}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    out = {}
    for command, (extra, _) in HOW.items():
        if extra in ("ci", "pipeline"):
            continue
        proc = subprocess.run(_argv(command, str(base / "runs")) + extra, cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        out[command] = proc
    out["tiny aot compile"] = subprocess.run([sys.executable, "-m", "launch.compile_aot", *TINY_AOT], cwd=ROOT,
                                             env=env, capture_output=True, text=True, timeout=600)
    return out


@pytest.mark.parametrize("command", [c for c, (extra, _) in HOW.items() if extra not in ("ci", "pipeline")])
def test_readme_command_runs(outputs, command):
    proc, (_, expected) = outputs[command], HOW[command]
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    for text in expected:
        assert text in proc.stdout, f"{command}: {text!r} not in\n{proc.stdout[-2000:]}"
    assert "Traceback" not in proc.stderr and "E0000" not in proc.stderr, proc.stderr[-3000:]


def test_the_readme_compile_command_compiles_a_tiny_config_for_a_tpu(outputs):
    """The compile path of `launch.compile_aot` (the README's 30B command only checks its layout here)."""
    proc = outputs["tiny aot compile"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"fits": true' in proc.stdout and '"topology": "v5p-8"' in proc.stdout


def test_the_readme_pipeline_builds_every_stage(tmp_path):
    from kanana_jax.cli import build_config
    from kanana_jax.train.stages.pipeline import stage_configs
    command = next(c for c, (extra, _) in HOW.items() if extra == "pipeline")
    _, cfg = build_config(shlex.split(command)[2], [])
    stages = stage_configs(cfg, str(tmp_path))
    assert [sub.train.stage for _, _, sub in stages] == ["pretrain", "midtrain", "sft", "reward_model",
                                                         "rejection_sampling", "rl", "calibration"]
