"""Rejection-sampling throughput (tiny model, CPU by default): the sampler's samples/s and the real environments'
verifications/s, with verification overlapped with sampling (a thread verifies chunk i while chunk i+1 samples)
and without.

    python benchmarks/rejection_sampling.py --out benchmarks/results            # CPU, a few minutes

For each prompt set (arith: the math checker; code: the tests in the sandbox, one process per sample) one
round's sampling phase runs through the driver (train/stages/rejection_sampling.py, stopped before its SFT) from
the same params and keys, first once to compile, then with overlap off and on: the samples are the same, only
the wall time differs. samples/s = samples / time in the sampler; verifications/s = samples / time in verify();
wall = the phase's wall time; saved = sampler + verify - wall. Prints a table and writes rejection_sampling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# prompt spec, max_new_tokens. code_ref: the sampler runs as for code, then each completion is replaced by the
# prompt's reference solution, so that every sample runs its tests in a sandbox process (a tiny model's code is
# a syntax error, refused before any process starts): the verification load of a policy that writes real programs.
SETS = {"arith": ("prompts:arith", 12), "code": ("prompts:code", 64), "code_ref": ("prompts:code", 64)}


class _Stop(Exception):
    pass


def _stop_before_sft(event, **info):
    if event == "kept":
        raise _Stop()


def phase(name: str, overlap: bool, a, workdir: str) -> dict:
    """One sampling phase of `name`'s prompts; its sampling metrics."""
    from kanana_jax.cli import build_config
    from kanana_jax.train.stages import rejection_sampling as driver
    spec, max_new = SETS[name]
    _, cfg = build_config(f"experiments/rejection_sampling.py:size=tiny,rounds=1,k={a.k},chunk={a.chunk},"
                          f"prompts_per_round={a.prompts},heldout=0,max_new_tokens={max_new},"
                          f"init_from={a.init_from}",
                          [f"model.n_layers={a.layers}", f"rejection_sampling.prompts={spec}",
                           f"rejection_sampling.overlap_verify={str(overlap).lower()}",
                           f"rejection_sampling.sandbox_workers={a.workers}"])
    shutil.rmtree(workdir, ignore_errors=True)
    policy = None
    if name == "code_ref":
        from kanana_jax.generate.sampler import SamplingParams
        from kanana_jax.rollout.generate import RolloutGenerator
        from kanana_jax.rollout.prompts import gold_reply
        rs = cfg.rejection_sampling
        generator = RolloutGenerator(cfg, SamplingParams(max_new_tokens=rs.max_new_tokens, temperature=rs.temperature),
                                     batch_size=rs.sample_batch)

        def policy(params, records, k, key):
            generator.generate(params, records, k, key)    # the sampling time, as for 'code'
            return [[gold_reply(r)] * k for r in records]
    try:
        driver.run(cfg, workdir, policy=policy, hook=_stop_before_sft)
    except _Stop:
        pass
    with open(os.path.join(workdir, "round_0", "progress.json")) as f:
        return json.load(f)["sampling"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="")
    p.add_argument("--sets", default="arith,code,code_ref")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--chunk", type=int, default=8, help="prompts per chunk (chunk*k sampler rows per call)")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--workers", type=int, default=0, help="parallel sandboxes (0 = one per CPU)")
    p.add_argument("--init-from", default="", help="policy (a run's workdir); '' = fresh init")
    a = p.parse_args(argv)
    import jax
    rows, base = [], tempfile.mkdtemp(prefix="rs_bench_")
    for name in a.sets.split(","):
        phase(name, True, a, os.path.join(base, "compile"))
        for overlap in (False, True):
            m = phase(name, overlap, a, os.path.join(base, f"{name}_{overlap}"))
            rows.append({"set": name, "overlap": overlap, "samples": m["samples"], "pass@1": m["pass@1"],
                         **{k: m[k] for k in ("samples_per_s", "verifications_per_s", "tokens_per_s", "sampling_s",
                                              "verify_s", "wall_s", "overlap_saved_s")},
                         "fail_reasons": {k[5:]: v for k, v in m.items() if k.startswith("fail/")}})
    shutil.rmtree(base, ignore_errors=True)
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; tiny model ({a.layers} layers), K={a.k}, {a.chunk * a.k} rows per call")
    print("| prompts | overlap | samples | samples/s | gen tokens/s | verifications/s | sampler s | verify s | "
          "wall s | saved s |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {'on' if r['overlap'] else 'off'} | {r['samples']} | {r['samples_per_s']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {r['verifications_per_s']:.0f} | {r['sampling_s']:.2f} | "
              f"{r['verify_s']:.2f} | {r['wall_s']:.2f} | {r['overlap_saved_s']:.2f} |")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "rejection_sampling.json"), "w") as f:
            json.dump({"args": vars(a), "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
                       "load_average": os.getloadavg()[0], "time": time.strftime("%Y-%m-%d %H:%M"), "rows": rows},
                      f, indent=1)
    return rows


if __name__ == "__main__":
    main()
