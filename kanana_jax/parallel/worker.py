"""The per-host entry point on a pod: start the distributed runtime, then train a config.

    python -m kanana_jax.parallel.worker experiments/pod.py:model=30b_a3b --workdir gs://bucket/run

Every host runs this same command (launch/tpu.py generates it); `jax.distributed.initialize()` runs first,
before any other JAX call, then the one training loop (`kanana_jax.train.loop.run`).
"""
from __future__ import annotations

import argparse
import json
import logging


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kanana_jax.parallel.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="experiment config: path.py[:key=value,...]")
    parser.add_argument("--workdir", required=True, help="shared directory (e.g. gs://...) for checkpoints/metrics")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from kanana_jax.parallel import multihost
    info = multihost.initialize()
    from kanana_jax.cli import build_config
    from kanana_jax.train import loop
    _, cfg = build_config(args.config, args.set)
    multihost.check_batch_divides(cfg.data.global_batch_size, info["process_count"])
    row = loop.run(cfg, args.workdir)
    if info["process_index"] == 0:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
