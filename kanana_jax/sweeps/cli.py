"""`kanana-jax sweep CONFIG --workdir DIR [--runner local|subprocess|tpu] [--dry-run]`: run a config's sweep()."""
from __future__ import annotations

import shlex

from kanana_jax.cli import add_config_arguments, command, parse_overrides

RUNNERS = ("local", "subprocess", "tpu")  # kanana_jax.sweeps.runner.RUNNERS, without importing pandas here
SUMMARY_COLUMNS = ("step", "loss", "eval_loss", "seconds")


@command("sweep", "run every point of an experiment config's sweep() and print the results table")
def sweep_command(args):
    import pandas as pd

    from kanana_jax.sweeps import runner as runner_lib
    table = runner_lib.run(args.config, None, args.workdir, args.runner, overrides=parse_overrides(args.set),
                           dry_run=args.dry_run, fail_fast=args.fail_fast, parallel=args.parallel,
                           launcher_args=shlex.split(args.launcher_args))
    if args.dry_run or args.runner == "tpu":
        return
    shown = [c for c in table.columns if c in ("point", "status", *table.attrs["override_columns"],
                                                   *SUMMARY_COLUMNS)]
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.max_colwidth", 60):
        print(table[shown].to_string(index=False))
    failed = table[table["status"] == "failed"]
    for _, row in failed.iterrows():
        print(f"\nFAILED {row['point']}: {row['error']}")
    if len(failed):
        raise SystemExit(f"{len(failed)} of {len(table)} sweep points failed")


def _add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--workdir", required=True, help="sweep directory: one sub-directory per point")
    parser.add_argument("--runner", choices=RUNNERS, default="local",
                        help="local: in this process; subprocess: one `kanana-jax run` per point; "
                             "tpu: hand each point to the pod launcher (launch/tpu.py)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate every point and print the commands that would run, running nothing")
    parser.add_argument("--parallel", type=int, default=1, help="subprocess runner: points run at once")
    parser.add_argument("--launcher-args", default="", metavar="FLAGS",
                        help="tpu runner: flags for `python -m launch.tpu`, given with '=', e.g. "
                             "--launcher-args=\"--zone us-east5-a --mode xpk --cluster c1\"")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed point")


sweep_command.add_arguments = _add_arguments
