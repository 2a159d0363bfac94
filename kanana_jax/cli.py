"""The `kanana-jax` command line: run a config, count parameters (more subcommands register themselves here)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys

COMMANDS = {}


def command(name: str, help: str):
    """Registers `fn(args)` as a subcommand; `fn.add_arguments(parser)` declares its flags."""
    def wrap(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return wrap


def load_config_module(path_or_module: str):
    """Imports an experiment config from a file path ('experiments/pretrain.py') or a module name."""
    if path_or_module.endswith(".py"):
        if not os.path.exists(path_or_module):
            raise FileNotFoundError(f"config file {path_or_module!r} does not exist")
        root = os.path.dirname(os.path.dirname(os.path.abspath(path_or_module)))
        if root not in sys.path:
            sys.path.insert(0, root)
        package = os.path.basename(os.path.dirname(os.path.abspath(path_or_module)))
        name = os.path.splitext(os.path.basename(path_or_module))[0]
        try:
            return importlib.import_module(f"{package}.{name}")
        except ImportError:
            spec = importlib.util.spec_from_file_location(name, path_or_module)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    return importlib.import_module(path_or_module)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set expects dotted.key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = value
    return out


def build_config(spec: str, overrides: list[str] | None = None):
    """'experiments/pretrain.py:size=tiny' (+ --set overrides) -> (ConfigDict, validated ExperimentConfig)."""
    from kanana_jax import config as config_lib
    path, _, arg = spec.partition(":")
    module = load_config_module(path)
    config_dict = module.get_config(arg or None)
    config_lib.apply_overrides(config_dict, parse_overrides(overrides))
    return config_dict, config_lib.load(config_dict)


def add_config_arguments(parser):
    parser.add_argument("config", help="experiment config: path.py[:key=value,...] or a module name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any declared config key, e.g. --set optimizer.learning_rate=1e-3")


@command("run", "train an experiment config (resumes from the latest checkpoint in --workdir)")
def run_command(args):
    from kanana_jax.train import loop
    _, cfg = build_config(args.config, args.set)
    row = loop.run(cfg, args.workdir)
    print(json.dumps(row))


run_command.add_arguments = lambda p: (add_config_arguments(p), p.add_argument(
    "--workdir", required=True, help="directory for checkpoints, metrics.jsonl and TensorBoard events"))


@command("params", "print total and active parameter counts by component")
def params_command(args):
    from kanana_jax.model.flops import count_params
    _, cfg = build_config(args.config, args.set)
    counts = count_params(cfg.model)
    print(f"{'component':<16} {'total':>16} {'active':>16}")
    for name in counts["total"]:
        print(f"{name:<16} {counts['total'][name]:>16,} {counts['active'][name]:>16,}")
    print(f"total {counts['total']['all'] / 1e9:.2f}B, active {counts['active']['all'] / 1e9:.2f}B")


params_command.add_arguments = add_config_arguments


def _register_optional_commands():
    """Subcommands that live in other modules (convert, eval, sweep) register on import."""
    for module in ("kanana_jax.convert.cli", "kanana_jax.evals.cli", "kanana_jax.sweeps.cli"):
        if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None:
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _register_optional_commands()
    parser = argparse.ArgumentParser(prog="kanana-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        fn.add_arguments(p)
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    # Run through the importable module so that subcommands registering on `kanana_jax.cli` are seen.
    from kanana_jax.cli import main as _main
    _main()
