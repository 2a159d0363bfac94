"""Pre-training on the stage protocol trains as pre-training did before the port.

tests/data/pretrain_reference.json holds a tiny run's record: tiny model, 12 steps, batch 8 x 64, AdamW and Muon
(the Muon run with 2 gradient-accumulation microbatches), a checkpoint at step 6 and 12. Recorded: every logged
loss and gradient norm (float32 bits), the per-leaf checksum of the final train state (sum of raw bits mod 2^32,
as the checkpointer stores it), the checkpoint's tree (leaf paths, shapes, dtypes) and the data-iterator state.
The first reference came from the code before the port (commit d8c967b) and matched the port bit for bit; the
mid-training commit (184ae06) moved the first update by one ulp on the recording machine, and the reference was
re-recorded at commit b0194df with `python tests/test_stage_port.py --record`
(under tests/conftest.py's environment: NPROC=8 and the CLI's XLA:CPU flags).
XLA:CPU results depend on the host's vector instructions: on the recording machine the test compares bits; on
another CPU the initial forward's loss within 1e-6 and the tree exactly, and the trajectory within a tolerance
for how 11 updates amplify last-bit differences (Muon's Newton-Schulz iterations the most): measured on CI's
host, up to 1.2e-3 relative in the loss; here, against the old reference, 2.5e-3 in Muon's gradient norm.
"""
import json
import os
import platform
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "data", "pretrain_reference.json")
RUNS = {
    "adamw": ["optimizer.name=adamw"],
    "muon_accum2": ["optimizer.name=muon", "train.grad_accum_steps=2"],
}


def _machine() -> str:
    model = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return f"{platform.machine()} {model}"


def _record_run(workdir: str, overrides: list[str]) -> dict:
    import jax
    import orbax.checkpoint as ocp

    from kanana_jax.cli import build_config
    from kanana_jax.train import loop
    from kanana_jax.train.checkpoint import leaves_by_path, state_checksums

    _, cfg = build_config("experiments/pretrain.py:size=tiny,steps=12,batch=8,seq_len=64",
                          ["train.log_every=1", "train.progress_bar=false", "train.tensorboard=false",
                           "train.eval_every=6", "train.checkpoint_every=6", "train.peak_tflops_per_device=1",
                           *overrides])
    loop.run(cfg, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    step_dir = os.path.join(workdir, "checkpoints", "12")
    state = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    with open(os.path.join(step_dir, "data", "metadata")) as f:
        data_state = json.load(f)
    tree = {p: [list(np.shape(x)), str(np.asarray(x).dtype)] for p, x in leaves_by_path(state).items()}
    sums = np.asarray(state_checksums(jax.tree.map(jax.numpy.asarray, state))).tolist()
    as_bits = lambda v: int(np.float32(v).view(np.uint32))
    return {"loss_bits": [as_bits(r["loss"]) for r in rows], "loss": [r["loss"] for r in rows],
            "grad_norm": [r["grad_norm"] for r in rows], "eval_loss": [r.get("eval_loss") for r in rows],
            "tree": tree, "checksums": dict(zip(tree, sums)), "data_state": data_state}


def record(out_path: str = REFERENCE):
    import tempfile
    ref = {"machine": _machine(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in RUNS.items():
            ref["runs"][name] = _record_run(os.path.join(tmp, name), overrides)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(ref, f, indent=1)
    print(f"wrote {out_path}")


def _assert_contains(got: dict, want: dict, where: str = "data_state"):
    for key, value in want.items():
        assert key in got, f"{where}.{key} missing"
        if isinstance(value, dict):
            _assert_contains(got[key], value, f"{where}.{key}")
        else:
            assert got[key] == value, f"{where}.{key}: {got[key]!r} != {value!r}"


@pytest.mark.parametrize("name", list(RUNS))
def test_pretrain_on_the_stage_protocol_equals_the_recorded_reference(tmp_path, name):
    with open(REFERENCE) as f:
        ref = json.load(f)
    want = ref["runs"][name]
    got = _record_run(str(tmp_path / name), RUNS[name])
    assert got["tree"] == want["tree"]          # same checkpoint tree: no new leaves for pre-training
    # the data state gained keys (mixture token counts); every recorded one is unchanged
    _assert_contains(got["data_state"], want["data_state"])
    if ref["machine"] == _machine():
        assert got["loss_bits"] == want["loss_bits"]
        assert got["grad_norm"] == want["grad_norm"]
        assert got["eval_loss"] == want["eval_loss"]
        assert got["checksums"] == want["checksums"]
    else:  # another CPU: XLA vectorizes reductions differently, and training amplifies the last bits
        np.testing.assert_allclose(got["loss"][0], want["loss"][0], rtol=1e-6)   # the initial forward
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-2)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=2e-2)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    import conftest  # noqa: F401  (the tests' environment: CPU, NPROC=8 - XLA:CPU's thread count changes reductions - and the XLA flags)
    if "--record" in sys.argv:
        record()
