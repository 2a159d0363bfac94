"""Run a script in a fresh process that sees N fake CPU devices (multi-device tests and CPU dry runs).

XLA reads `--xla_force_host_platform_device_count` once, when the CPU backend starts, so multi-device checks
run in their own process: `run_checks(script, names)` starts `python script names...` with the flag set and
returns the JSON object the script prints on its last stdout line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fake_device_env(n_devices: int, environ=None) -> dict:
    """A copy of the environment that makes JAX start `n_devices` CPU devices and no accelerator."""
    env = dict(os.environ if environ is None else environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def run_checks(script: str, names: list[str], n_devices: int = 8, timeout: float = 900) -> dict:
    """Runs `python script *names` with `n_devices` fake CPU devices; returns its last stdout line as JSON."""
    proc = subprocess.run([sys.executable, script, *names], env=fake_device_env(n_devices), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{os.path.basename(script)} {' '.join(names)} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{os.path.basename(script)} printed nothing; stderr:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def main_for_checks(checks: dict, argv=None) -> None:
    """Script side: runs the named functions of `checks` and prints {name: result} as one JSON line."""
    names = sys.argv[1:] if argv is None else argv
    unknown = [n for n in names if n not in checks]
    if unknown:
        raise SystemExit(f"unknown checks {unknown}; available: {', '.join(checks)}")
    print(json.dumps({n: checks[n]() for n in (names or list(checks))}))
