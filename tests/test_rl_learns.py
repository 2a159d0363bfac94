"""GRPO and PPO raise the reward of a task the tiny model can learn in a few dozen steps (seeded, CPU).

The task: 'N Answer in \\boxed{}.' (N = a prompt number) whose verified answer is always 7. A short SFT warm start
on replies '\\boxed{d}' with d uniform over the digits teaches the format and nothing about the answer, so the
policy starts near a reward of 0.05-0.2 (a right digit by chance) and RL has to move the answer digit to 7.
Measured here (seed 0, 4 prompts x 8 samples, lr 1e-3, 16 steps; mean of the first -> last four steps): GRPO
0.05 -> 0.47, PPO 0.05 -> 0.34; the assertions ask for a rise of at least 0.15."""
import json
import os
import random

import numpy as np
import pytest

from kanana_jax.cli import build_config
from kanana_jax.train import loop

SETS = ["train.progress_bar=false", "train.tensorboard=false", "model.n_layers=2", "train.async_checkpoint=false"]
STEPS = 16


def _write_task(data: str) -> tuple[str, str]:
    """(RL prompt spec, SFT chat spec) of the task, written under `data`."""
    os.makedirs(data, exist_ok=True)
    for split, n in (("train", 64), ("eval", 8)):
        digits = random.Random(f"digits/{split}")
        with open(os.path.join(data, f"seven_{split}.jsonl"), "w") as prompts, \
                open(os.path.join(data, f"digit_{split}.jsonl"), "w") as sft:
            for i in range(n):
                messages = [{"role": "user", "content": f"#{i} Answer in \\boxed{{}}."}]
                prompts.write(json.dumps({"id": f"seven-{split}-{i}", "bucket": "arith", "lang": "en",
                                          "difficulty": 1, "messages": messages, "answer": "7",
                                          "solution_expr": "7"}) + "\n")
                reply = {"role": "assistant", "content": f"\\boxed{{{digits.randrange(10)}}}"}
                sft.write(json.dumps({"id": f"digit-{split}-{i}", "bucket": "arith",
                                      "messages": messages + [reply]}) + "\n")
    return os.path.join(data, "seven_{split}.jsonl"), "chat:" + os.path.join(data, "digit_{split}.jsonl")


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory):
    base = tmp_path_factory.mktemp("rl_learns")
    prompts, sft_data = _write_task(str(base / "data"))
    _, cfg = build_config("experiments/sft.py:size=tiny,steps=40,batch=16,seq_len=96,chat=1",
                          SETS + [f'sft.buckets=[["arith", "{sft_data}", 1.0]]', "train.eval_every=0",
                                  "train.checkpoint_every=40", "optimizer.learning_rate=3e-3",
                                  "optimizer.warmup_steps=5"])
    loop.run(cfg, str(base / "warm"))
    return str(base), prompts


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_rl_raises_the_reward_of_a_learnable_task(warm_start, algorithm):
    base, prompts = warm_start
    tracks = [["seven", prompts, "verifiable", 1.0]]
    _, cfg = build_config(f"experiments/rl.py:size=tiny,algorithm={algorithm},steps={STEPS},prompts=4,group=8,"
                          f"seq_len=96,max_new_tokens=12,lr=1e-3,kl=0,seed=0,init_from={base}/warm",
                          SETS + [f"rl.tracks={json.dumps(tracks)}", "train.eval_every=0",
                                  f"train.checkpoint_every={STEPS}"])
    workdir = os.path.join(base, algorithm)
    loop.run(cfg, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rewards = np.array([json.loads(line)["reward_mean/seven"] for line in f])
    assert len(rewards) == STEPS
    first, last = rewards[:4].mean(), rewards[-4:].mean()
    assert last >= first + 0.15, f"{algorithm}: reward {first:.3f} -> {last:.3f}: {np.round(rewards, 2)}"
