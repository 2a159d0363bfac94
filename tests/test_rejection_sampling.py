"""Rejection sampling with a SCRIPTED policy (completions known in advance: some pass, some fail, some loop forever,
some try to escape the sandbox): exactly the passing ones are kept, with their provenance; selection modes, dedup
and caps as documented; a bad prompt record is named with its file and line; the experiment config builds for
every size and sweeps."""
import json
import os

import pytest

from experiments import rejection_sampling as rs_experiment
from experiments.sweep_dsl import expand
from kanana_jax.cli import build_config
from kanana_jax.config import ConfigError
from kanana_jax.data.sources import BadRecordError
from kanana_jax.generate.tool_calls import ToolCall, from_text_messages, render_assistant_turn
from kanana_jax.rewards.tools import ToolEnv, run_episode
from kanana_jax.rollout import rejection
from kanana_jax.rollout.prompts import load_prompts
from kanana_jax.rollout.verify import Sample
from kanana_jax.train.stages import DRIVERS, get_stage
from kanana_jax.train.stages import rejection_sampling as driver

K = 8


class Stop(Exception):
    """Raised by the test hook: ends the run where the test wants to look (a kill, in effect)."""


def _tool_sample(record, steps) -> Sample:
    """A tool episode played from scripted assistant steps in the real tool environment (as RolloutGenerator
    would: the turns, and the generated messages with the tool results)."""
    texts = iter([render_assistant_turn(s["content"], [ToolCall(c["name"], c["arguments"]) for c in s["calls"]])
                  for s in steps])
    msgs, turns = run_episode(ToolEnv(record["tools"], record["initial_state"]), record["messages"],
                              lambda _: next(texts), 8)
    return Sample(turns[-1], tuple(turns), tuple(from_text_messages(msgs[len(record["messages"]):])),
                  sum(len(t) for t in turns), "stop_token")


def _script(records, outside: str) -> dict:
    """{prompt id: K completions, with the reason verify() must give each}."""
    arith, code, tool, ifeval = (next(r for r in records if r["bucket"] == b) for b in ("arith", "code", "tool",
                                                                                        "ifeval"))
    ans, ep, ref = arith["answer"], code["entry_point"], code["reference"]
    block = lambda src: f"Here it is.\n```python\n{src}\n```"
    wrong = str(int(ans) + 1)
    script = {
        arith["id"]: [(f"\\boxed{{{ans}}}", "correct"), (f"So the answer is \\boxed{{{ans}}}.", "correct"),
                      (f"\\boxed{{{wrong}}}", "wrong_answer"), (ans, "no_answer"), (f"\\boxed{{{ans}}}", "correct"),
                      (f"{ans} {ans} " * 40, "no_answer"), (f"\\boxed{{ {ans} }}", "correct"),
                      (f"\\boxed{{{wrong}}} \\boxed{{{ans}}}", "correct")],
        code["id"]: [(block(ref), "correct"), (block(ref), "correct"),   # the same completion twice: deduped
                     (block(f"def {ep}(*a, **k):\n    while True:\n        pass"), "timeout"),
                     (block("import socket\nsocket.create_connection(('10.255.255.1', 80), timeout=0.5)\n" + ref),
                      "network"),
                     (block(f"open({outside!r}, 'w').write('escaped')\n" + ref), "forbidden_write"),
                     (block("import os\nwhile True:\n    os.fork()"), "fork"),
                     (block("x = bytearray(8 * 1024 ** 3)\n" + ref), "memory"),
                     (block(f"def {ep}(*a, **k):\n    return None"), "failed")],
        tool["id"]: [(_tool_sample(tool, tool["reference"]), "correct")] * 2
                    + [(_tool_sample(tool, tool["reference"][:1] + [{"content": "It is 1.", "calls": []}]),
                        "wrong_answer")] * 6,
        ifeval["id"]: [(ifeval["reference"], "correct")] + [("no.", "constraint_failed")] * 7,
    }
    return script


def _prompt_file(tmp_path) -> str:
    """A prompt file mixing real records of four buckets (train split; eval split for the held-out gold)."""
    picks = {"arith": 5, "code": 0, "tool": 0, "ifeval": 0}
    for split in ("train", "eval"):
        with open(tmp_path / f"mixed_{split}.jsonl", "w") as f:
            for bucket, i in picks.items():
                f.write(json.dumps(load_prompts(f"prompts:{bucket}", split)[i]) + "\n")
    return str(tmp_path / "mixed_{split}.jsonl")


def _config(tmp_path, *sets, arg=""):
    _, cfg = build_config(f"experiments/rejection_sampling.py:size=tiny,k={K},rounds=1,chunk=2,heldout=0,steps=2,"
                          f"batch=2,seq_len=64{',' + arg if arg else ''}",
                          ["model.n_layers=1", "model.first_k_dense=1", "train.progress_bar=false",
                           "train.tensorboard=false", f"rejection_sampling.prompts={_prompt_file(tmp_path)}",
                           "rejection_sampling.sandbox_timeout_s=1.0", *sets])
    return cfg


