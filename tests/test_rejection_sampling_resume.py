"""Rejection sampling with the tiny model resumes anywhere with identical results: killed inside the sampling phase
(after a chunk), stopped inside an SFT round, killed between rounds, and inside the second round's sampling; the
samples, kept data sets, held-out pass rates, eval-suite scores, round metrics and final params equal an
uninterrupted run's. The second round samples from the first round's SFT checkpoint, and its records say so (step
and params checksum)."""
import json

import pytest

from kanana_jax.cli import build_config
from kanana_jax.evals.runner import load_checkpoint
from kanana_jax.train import init_from
from kanana_jax.train.stages import rejection_sampling as driver

STEPS = 24


class Kill(Exception):
    pass


def _config(tmp_path):
    """Two rounds, 8 prompts of 2 chunks, K=4; the SFT mixes the arith gold replies in (mix_sft=0.5), so the fresh
    round-0 policy (which never passes) still trains and round 1 samples a policy that sometimes does."""
    from experiments.rejection_sampling_arith import write_data
    prompts, gold = write_data(str(tmp_path / "data_root"))
    _, cfg = build_config(
        f"experiments/rejection_sampling.py:size=tiny,rounds=2,k=4,prompts_per_round=8,chunk=4,heldout=4,"
        f"eval_suites=math,eval_limit=1,"
        f"steps={STEPS},batch=4,seq_len=128,max_new_tokens=12,mix_sft=0.5,temperature=0.5,lr=3e-3",
        ["model.n_layers=1", "train.progress_bar=false", "train.tensorboard=false", "train.log_every=1",
         "train.checkpoint_every=10", "train.eval_every=0", "train.async_checkpoint=false",
         f"rejection_sampling.prompts={prompts}",
         f'sft.buckets=[["arith_gold", "{gold}", 1.0]]'])
    return cfg


def _read(workdir, name):
    return (workdir / name).read_text().replace(str(workdir), "W")


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in driver.TIMING_KEYS} for r in rows]


def _files(workdir):
    rounds = [json.loads(line) for line in _read(workdir, "rounds.jsonl").splitlines()]
    files = {f"round_{r}/{n}": _read(workdir, f"round_{r}/{n}") for r in (0, 1)
             for n in ("samples.jsonl", "kept_train.jsonl", "heldout.json", "eval.json")}
    losses = {r: [(row["step"], row["loss"]) for row in map(json.loads, _read(workdir, f"round_{r}/sft/metrics.jsonl")
                                                            .splitlines())] for r in (0, 1)}
    return _without_timing(rounds), files, losses


def test_resume_anywhere_equals_the_uninterrupted_run(tmp_path, module_compile_cache):
    cfg = _config(tmp_path)
    ref = tmp_path / "uninterrupted"
    final = driver.run(cfg, str(ref))
    assert final["round"] == 1 and final["final_policy"] == f"{ref}/round_1/sft:{STEPS}"
    assert driver.final_run(cfg, str(ref)) == f"{ref}/round_1/sft"
    assert {"eval/math/accuracy", "heldout_pass@1", "pass@k/arith", "kept", "samples_per_s"} <= set(final)

    work = tmp_path / "interrupted"
    events = []

    def kill_at(event, round_, chunk=None):
        def hook(name, **info):
            events.append((name, info))
            if name == event and info["round"] == round_ and info.get("chunk") == chunk:
                raise Kill(name, info)
        return hook
    with pytest.raises(Kill):                                   # 1. inside round 0's sampling, after chunk 0
        driver.run(cfg, str(work), hook=kill_at("chunk", 0, 0))
    progress = json.loads((work / "round_0" / "progress.json").read_text())
    assert progress["phase"] == "sampling" and progress["chunks_done"] == 1
    stopped = driver.run(cfg, str(work), stop_after=5, hook=kill_at("none", 0))   # 2. inside round 0's SFT
    assert stopped["stopped_in_round"] == 0 and stopped["step"] == 5
    assert [e for e, info in events if e == "chunk" and info["round"] == 0] == ["chunk", "chunk"]  # chunk 1 only
    with pytest.raises(Kill):                                   # 3. between rounds
        driver.run(cfg, str(work), hook=kill_at("round", 0))
    with pytest.raises(Kill):                                   # 4. inside round 1's sampling
        driver.run(cfg, str(work), hook=kill_at("chunk", 1, 0))
    assert driver.run(cfg, str(work))["final_policy"] == f"{work}/round_1/sft:{STEPS}"

    got, want = _files(work), _files(ref)
    assert got[1] == want[1]            # samples, kept data sets, held-out pass rates: byte-identical
    assert got[0] == want[0]            # round metrics (timings aside)
    assert got[2] == want[2]            # both SFT rounds' loss curves (round 0's resumed from its step-5 checkpoint)
    params = {w: driver.Driver(cfg, str(w)).policy(f"{w}/round_1/sft:{STEPS}").checksum for w in (ref, work)}
    assert params[ref] == params[work]

    # round 1 sampled round 0's SFT policy: every row and kept record carries its step and params checksum
    source = load_checkpoint(str(ref / "round_0" / "sft" / "checkpoints" / str(STEPS)))
    checksum = init_from.params_checksum(source.params)
    rows = [json.loads(line) for line in (ref / "round_1" / "samples.jsonl").read_text().splitlines()]
    assert {(r["params_step"], r["params_checksum"]) for r in rows} == {(STEPS, checksum)}
    kept = [json.loads(line) for line in (ref / "round_1" / "kept_train.jsonl").read_text().splitlines()]
    assert all(k["provenance"]["params_checksum"] == checksum for k in kept)
    assert len(kept) == want[0][1]["kept"] and 0 < len(kept) <= sum(r["passed"] for r in rows), \
        "round 1's policy should pass sometimes (it trained on the gold replies)"
