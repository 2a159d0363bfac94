"""`kanana-jax merge RUN RUN ... --weights w,w,... --out DIR`: a run whose params are the weighted average."""
from __future__ import annotations

import json

from kanana_jax.cli import command


@command("merge", "average the policy parameters of runs (same model) into a new run directory")
def merge_command(args):
    from kanana_jax.train.merge import merge_workdirs
    weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0 / len(args.runs)] * len(args.runs)
    provenance = merge_workdirs(args.runs, weights, args.out)
    print(json.dumps(provenance))


def _add_arguments(parser):
    parser.add_argument("runs", nargs="+", help="run directories (their newest checkpoints are merged)")
    parser.add_argument("--weights", default="", help="comma-separated weights, one per run (default: equal)")
    parser.add_argument("--out", required=True, help="the new run directory (must hold no checkpoints)")


merge_command.add_arguments = _add_arguments