def _scripted(script):
    calls = []

    def policy(params, records, k, key):
        calls.append([r["id"] for r in records])
        return [[s for s, _ in script[r["id"]][:k]] for r in records]
    policy.calls = calls
    return policy


def _stop_at(event):
    def hook(name, **info):
        if name == event:
            raise Stop(info)
    return hook


def test_scripted_policy_keeps_exactly_the_passing_samples_with_provenance(tmp_path):
    outside = str(tmp_path / "escaped.txt")   # outside every sandbox dir: writing it must be refused
    cfg = _config(tmp_path)
    records = load_prompts(cfg.rejection_sampling.prompts, "train")
    script = _script(records, outside)
    policy = _scripted(script)
    workdir = tmp_path / "rs"
    with pytest.raises(Stop):
        driver.run(cfg, str(workdir), policy=policy, hook=_stop_at("kept"))
    assert sorted(sum(policy.calls, [])) == sorted(r["id"] for r in records)   # every prompt sampled once
    rows = [json.loads(line) for line in open(workdir / "round_0" / "samples.jsonl")]
    assert len(rows) == len(records) * K
    progress = json.load(open(workdir / "round_0" / "progress.json"))
    for row in rows:   # every sample's verdict is the one the script says, from the real environment
        want = script[row["prompt_id"]][row["sample_index"]][1]
        assert row["reason"] == want, (row["prompt_id"], row["sample_index"], row["reason"], row["details"])
        assert row["passed"] == (want == "correct") and row["verdict"] == ("pass" if want == "correct" else "fail")
        assert row["reward"] == float(want == "correct")
        assert row["params_checksum"] == progress["policy_in"]["checksum"] and row["policy"] == "fresh"
    assert not os.path.exists(outside)
    kept = [json.loads(line) for line in open(workdir / "round_0" / "kept_train.jsonl")]
    # passing and not a repeat of an earlier passing completion of the same prompt
    expected = []
    for r in records:
        seen = set()
        for j, (s, reason) in enumerate(script[r["id"]]):
            text = s.turns if isinstance(s, Sample) else (s,)
            if reason == "correct" and text not in seen:
                expected.append((r["id"], j))
                seen.add(text)
    order = list(dict.fromkeys(row["prompt_id"] for row in rows))   # the round's (seeded) prompt order
    assert [(k["provenance"]["prompt_id"], k["provenance"]["sample_index"]) for k in kept] == sorted(
        expected, key=lambda e: (order.index(e[0]), e[1]))
    by_id = {r["id"]: r for r in records}
    for k in kept:
        p = k["provenance"]
        assert p["round"] == 0 and p["reason"] == "correct" and p["reward"] == 1.0 and p["params_step"] is None
        assert p["params_checksum"] == progress["policy_in"]["checksum"] and len(p["params_checksum"]) == 8
        prompt = by_id[p["prompt_id"]]["messages"]
        assert k["messages"][:len(prompt)] == prompt and k["messages"][len(prompt)]["role"] == "assistant"
        assert k["bucket"] == by_id[p["prompt_id"]]["bucket"]
    tool_kept = next(k for k in kept if k["bucket"] == "tool")
    assert [m["role"] for m in tool_kept["messages"][2:]][:2] == ["assistant", "tool"]   # the episode, with results
    m = progress["sampling"]
    assert m["kept"] == len(expected) and m["samples"] == len(records) * K
    assert m["fail/timeout"] == 1 and m["fail/network"] == 1 and m["fail/forbidden_write"] == 1
    assert m["fail/fork"] == 1 and m["fail/memory"] == 1 and m["fail/failed"] == 1
    assert m["pass@1/code"] == 2 / K and m["pass@k/code"] == 1.0 and m["pass@1/arith"] == 5 / K
    assert m["samples_per_s"] > 0 and m["verifications_per_s"] > 0
    # the kept file is an SFT data set: the round's SFT reads it through its chat source
    sft_cfg = driver.Driver(cfg, str(workdir), policy=policy).sft_config(0, "")
    assert sft_cfg.train.stage == "sft" and sft_cfg.sft.buckets[0][1].endswith("round_0/kept_{split}.jsonl")
    from kanana_jax.data.chat_records import open_chat_source
    assert len(open_chat_source(sft_cfg.sft.buckets[0][1], split="train")) == len(expected)
    # a relaunch with the sampling changed is refused before anything runs
    with pytest.raises(driver.run_record.ResumeConfigError, match="samples_per_prompt"):
        driver.run(_config(tmp_path, "rejection_sampling.samples_per_prompt=4"), str(workdir), policy=policy)


