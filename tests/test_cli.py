"""The command line a new user meets, in process: user errors are one `error: ...` line with exit status 2 (the
traceback only with --debug or KANANA_DEBUG=1), config files are found with or without '.py' (or the nearest one
is suggested), --workdir problems name --workdir, parameter counts print in human units."""
import os

import pytest

from kanana_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("KANANA_DEBUG", raising=False)


def _fails(argv, capsys, code=2):
    """The stderr of `kanana-jax ARGV`, which must exit with `code` and print exactly one `error:` line."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["params", "experiments/pretrain.py", "--set", "optimizer.learning_rat=1"],
     "unknown config key 'optimizer.learning_rat'. Did you mean 'optimizer.learning_rate'?"),
    (["params", "experiments/pretrain.py", "--set", "optimizer.name=adam"],
     "config key 'optimizer.name': 'adam' is not allowed; allowed values: 'adamw', 'muon' (did you mean 'adamw'?)"),
    (["params", "experiments/pretrain.py", "--set", "train.steps=many"],
     "config key 'train.steps': expected an int, got 'many'"),
    (["params", "experiments/pretrain.py:stpes=3"], "unknown config argument 'stpes'"),
    (["params", "experiments/pretrain.py:size=huge"], "unknown size 'huge'; allowed sizes: tiny"),
    (["params", "experiments/pretrian.py"],
     "config file 'experiments/pretrian.py' does not exist. Did you mean 'experiments/pretrain.py'?"),
    (["params", "experiments/pretrian"], "Did you mean 'experiments/pretrain.py'?"),
    (["params", "experiments.pretrian"], "is neither a file nor an importable module"),
    (["params", "experiments/pretrain.py", "--set", "train.steps"], "--set expects dotted.key=value"),
])
def test_user_errors_are_one_line_with_exit_status_2(argv, message, capsys):
    assert message in _fails(argv, capsys)


def test_debug_flag_and_env_var_show_the_traceback(capsys, monkeypatch):
    from kanana_jax.config import ConfigError
    for argv in (["--debug", "params", "experiments/pretrian.py"], ["params", "experiments/pretrian.py", "--debug"]):
        with pytest.raises(ConfigError, match="Did you mean 'experiments/pretrain.py'"):
            cli.main(argv)
    monkeypatch.setenv("KANANA_DEBUG", "1")
    with pytest.raises(ConfigError):
        cli.main(["params", "experiments/pretrian.py"])


def test_config_without_py_and_params_in_human_units(capsys):
    cli.main(["params", "experiments/pretrain:size=tiny"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == "total 1.32M, active 730K"
    assert [cli.human_count(n) for n in (960, 1_320_016, 730_192, 3.0e9, 30_412_000_000, 155e9)] == \
        ["960", "1.32M", "730K", "3B", "30.4B", "155B"]


def test_workdir_problems_name_the_workdir(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    spec = "experiments/pretrain.py:size=tiny,steps=2"
    err = _fails(["run", spec, "--workdir", str(afile)], capsys)
    assert f"--workdir {afile} is a file, not a directory" in err
    err = _fails(["run", spec, "--workdir", str(afile / "sub")], capsys)
    assert f"--workdir {afile / 'sub'}: {afile} is a file" in err


def test_file_and_checkpoint_errors_are_user_errors_but_bugs_keep_their_traceback(capsys):
    from kanana_jax.train.checkpoint import CheckpointError
    assert cli.error_exit_code(FileNotFoundError(2, "No such file or directory", "data/x.jsonl")) == 2
    assert cli.format_error(FileNotFoundError(2, "No such file or directory", "data/x.jsonl")) == \
        "error: data/x.jsonl: No such file or directory"
    long = CheckpointError(4, "/w/checkpoints/4", "mismatch:\n" + "\n".join(f"  leaf {i}" for i in range(40)))
    assert cli.error_exit_code(long) == 2
    lines = cli.format_error(long).splitlines()
    assert len(lines) == cli.MAX_ERROR_LINES + 1 and "29 more lines; --debug shows all" in lines[-1]
    assert cli.error_exit_code(ZeroDivisionError()) is None and cli.error_exit_code(ValueError("x")) is None


def test_a_second_ctrl_c_is_one_line_and_exit_status_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli.COMMANDS, "params", (interrupted, "x"))
    interrupted.add_arguments = cli.add_config_arguments
    with pytest.raises(SystemExit) as e:
        cli.main(["params", "experiments/pretrain.py"])
    assert e.value.code == 130
    assert capsys.readouterr().err.startswith("error: interrupted (a second Ctrl-C)")


def test_no_accelerator_means_cpu_unless_jax_platforms_is_set_and_cpu_gets_its_compile_flags(monkeypatch):
    monkeypatch.setattr(cli, "has_accelerator", lambda: False)
    monkeypatch.delitem(cli.sys.modules, "jax", raising=False)   # (restored by monkeypatch)
    env = {}
    cli.default_platform(env)
    assert env == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_llvm_disable_expensive_passes=true"}
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}   # kept, flag added
    cli.default_platform(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --xla_llvm_disable_expensive_passes=true"
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_llvm_disable_expensive_passes=false"}  # the user's choice
    cli.default_platform(env)
    assert env["XLA_FLAGS"] == "--xla_llvm_disable_expensive_passes=false"
    env = {"JAX_PLATFORMS": "tpu"}
    cli.default_platform(env)
    assert env == {"JAX_PLATFORMS": "tpu"}
    monkeypatch.setattr(cli, "has_accelerator", lambda: True)
    env = {}
    cli.default_platform(env)
    assert env == {}


def test_which_config_changes_make_a_checkpoint_unusable():
    from kanana_jax.train.run_record import is_blocking
    for key in ("model.d_model", "model.param_dtype", "model.scan_layers", "model.rope_theta", "optimizer.name",
                "optimizer.partition_rules", "train.stage", "train.seed", "data.seq_len", "data.tokenizer",
                "data.mixture", "sft.buckets", "dpo.pairs"):
        assert is_blocking(key), key
    for key in ("train.steps", "optimizer.learning_rate", "optimizer.schedule", "optimizer.warmup_steps",
                "train.eval_every", "train.log_every", "train.checkpoint_every", "train.init_from", "mesh.fsdp",
                "mesh.rules", "model.remat_policy", "model.moe_impl", "model.dtype", "data.global_batch_size",
                "data.eval_sources", "dpo.beta"):
        assert not is_blocking(key), key
