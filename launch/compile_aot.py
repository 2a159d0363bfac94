"""Compile the real train step ahead of time for a Cloud TPU slice, on a CPU-only machine with libtpu installed.

    python -m launch.compile_aot --config experiments/pod.py:model=30b_a3b      # v5p-128, the pod layout

Builds the same trainer the training loop uses (`build_trainer(cfg, devices=<the slice's compile-only TPU
devices>)`: the stage's model, optimizer, post-update rules, mesh, shardings), lowers `train_step` on abstract
arguments (the sharded train state, the stage's extra state included, and one global batch with the fields and
shapes of the stage's `batch_spec`) and compiles it with the TPU compiler. Any stage (`train.stage`) works. Prints ONE JSON object:
per-chip bytes (argument / output / alias / temp / generated code; total = argument + output - alias + temp +
code), the chip's HBM, `fits`, compile seconds, and FLOPs per step per chip from the compiled cost analysis next
to the model's analytic FLOPs (XLA's cost analysis counts a scanned layer stack's body once, so with
scan_layers=True it is far below the real count; the analytic figure covers every layer) and the step time that
the analytic FLOPs would take at the chip's bf16 peak. Exit code 1 when the step does not fit (the JSON then
carries the compiler's message), 2 (message on stderr) when the layout cannot exist on the slice (mesh sizes,
a global batch that does not split over the batch axes).

`--dry-run` stops after the layout check (mesh sizes, batch split), in seconds: exit 0 if the layout exists.

Environment: this sets JAX_PLATFORMS=cpu (no TPU is needed or used), ALLOW_MULTIPLE_LIBTPU_LOAD=1 (libtpu
otherwise refuses to load while another process on the machine holds its lock file), and TPU_WORKER_HOSTNAMES /
TPU_ACCELERATOR_TYPE (localhost, the slice; libtpu otherwise prints errors about them) unless they are already set.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


POD_HINT = ("hint: experiments/pod.py lays the Kanana-2 sizes out per TPU slice (mesh, global batch, sequence "
            "length, remat; SCALING.md), e.g. python -m launch.compile_aot --config experiments/pod.py:model=30b_a3b "
            "(v5p-128) or experiments/pod.py:model=30b_a3b,slice=v5p-16")


def prepare_environment(environ=os.environ) -> None:
    """Env vars that let libtpu describe a topology on a machine without TPUs; call before importing jax."""
    environ.setdefault("JAX_PLATFORMS", "cpu")
    environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # else libtpu logs INVALID_ARGUMENT errors at load
    environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    out = {"argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
           "alias": int(ma.alias_size_in_bytes), "temp": int(ma.temp_size_in_bytes),
           "generated_code": int(ma.generated_code_size_in_bytes)}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    value = (cost or {}).get("flops")
    return float(value) if value is not None else None


# libtpu 0.0.48: "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries
# (2.09T) exceeds available HBM (95.73G)"; older messages: "Used 842.77G of 95.73G hbm".
_OOM = (re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)", re.IGNORECASE),
        re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", re.IGNORECASE))
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_oom(message: str) -> dict | None:
    """{'used', 'capacity'} bytes from the TPU compiler's out-of-HBM error, or None if it is another error."""
    for pattern in _OOM:
        m = pattern.search(message)
        if m:
            return {"used": int(float(m.group(1)) * _UNITS[m.group(2).upper()]),
                    "capacity": int(float(m.group(3)) * _UNITS[m.group(4).upper()])}
    return None


def compile_for_topology(cfg, slice_, compile: bool = True) -> dict:
    """Lowers and compiles `cfg`'s train step for `slice_`; returns the report (see the module docstring).
    `compile=False` only builds the trainer on the slice's devices and checks the layout (mesh, batch split)."""
    from kanana_jax.sharding import check_batch_divides
    from kanana_jax.train.builder import build_trainer
    from launch.topologies import topology_devices

    devices = topology_devices(slice_)
    trainer = build_trainer(cfg, devices=devices)
    check_batch_divides(trainer.batch_rows, trainer.mesh, trainer.rules, cfg.train.grad_accum_steps)
    chips = len(devices)
    report = {"stage": cfg.train.stage, "topology": slice_.name, "num_slices": slice_.num_slices, "chips": chips,
              "device_kind": devices[0].device_kind, "mesh": {k: int(v) for k, v in trainer.mesh.shape.items()},
              "rules": cfg.mesh.rules, "global_batch": cfg.data.global_batch_size, "seq_len": cfg.data.seq_len,
              "remat": cfg.model.remat_policy, "optimizer": cfg.optimizer.name, "moe_impl": cfg.model.moe_impl,
              "expert_parallel": cfg.model.expert_parallel, "hbm_per_chip": slice_.generation.hbm_bytes,
              "batch_fields": {k: list(f.shape) for k, f in trainer.batch_spec.items()},
              "model_flops_per_step_per_chip": trainer.stage.flops_per_step(cfg) / chips}
    if not compile:
        report.update(fits=None, dry_run=True, note="layout checked (mesh sizes, batch split over the batch axes); "
                      "nothing lowered or compiled: run without --dry-run for memory and FLOPs")
        return report
    start = time.perf_counter()
    with trainer.context():
        state = trainer.abstract_state()
        lowered = trainer.train_step.lower(state, trainer.abstract_batch())
        try:
            compiled = lowered.compile()
        except Exception as e:  # the TPU compiler reports HBM overflow as an error
            oom = parse_oom(str(e))
            if oom is None:
                raise
            report.update(fits=False, compile_seconds=round(time.perf_counter() - start, 1),
                          per_chip_bytes={"total": oom["used"]}, hbm_reported_by_compiler=oom["capacity"],
                          error=str(e).strip().splitlines()[0][:500])
            return report
    report["compile_seconds"] = round(time.perf_counter() - start, 1)
    report["per_chip_bytes"] = _memory(compiled)
    report["fits"] = report["per_chip_bytes"]["total"] <= slice_.generation.hbm_bytes
    report["flops_per_step_per_chip"] = _flops(compiled)
    report["flops_note"] = ("flops_per_step_per_chip is XLA's cost analysis, which counts the body of each scanned "
                            "layer stack once; model_flops_per_step_per_chip is the analytic count (all layers)")
    report["step_seconds_at_peak"] = report["model_flops_per_step_per_chip"] / slice_.generation.peak_bf16_flops
    return report


def main(argv=None) -> int:
    prepare_environment()
    parser = argparse.ArgumentParser(prog="python -m launch.compile_aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment config: path.py[:key=value,...]")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--topology", help="TPU slice, e.g. v5p-128, v5litepod-16, v6e-256, v4-32 (default: the "
                        "config module's topology(arg), if it defines one)")
    parser.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (multi-slice)")
    parser.add_argument("--dry-run", action="store_true", help="check the layout on the slice (mesh, batch split) "
                        "without lowering or compiling (seconds instead of minutes); exit 0 if it exists")
    args = parser.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from kanana_jax.cli import build_config
    from launch.topologies import resolve
    try:  # a bad config, or a layout that cannot exist on this slice (mesh sizes, batch split): ValueErrors
        slice_ = resolve(args.config, args.topology, args.num_slices)
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", slice_.name)  # (before jax starts) libtpu asks, else warns
        _, cfg = build_config(args.config, args.set)
        report = {"config": args.config, "overrides": args.set,
                  **compile_for_topology(cfg, slice_, compile=not args.dry_run)}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        if "mesh" in str(e) or "batch" in str(e):
            print(POD_HINT, file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0 if report["fits"] or args.dry_run else 1


if __name__ == "__main__":
    sys.exit(main())
