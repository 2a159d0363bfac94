"""Calibration tuning end to end on the tiny model (CPU, seeded): a warm start that always states 'Confidence: 90%'
on one-digit sums it mostly gets wrong is overconfident; calibration.method=sft (its own greedy answers annotated
with their measured accuracy) lowers the held-out ECE a lot, at unchanged accuracy, and a relaunch of the finished
run recomputes nothing. Measured here (seed 0, 16 held-out items): ECE 0.713 -> 0.068, stated confidence 90% -> 12%
(the measured train accuracy, 4 of 32), accuracy 0.188 -> 0.188 (a 40-step warm start learns the format and answers
'\boxed{1}' to everything: right on 3 of the 16)."""
import json
import os

import pytest

from kanana_jax.cli import build_config
from kanana_jax.rewards.calibration import ask_confidence
from kanana_jax.rollout.prompts import gold_reply, load_prompts
from kanana_jax.train import loop

SETS = ["model.n_layers=1", "train.progress_bar=false", "train.tensorboard=false", "train.async_checkpoint=false",
        "data.chat_too_long=drop"]


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """English one-digit arith prompts (train / eval files) and an overconfident warm-start policy."""
    root = tmp_path_factory.mktemp("calib")
    for split in ("train", "eval"):
        records = [r for r in load_prompts("prompts:arith", split) if r["difficulty"] == 1 and r["lang"] == "en"]
        _write(root / f"arith_{split}.jsonl", records)
        _write(root / f"warm_{split}.jsonl", [
            {"id": r["id"], "messages": ask_confidence(r)["messages"]
             + [{"role": "assistant", "content": f"{gold_reply(r)}\nConfidence: 90%"}]} for r in records])
    warm_dir = str(root / "warm")
    _, warm = build_config("experiments/sft.py:size=tiny,steps=40,batch=8,seq_len=192,chat=1,lr=3e-3,warmup=5",
                           SETS + [f'sft.buckets=[["arith", "chat:{root}/warm_{{split}}.jsonl", 1.0]]',
                                   "train.eval_every=0", "train.checkpoint_every=40"])
    loop.run(warm, warm_dir)
    return root, warm_dir


def test_sft_calibration_lowers_ece_of_an_overconfident_model(task):
    root, warm_dir = task
    workdir = str(root / "calib_sft")
    _, cfg = build_config(f"experiments/calibration.py:size=tiny,method=sft,init_from={warm_dir},steps=16,batch=8,"
                          f"seq_len=192,lr=3e-3,sample_prompts=32,eval_prompts=16,prompts={root}/arith_{{split}}.jsonl",
                          SETS)
    row = loop.run(cfg, workdir)
    with open(os.path.join(workdir, "calibration_eval.json")) as f:
        report = json.load(f)
    before, after = report["before"]["overall"], report["after"]["overall"]
    assert before["stated"] >= 0.9 and before["mean_confidence"] > 0.8          # the warm start: overconfident
    assert before["ece"] > 0.6
    assert after["stated"] >= 0.9                                               # still states a confidence
    assert after["ece"] < before["ece"] - 0.4                                   # much better calibrated
    assert abs(after["accuracy"] - before["accuracy"]) <= 0.125                 # at about the same accuracy
    assert row["after/ece"] == after["ece"] and row["final_policy"].endswith("sft:16")
    assert set(report["family_accuracy"]["accuracy"]) == {"difficulty=1"}
    assert os.path.isfile(os.path.join(workdir, "reliability.png"))
    with open(os.path.join(workdir, "sft_train.jsonl")) as f:
        first = json.loads(f.readline())
    acc = report["family_accuracy"]["accuracy"]["difficulty=1"]
    assert first["messages"][-1]["content"].endswith(f"Confidence: {int(round(100 * acc))}%")
    # a relaunch of the finished run: nothing is sampled, trained or evaluated again
    stamps = {n: os.path.getmtime(os.path.join(workdir, n)) for n in ("samples.jsonl", "eval_before.json",
                                                                     "eval_after.json")}
    again = loop.run(cfg, workdir)
    assert again["after/ece"] == row["after/ece"]
    assert stamps == {n: os.path.getmtime(os.path.join(workdir, n)) for n in stamps}
