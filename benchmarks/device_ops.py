"""Per-kernel device time from a jax.profiler trace: which ops a jitted call spends its GPU time in."""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections import defaultdict

import jax


def device_op_ms(run, *, runs: int = 3, top: int = 12, trace_dir: str | None = None, with_span: bool = False):
    """[(op name, ms per run, share of device time)], largest first, of `runs` back-to-back calls of run() (which
    returns what to wait for; it is called once more before tracing, so compilation stays out of the trace).

    with_span: also return (busy ms, span ms) per run, where span is first start to last end over the runs divided
    by runs: span > busy means the device waited on the host between kernels."""
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="trace_")
    jax.block_until_ready(run())
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(runs):
        out = run()
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    paths = [os.path.join(r, f) for r, _, fs in os.walk(trace_dir) for f in fs if f.endswith(".trace.json.gz")]
    if not paths:
        return []
    with gzip.open(paths[0]) as f:
        events = json.load(f).get("traceEvents", [])
    pids = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {p for p, n in pids.items() if "/device:" in n or "GPU" in n or "gpu" in n}
    totals = defaultdict(float)
    starts, ends = [], []
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids:
            totals[e["name"]] += e.get("dur", 0.0) / 1e3 / runs
            starts.append(e["ts"])
            ends.append(e["ts"] + e.get("dur", 0.0))
    all_ms = sum(totals.values()) or 1.0
    rows = [(name, ms, ms / all_ms) for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:top]]
    if with_span:
        span_ms = (max(ends) - min(starts)) / 1e3 / runs if starts else 0.0
        return rows, (sum(totals.values()), span_ms)
    return rows
