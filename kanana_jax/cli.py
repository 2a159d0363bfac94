"""The `kanana-jax` command line: run a config, count parameters (more subcommands register themselves here).

The project's own errors (a bad config key or value, a missing config or data file, a workdir or checkpoint
that cannot be used) print one line, `error: ...`, and exit with status 2; `--debug` (or KANANA_DEBUG=1) shows
the traceback instead.
"""
from __future__ import annotations

import argparse
import difflib
import glob
import importlib
import importlib.util
import logging
import os
import shlex
import shutil
import sys
import time

COMMANDS = {}


def command(name: str, help: str):
    """Registers `fn(args)` as a subcommand; `fn.add_arguments(parser)` declares its flags."""
    def wrap(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return wrap


# --- config loading --------------------------------------------------------------------------------------------

def _config_error(message: str):
    from kanana_jax.config import ConfigError
    return ConfigError(message)


def _nearest_config(path: str) -> str:
    """' Did you mean 'experiments/pretrain.py'?' for the closest existing config file, else ''."""
    folder = os.path.dirname(path) or "."
    candidates = glob.glob(os.path.join(folder, "*.py")) if os.path.isdir(folder) else glob.glob("experiments/*.py")
    candidates = [os.path.normpath(c) for c in candidates if not os.path.basename(c).startswith("_")]
    close = difflib.get_close_matches(os.path.normpath(path), candidates, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def load_config_module(path_or_module: str):
    """Imports an experiment config from a file path ('experiments/pretrain.py', or without '.py') or a module
    name ('experiments.pretrain'); a ConfigError names a missing one and the nearest existing file."""
    path = path_or_module
    if not path.endswith(".py") and (os.sep in path or "/" in path):
        if not os.path.isfile(path + ".py"):
            raise _config_error(f"config {path!r} does not exist; give a config file (path.py) or a module name "
                                f"(experiments.pretrain).{_nearest_config(path + '.py')}")
        path += ".py"
    if path.endswith(".py"):
        if not os.path.isfile(path):
            raise _config_error(f"config file {path!r} does not exist.{_nearest_config(path)}")
        root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        if root not in sys.path:
            sys.path.insert(0, root)
        package = os.path.basename(os.path.dirname(os.path.abspath(path)))
        name = os.path.splitext(os.path.basename(path))[0]
        try:
            return importlib.import_module(f"{package}.{name}")
        except ImportError:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as e:
        if e.name and path.startswith(e.name):
            hint = _nearest_config(path.replace(".", "/") + ".py")
            raise _config_error(f"config {path!r} is neither a file nor an importable module.{hint}") from None
        raise


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise _config_error(f"--set expects dotted.key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = value
    return out


def build_config(spec: str, overrides: list[str] | None = None):
    """'experiments/pretrain.py:size=tiny' (+ --set overrides) -> (ConfigDict, validated ExperimentConfig)."""
    from kanana_jax import config as config_lib
    path, _, arg = spec.partition(":")
    module = load_config_module(path)
    try:
        config_dict = module.get_config(arg or None)
    except config_lib.ConfigError:
        raise
    except (ValueError, KeyError) as e:  # a config module rejecting its argument (size=huge, model=...)
        raise config_lib.ConfigError(f"config {spec!r}: {e}") from e
    config_lib.apply_overrides(config_dict, parse_overrides(overrides))
    return config_dict, config_lib.load(config_dict)


def add_config_arguments(parser):
    parser.add_argument("config", help="experiment config: path.py[:key=value,...] or a module name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any declared config key, e.g. --set optimizer.learning_rate=1e-3")


# --- run -------------------------------------------------------------------------------------------------------

def program() -> str:
    """How to invoke this command line again from the user's shell ('launch/local.sh kanana-jax' when
    launch/local.sh started it)."""
    return f"{os.environ['KANANA_LAUNCHER']} kanana-jax" if os.environ.get("KANANA_LAUNCHER") else "kanana-jax"


def run_command_line(args, *extra_sets: str) -> str:
    sets = [*args.set, *extra_sets]
    return " ".join([program(), "run", shlex.quote(args.config), "--workdir", shlex.quote(args.workdir),
                     *(f"--set {shlex.quote(s)}" for s in sets)])


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def run_summary(cfg, args, row: dict, seconds: float) -> str:
    """The closing lines of `kanana-jax run`: what happened, the final losses, where everything went, what next."""
    from kanana_jax.train import run_record
    workdir = args.workdir
    losses = ", ".join(f"{k} {row[k]:.4g}" for k in ("loss", "eval_loss") if isinstance(row.get(k), float))
    losses = f": {losses}" if losses else ""
    total = cfg.train.steps
    if "already_finished_at_step" in row:
        head = f"already finished at step {row['already_finished_at_step']} of {total}{losses}"
    elif "preempted_at_step" in row:
        head = (f"stopped at step {row['preempted_at_step']} of {total} ({row.get('preempted_by', 'preempted')}) "
                f"after {_duration(seconds)}{losses}")
    else:
        head = f"finished step {row.get('step', total)} of {total} in {_duration(seconds)}{losses}"
    steps = run_record.committed_steps(workdir)
    lines = [head]
    if steps:
        lines.append(f"  checkpoints   {os.path.join(workdir, 'checkpoints')} (steps {', '.join(map(str, steps))})")
    lines.append(f"  metrics       {os.path.join(workdir, 'metrics.jsonl')}")
    if cfg.train.tensorboard:
        hint = "" if importlib.util.find_spec("tensorboard") else "   (viewer: pip install -e '.[viz]')"
        lines.append(f"  tensorboard   tensorboard --logdir {os.path.join(workdir, 'tensorboard')}{hint}")
    if "preempted_at_step" in row:
        lines.append(f"  resume        {run_command_line(args)}")
    elif steps:
        lines.append(f"  evaluate      {program()} eval {shlex.quote(workdir)} --limit 8")
        lines.append(f"  train longer  {run_command_line(args, f'train.steps={2 * total}')}")
    return "\n".join(lines)


DRIVER_OUTPUTS = ("eval_table.md", "eval_table.png", "rounds.jsonl", "calibration_eval.json", "reliability.png")


def driver_summary(cfg, args, row: dict, seconds: float) -> str:
    """The closing lines of a driver run (a pipeline, rejection-sampling rounds, calibration): where it stopped or
    that it finished, its final policy, its reports (the pipeline's eval table printed), what next."""
    from kanana_jax.train.stages import DRIVERS
    workdir, stage = args.workdir, cfg.train.stage
    if row.get("pipeline_stopped_in") or "preempted_at_step" in row:
        where = f" inside stage {row['pipeline_stopped_in']}" if row.get("pipeline_stopped_in") else ""
        return "\n".join([f"{stage} stopped{where} after {_duration(seconds)}",
                           f"  resume        {run_command_line(args)}"])
    lines = [f"{stage} finished in {_duration(seconds)}"]
    try:
        final = DRIVERS[stage].final_run(cfg, workdir)
    except (FileNotFoundError, ValueError):
        final = None
    if final:
        lines.append(f"  final policy  {final}")
    for name in DRIVER_OUTPUTS:
        if os.path.isfile(os.path.join(workdir, name)):
            lines.append(f"  {name:<13} {os.path.join(workdir, name)}")
    if final:
        lines.append(f"  evaluate      {program()} eval {shlex.quote(final)} --limit 8")
        lines.append(f"  next stage    --set train.init_from={shlex.quote(workdir)}")
    table = os.path.join(workdir, "eval_table.md")
    if os.path.isfile(table):
        with open(table, encoding="utf-8") as f:
            lines.append(f.read().rstrip())
    return "\n".join(lines)


@command("run", "train an experiment config (resumes from the latest checkpoint in --workdir)")
def run_command(args):
    from kanana_jax.train import loop
    _, cfg = build_config(args.config, args.set)
    start = time.perf_counter()
    with _logging_around_progress_bar():
        row = loop.run(cfg, args.workdir)
    from kanana_jax.train.stages import DRIVERS
    summary = driver_summary if cfg.train.stage in DRIVERS else run_summary
    print(summary(cfg, args, row, time.perf_counter() - start))


run_command.add_arguments = lambda p: (add_config_arguments(p), p.add_argument(
    "--workdir", required=True, help="directory for checkpoints, metrics.jsonl and TensorBoard events"))


# --- params ----------------------------------------------------------------------------------------------------

def human_count(n: float) -> str:
    """1320016 -> '1.32M', 30.4e9 -> '30.4B', 960 -> '960' (three significant digits)."""
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g}{unit}" if value < 1000 else f"{value:.0f}{unit}"
    return f"{n:.0f}"


@command("params", "print total and active parameter counts by component")
def params_command(args):
    from kanana_jax.model.flops import count_params
    _, cfg = build_config(args.config, args.set)
    counts = count_params(cfg.model)
    print(f"{'component':<16} {'total':>16} {'active':>16}")
    for name in counts["total"]:
        print(f"{name:<16} {counts['total'][name]:>16,} {counts['active'][name]:>16,}")
    print(f"total {human_count(counts['total']['all'])}, active {human_count(counts['active']['all'])}")


params_command.add_arguments = add_config_arguments


# --- errors, logging, platform ---------------------------------------------------------------------------------

# The project's own errors, whose messages are written for the user (module -> class names). Looked up in
# sys.modules when an error arrives, so that naming them here imports nothing.
USER_ERRORS = {
    "kanana_jax.config": ("ConfigError",),            # also run_record.WorkdirError / ResumeConfigError, layouts
    "kanana_jax.train.checkpoint": ("CheckpointError",),
    "kanana_jax.data.sources": ("BadRecordError",),
    "kanana_jax.data.posttrain_data": ("RecordError",),
    "kanana_jax.convert.hf_config": ("HFConfigError",),
    "kanana_jax.convert.safetensors_io": ("CheckpointError",),
    "kanana_jax.convert.tokenizer_chat": ("ChatTemplateError",),
}
RUN_FAILURES = {"kanana_jax.train.nonfinite": ("NonFiniteError",)}  # a run that stopped itself: exit status 1
FILE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
MAX_ERROR_LINES = 12


def _types(table: dict) -> tuple:
    found = []
    for module, names in table.items():
        if module in sys.modules:
            found += [getattr(sys.modules[module], n) for n in names if hasattr(sys.modules[module], n)]
    return tuple(found)


def error_exit_code(e: BaseException) -> int | None:
    """2 for the project's own user-facing errors and file errors, 1 for a run that stopped itself (non-finite
    loss), None for anything else (a bug: the traceback is shown)."""
    if isinstance(e, _types(USER_ERRORS)) or isinstance(e, FILE_ERRORS):
        return 2
    if isinstance(e, _types(RUN_FAILURES)):
        return 1
    return None


def format_error(e: BaseException) -> str:
    """'error: <message>', long messages (per-parameter diffs) cut to MAX_ERROR_LINES lines."""
    text = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.strerror and e.filename:   # '[Errno 2] No such file...' -> 'PATH: No such...'
        text = f"{e.filename}: {e.strerror}"
    lines = text.splitlines()
    if len(lines) > MAX_ERROR_LINES:
        lines = lines[:MAX_ERROR_LINES] + [f"... ({len(lines) - MAX_ERROR_LINES} more lines; --debug shows all)"]
    return "error: " + "\n".join(lines)


class _Formatter(logging.Formatter):
    """INFO lines as they are ('resumed from ...'); warnings and errors prefixed with their level."""

    def format(self, record):
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def configure_logging():
    """Warnings of every library, INFO of kanana_jax (resumes, compile time), on stderr; a process that already
    configured logging (a notebook, pytest) keeps its handlers."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    logging.getLogger("kanana_jax").setLevel(logging.INFO)


def _logging_around_progress_bar():
    """Log lines printed above the progress bar (tqdm.write) instead of through it, where they go to the terminal."""
    import contextlib

    from tqdm.contrib.logging import logging_redirect_tqdm
    if not any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
               for h in logging.getLogger().handlers):
        return contextlib.nullcontext()
    return logging_redirect_tqdm(loggers=[logging.getLogger()])


def has_accelerator() -> bool:
    """A TPU (/dev/accel*, /dev/vfio/*) or an NVIDIA GPU (nvidia-smi) on this machine."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")) or shutil.which("nvidia-smi") is not None


# XLA:CPU compiles with LLVM's cheaper pass pipeline: measured on the tiny configs, train steps compile 11-22%
# faster (12.8 -> 11.4 s scanned, 10.0 -> 7.8 s unscanned), run no slower, and give bit-identical losses and
# params (pretrain with AdamW, SFT with Muon, 3 steps). GPU compiles also go through LLVM, so CPU runs only.
CPU_XLA_FLAGS = ("--xla_llvm_disable_expensive_passes=true",)


def default_platform(environ=os.environ) -> None:
    """JAX_PLATFORMS=cpu on a machine without an accelerator (unless set): libtpu, when installed, would
    otherwise probe for a TPU and print errors; on the CPU alone, CPU_XLA_FLAGS join XLA_FLAGS (a flag the user
    set stays as set). Call before jax starts its backends."""
    if "JAX_PLATFORMS" not in environ and "jax" not in sys.modules and not has_accelerator():
        environ["JAX_PLATFORMS"] = "cpu"
    if environ.get("JAX_PLATFORMS") == "cpu":
        environ["XLA_FLAGS"] = with_cpu_flags(environ.get("XLA_FLAGS", ""))


def with_cpu_flags(xla_flags: str) -> str:
    """`xla_flags` plus each of CPU_XLA_FLAGS whose flag it does not set."""
    have = {f.split("=", 1)[0] for f in xla_flags.split()}
    return " ".join([xla_flags] * bool(xla_flags) + [f for f in CPU_XLA_FLAGS if f.split("=", 1)[0] not in have])


def _register_optional_commands():
    """Subcommands that live in other modules (convert, eval, sweep) register on import."""
    for module in ("kanana_jax.convert.cli", "kanana_jax.evals.cli", "kanana_jax.sweeps.cli",
                   "kanana_jax.train.merge_cli"):
        if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None:
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def main(argv=None):
    default_platform()
    configure_logging()
    _register_optional_commands()
    parser = argparse.ArgumentParser(prog="kanana-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors (or KANANA_DEBUG=1)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        fn.add_arguments(p)
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("KANANA_DEBUG", "") not in ("", "0")
    try:
        args.fn(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted (a second Ctrl-C): no checkpoint was saved for the steps since the last one; "
              "relaunch the same command to resume from it", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        code = error_exit_code(e)
        if code is None or debug:
            raise
        print(format_error(e), file=sys.stderr)
        raise SystemExit(code) from None


if __name__ == "__main__":
    # Run through the importable module so that subcommands registering on `kanana_jax.cli` are seen.
    from kanana_jax.cli import main as _main
    _main()