def _rows(passed, tokens, rewards=None, prompt="p", texts=None):
    texts = texts or [f"c{i}" for i in range(len(passed))]
    rewards = rewards or [float(ok) for ok in passed]
    return [{"prompt_id": prompt, "bucket": "arith", "sample_index": i, "passed": ok, "n_tokens": n,
             "reward": rewards[i], "completion": texts[i], "turns": [texts[i]]}
            for i, (ok, n) in enumerate(zip(passed, tokens))]


def test_selection_modes_dedup_and_caps():
    passed = [True, False, True, True, True, False]
    tokens = [9, 1, 4, 4, 2, 1]
    texts = ["a", "b", "c", "a", "d", "e"]          # sample 3 repeats sample 0
    rows = _rows(passed, tokens, rewards=[0.5, 0.0, 0.9, 0.9, 0.7, 0.0], texts=texts)
    idx = lambda kept: [r["sample_index"] for r in kept]
    assert idx(rejection.select(rows, "all")) == [0, 2, 4]
    assert idx(rejection.select(rows, "all", dedup=False)) == [0, 2, 3, 4]
    assert idx(rejection.select(rows, "all", max_per_prompt=2)) == [0, 2]
    assert idx(rejection.select(rows, "shortest")) == [4]
    assert idx(rejection.select(rows, "shortest", dedup=False)) == [4]
    assert idx(rejection.select(rows, "best_k", best_k=2)) == [2, 4]            # reward 0.9, then 0.7
    assert idx(rejection.select(rows, "best_k", best_k=2, dedup=False)) == [2, 3]   # tie on reward and tokens
    assert idx(rejection.select(rows, "best_k", best_k=3, max_per_prompt=1)) == [2]
    assert rejection.select(_rows([False] * 3, [1, 2, 3]), "all") == []
    other = _rows([True, True], [3, 3], prompt="q")
    assert [r["prompt_id"] for r in rejection.select(rows + other, "all", max_per_prompt=1)] == ["p", "q"]
    with pytest.raises(ValueError, match="selection"):
        rejection.select(rows, "longest")


def test_pass_rates_per_bucket():
    rows = (_rows([True, False], [1, 1], prompt="a") + _rows([False, False], [1, 1], prompt="b")
            + [dict(r, bucket="code") for r in _rows([True, True], [1, 1], prompt="c")])
    m = rejection.pass_rates(rows)
    assert m["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3) and m["pass@k"] == pytest.approx(2 / 3)
    assert m["pass@1/arith"] == 0.25 and m["pass@k/arith"] == 0.5 and m["pass@1/code"] == 1.0


def test_a_bad_prompt_record_is_named_with_file_and_line(tmp_path):
    good = load_prompts("prompts:arith", "train")[:2]
    bad = dict(good[0], id="broken")
    del bad["answer"]
    path = tmp_path / "mine_train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (*good, bad)) + "\n")
    cfg = _config(tmp_path, f"rejection_sampling.prompts={tmp_path}/mine_{{split}}.jsonl")
    with pytest.raises(BadRecordError, match=r"mine_train.jsonl line 3: .*answer"):
        driver.run(cfg, str(tmp_path / "rs"), policy=_scripted({}))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="mix_sft"):
        driver.check_config(_config(tmp_path, "rejection_sampling.mix_sft=0.5"))
    with pytest.raises(ConfigError, match="eval_suites"):
        driver.check_config(_config(tmp_path, "rejection_sampling.eval_suites=math,poetry"))
    with pytest.raises(ConfigError, match="rejection_sampling.selection"):
        _config(tmp_path, "rejection_sampling.selection=longest")


@pytest.mark.parametrize("size", ["tiny", "small", "kanana2_30b_a3b", "kanana2_155b_a17b"])
def test_config_builds_for_every_size(size):
    _, cfg = build_config(f"experiments/rejection_sampling.py:size={size}")
    assert cfg.train.stage == "rejection_sampling" and DRIVERS[cfg.train.stage] is driver
    rs = cfg.rejection_sampling
    assert rs.rounds == 3 and rs.prompts == ("prompts:arith" if size == "tiny" else "prompts:math,code,tool,ifeval")
    assert (rs.mix_sft > 0) == (size != "tiny") and bool(cfg.sft.buckets) == (size != "tiny")
    if size.startswith("kanana2"):
        assert cfg.mesh.fsdp != 1 or cfg.mesh.expert != 1   # the pod layout
    sft_cfg = driver.sft_config(cfg, "/runs/rs/round_0")     # what each round trains (and an AOT check compiles)
    assert sft_cfg.train.stage == "sft" and sft_cfg.sft.buckets[0][0] == driver.KEPT_BUCKET
    assert abs(sum(b[2] for b in sft_cfg.sft.buckets) - 1.0) < 1e-9
    assert get_stage("sft").batch_spec(sft_cfg)["inputs_BxT"].shape == (cfg.data.global_batch_size, cfg.data.seq_len)


def test_sweep_expands():
    points = expand(rs_experiment.sweep(), rs_experiment.get_config, "size=tiny")
    assert len(points) == 6
