"""Commands that run an experiment config (or its sweep) on a Cloud TPU slice: printed by default, run with --execute.

    python -m launch.tpu --config experiments/pod.py:model=30b_a3b --project my-proj --zone us-east5-a \
        --workdir gs://my-bucket/runs/30b --repo https://github.com/me/kanana_jax.git --ref main
    python -m launch.tpu ... --mode xpk --cluster my-cluster --num-slices 2     # GKE via xpk (multi-slice)

gcloud mode: create a TPU VM slice, set up every worker (`--worker=all`: uv-installed Python 3.12 venv, clone
and `pip install -e .[tpu,data]`), then start the same run command on every worker; JAX's distributed runtime
joins them (`python -m kanana_jax.parallel.worker`). xpk mode: one `xpk workload create` per run; xpk builds an
image from this checkout (--script-dir) on python:3.12 and the command pip-installs it, then starts the run.
Multi-slice (--num-slices N, xpk) adds mesh.dcn_data=N unless a mesh.dcn_* override is given. The slice
defaults to the config module's `topology(arg)`.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_ENV = ("CLOUDSDK_CORE_PROJECT", "GOOGLE_CLOUD_PROJECT")
CHECKOUT = "~/kanana_jax"
VENV = "~/kanana_venv"


def _name_ok(name: str) -> str:
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", name):
        raise ValueError(f"name {name!r} must be 1-40 lowercase letters, digits or '-', starting with a letter "
                         "(TPU VM and xpk workload names)")
    return name


def default_name(spec: str) -> str:
    """'experiments/pod.py:model=30b_a3b' -> 'kj-pod-30b-a3b' (a valid TPU / workload name)."""
    path, _, arg = spec.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    tail = "-".join(v for _, _, v in (kv.partition("=") for kv in arg.split(",") if kv))
    name = re.sub(r"[^a-z0-9]+", "-", f"kj-{stem}-{tail}".lower()).strip("-")
    return name[:40].rstrip("-")


def run_command(spec: str, overrides: list[str], workdir: str, *, python: str = f"{VENV}/bin/python",
                cd: str | None = CHECKOUT) -> str:
    """The training command every host runs (by default from the checkout, inside the venv)."""
    argv = [python, "-m", "kanana_jax.parallel.worker", spec, "--workdir", workdir]
    for item in overrides:
        argv += ["--set", item]
    text = " ".join(a if a.startswith("~/") else shlex.quote(a) for a in argv)
    return f"cd {cd} && {text}" if cd else text


def setup_command(repo: str, ref: str) -> str:
    """Worker set-up: Python 3.12 venv via uv, the code at `ref`, kanana-jax with TPU and data extras."""
    return " && ".join([
        "(command -v ~/.local/bin/uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)",
        f"(test -d {CHECKOUT} || git clone {shlex.quote(repo)} {CHECKOUT})",
        f"cd {CHECKOUT} && git fetch --all --quiet && git checkout --quiet {shlex.quote(ref)}",
        f"~/.local/bin/uv venv --allow-existing --python 3.12 {VENV}",
        f"~/.local/bin/uv pip install --python {VENV}/bin/python -e '.[tpu,data]'",
    ])


def plan(spec: str, overrides: list[str], *, slice_, project: str, zone: str, workdir: str, name: str,
         repo: str, ref: str, mode: str, cluster: str | None = None, sweep: list[dict] | None = None,
         spot: bool = False) -> list[list[str]]:
    """The commands (argv lists) to run `spec` (+ each sweep point) on `slice_`, in order."""
    gen = slice_.generation
    if slice_.num_slices > 1 and not any(o.startswith("mesh.dcn_") for o in overrides):
        overrides = list(overrides) + [f"mesh.dcn_data={slice_.num_slices}"]  # data parallel across slices
    runs = [(name, workdir, list(overrides))]
    if sweep:
        runs = [(f"{name[:36]}-s{i}", f"{workdir.rstrip('/')}/s{i}", list(overrides) +
                 [f"{k}={v}" for k, v in point.items()]) for i, point in enumerate(sweep)]
    if slice_.hosts * slice_.num_slices > 1 and not workdir.startswith("gs://"):
        raise ValueError(f"{slice_.name} has {slice_.hosts * slice_.num_slices} hosts, which must share the workdir: "
                         f"use a gs:// path, not {workdir!r}")
    if mode == "gcloud":
        if slice_.num_slices > 1:
            raise ValueError("multi-slice runs go through xpk (--mode xpk); gcloud tpu-vm creates one slice")
        where = [f"--project={project}", f"--zone={zone}"]
        create = ["gcloud", "compute", "tpus", "tpu-vm", "create", name, *where,
                  f"--accelerator-type={slice_.name}", f"--version={gen.runtime_version}"]
        create += ["--spot"] if spot else []
        ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, *where, "--worker=all"]
        commands = [create, ssh + [f"--command={setup_command(repo, ref)}"]]
        commands += [ssh + [f"--command={run_command(spec, o, w)}"] for _, w, o in runs]
        return commands
    if mode == "xpk":
        if not cluster:
            raise ValueError("--mode xpk needs --cluster (an xpk/GKE cluster with this TPU type; create one with "
                             "`xpk cluster create --cluster NAME --tpu-type ... --num-slices ...`)")
        # xpk builds an image from --script-dir (this checkout) on the base image; the command runs in it
        setup = "python3 -m pip install --quiet -e '.[tpu,data]'"
        return [["xpk", "workload", "create", f"--cluster={cluster}", f"--project={project}", f"--zone={zone}",
                 f"--workload={_name_ok(run_name)}", f"--tpu-type={slice_.name}", f"--num-slices={slice_.num_slices}",
                 "--base-docker-image=python:3.12", "--script-dir=.",
                 f"--command={setup} && {run_command(spec, o, w, python='python3', cd=None)}"]
                for run_name, w, o in runs]
    raise ValueError(f"--mode {mode!r}; allowed values: gcloud, xpk")


def reachable_repo(repo: str) -> bool:
    """Whether `repo` is a URL another machine can clone (scheme://... or scp-like user@host:path), not a local
    path (/..., ./..., ~/..., file://...)."""
    if repo.startswith("file://"):
        return False
    if re.match(r"^[a-z][a-z0-9+.-]*://", repo):
        return True
    return bool(re.match(r"^[\w.-]+@[\w.-]+:", repo))


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment config: path.py[:key=value,...]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--topology", help="TPU slice (default: the config's topology(arg)), e.g. v5p-128")
    p.add_argument("--num-slices", type=int, default=1)
    p.add_argument("--project", default=None, help=f"GCP project (default: ${' / $'.join(PROJECT_ENV)})")
    p.add_argument("--zone", required=True)
    p.add_argument("--skip-zone-check", action="store_true", help="accept a zone missing from our table")
    p.add_argument("--workdir", required=True, help="shared run directory (gs:// for multi-host slices)")
    p.add_argument("--name", help="TPU VM / workload name (default from the config)")
    p.add_argument("--mode", default="gcloud", choices=("gcloud", "xpk"))
    p.add_argument("--cluster", help="xpk cluster (xpk mode)")
    p.add_argument("--repo", help="git URL the workers clone (default: this checkout's origin; a local path "
                   "warns in a dry run and is refused with --execute)")
    p.add_argument("--ref", help="commit/branch to run (default: this checkout's HEAD)")
    p.add_argument("--sweep", action="store_true", help="one run per point of the config module's sweep()")
    p.add_argument("--spot", action="store_true", help="gcloud: create a Spot TPU VM")
    p.add_argument("--execute", action="store_true", help="run the commands (default: print them)")
    args = p.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from kanana_jax.cli import build_config, load_config_module
    from launch import topologies
    try:
        project = args.project or next((os.environ[k] for k in PROJECT_ENV if os.environ.get(k)), None)
        if not project:
            raise ValueError(f"no GCP project: pass --project or set ${PROJECT_ENV[0]}")
        slice_ = topologies.resolve(args.config, args.topology, args.num_slices)
        topologies.check_zone(slice_.generation, args.zone, skip=args.skip_zone_check)
        build_config(args.config, args.set)  # fail here, not on the pod, if the config or overrides are invalid
        sweep = None
        if args.sweep:
            module = load_config_module(args.config.partition(":")[0])
            if not hasattr(module, "sweep"):
                raise ValueError(f"{args.config} defines no sweep()")
            sweep = module.sweep()
        repo = args.repo or _git("remote", "get-url", "origin") or ""
        if args.mode == "gcloud" and not repo:
            raise ValueError("no git remote to clone on the workers: pass --repo URL (and --ref)")
        if args.mode == "gcloud" and not reachable_repo(repo):
            where = "--repo" if args.repo else "this checkout's origin"
            message = (f"{where} {repo} is a path on this machine, which "
                       "the TPU VMs cannot clone: pass --repo with a URL they can reach (https://..., git@host:...)")
            if args.execute:
                raise ValueError(message)
            print(f"warning: {message}", file=sys.stderr)
        commands = plan(args.config, args.set, slice_=slice_, project=project, zone=args.zone,
                        workdir=args.workdir, name=_name_ok(args.name or default_name(args.config)), repo=repo,
                        ref=args.ref or _git("rev-parse", "HEAD") or "main", mode=args.mode, cluster=args.cluster,
                        sweep=sweep, spot=args.spot)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for cmd in commands:
        print(shlex.join(cmd))
        if args.execute:
            subprocess.run(cmd, check=True, cwd=ROOT)
    if args.mode == "gcloud" and not args.execute:
        print(f"# when done: gcloud compute tpus tpu-vm delete {commands[0][5]} --project={project} "
              f"--zone={args.zone} --quiet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
