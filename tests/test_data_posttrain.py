"""Post-training datasets: rebuilt bytes equal the shipped files, every record validates and re-verifies,
rejected answers fail, nothing overlaps the eval suites, and bad records are reported by file, line and field."""
import collections
import json
import os
import random
import re
import subprocess
import sys

import pytest

from kanana_jax.data import posttrain_data as P
from kanana_jax.data import sources
from kanana_jax.evals.suites import SUITE_NAMES, load_suite
from kanana_jax.generate.tool_calls import from_text_messages, to_text_messages

DATA = os.path.dirname(P.__file__)
REASONING = os.path.join(DATA, "corpus", "reasoning")
NUM = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")


@pytest.fixture(scope="module")
def records():
  return {(k, n, s): P.load_records(k, n, s) for k, n, s in P.datasets()}


def _shipped(folder, names):
  return {name: open(os.path.join(folder, name), "rb").read() for name in names}


def test_builders_reproduce_shipped_bytes(tmp_path):
  env = {**os.environ, "PYTHONHASHSEED": "7", "JAX_PLATFORMS": "cpu"}  # no dependence on str hashing
  subprocess.run([sys.executable, "-m", "kanana_jax.data.synth.build", "--out", str(tmp_path), "--no-sandbox"],
                 check=True, capture_output=True, env=env)
  subprocess.run([sys.executable, os.path.join(DATA, "corpus", "build_reasoning.py"), "--out",
                  str(tmp_path / "reasoning"), "--no-sandbox"], check=True, capture_output=True, env=env)
  for sub in ("sft", "preference", "prompts"):
    names = sorted(f for f in os.listdir(os.path.join(DATA, sub)) if f.endswith(".jsonl"))
    assert names == sorted(os.listdir(tmp_path / sub)), sub
    for name, data in _shipped(os.path.join(DATA, sub), names).items():
      assert data == (tmp_path / sub / name).read_bytes(), f"{sub}/{name} differs: rerun python -m kanana_jax.data.synth.build"
  names = sorted(f for f in os.listdir(REASONING) if f.endswith(".jsonl"))
  assert names == sorted(os.listdir(tmp_path / "reasoning"))
  for name, data in _shipped(REASONING, names).items():
    assert data == (tmp_path / "reasoning" / name).read_bytes(), f"{name} differs: rerun build_reasoning.py"


def test_every_file_validates_with_sizes_splits_and_languages(records):
  total = sum(os.path.getsize(str(P.dataset_path(k, n, s))) for k, n, s in P.datasets())
  assert 1_500_000 < total < 2_400_000, total
  for kind in P.KINDS:
    for name in P.NAMES[kind]:
      train, held = records[kind, name, "train"], records[kind, name, "eval"]
      assert len(train) >= 50 and len(held) >= 4, (kind, name, len(train), len(held))
      assert 0.03 <= len(held) / (len(train) + len(held)) <= (0.17 if name == "arith" else 0.08), (kind, name)
      for part in (train, held):
        if kind == "reasoning":
          korean = sum(bool(re.search("[가-힣]", r["text"].split("\n")[0])) for r in part) / len(part)
          assert 0.25 < korean < 0.75, (kind, name, korean)
        else:
          assert {r["lang"] for r in part} == {"en", "ko"}, (kind, name)
  assert {r["bucket"] for r in records["preference", "all", "train"]} == {"chat", "math", "code", "ifeval"}
  for bucket in ("chat", "math", "code", "ifeval"):
    assert sum(r["bucket"] == bucket for r in records["preference", "all", "train"]) >= 50, bucket
  # the reasoning corpus is not a pre-training domain (corpus/*_train.jsonl are all included in pre-training)
  assert not any("cot" in d for d in sources.embedded_domains())


def test_reasoning_documents_have_the_promised_shape(records):
  for split in P.SPLITS:
    for r in records["reasoning", "math_cot", split]:
      lines = r["text"].split("\n")
      assert lines[0].startswith(("Problem: ", "문제: ")) and re.match(r"(Step 1|1단계): ", lines[2]), lines[:3]
      assert re.fullmatch(r"(Final answer|최종 답): \\boxed\{[^{}]+\}", lines[-1]), lines[-1]
    for r in records["reasoning", "code_cot", split]:
      assert r["text"].count("```python\n") == 2 and "assert " in r["text"].rsplit("```python\n", 1)[1]


def test_all_records_reverify_without_the_sandbox(records):
  flat = [r for recs in records.values() for r in recs]
  bad = [(r.get("id"), v.details) for r, v in zip(flat, P.verify_records(flat, sandbox=False)) if not v.ok]
  assert not bad, bad[:3]


def test_a_sample_of_code_records_passes_in_the_sandbox(records):
  rng = random.Random(0)
  sample = []
  for key in [("reasoning", "code_cot"), ("sft", "code"), ("prompts", "code")]:
    for split in P.SPLITS:
      sample += rng.sample(records[(*key, split)], 3)
  prefs = [r for s in P.SPLITS for r in records["preference", "all", s] if r["bucket"] == "code"]
  sample += rng.sample(prefs, 4)  # chosen passes, rejected fails a test
  verdicts = P.verify_records(sample, max_workers=2)
  assert all(v.ok for v in verdicts), [(r.get("id", r.get("text", "")[:40]), v.details)
                                       for r, v in zip(sample, verdicts) if not v.ok]


def test_rejected_answers_fail_and_chosen_pass_their_verifier(records):
  rng = random.Random(1)
  pairs = [r for s in P.SPLITS for r in records["preference", "all", s]]
  by_bucket = collections.defaultdict(list)
  for r in pairs:
    by_bucket[r["bucket"]].append(r)
  singles = []
  for bucket, recs in sorted(by_bucket.items()):
    for r in rng.sample(recs, 2 if bucket == "code" else 12):
      fields = {k: v for k, v in r.items() if k not in ("prompt", "chosen", "rejected")}
      singles.append(({**fields, "messages": r["prompt"] + r["chosen"]}, True))
      singles.append(({**fields, "messages": r["prompt"] + r["rejected"]}, False))
  verdicts = P.verify_records([s for s, _ in singles], max_workers=2)
  assert [v.ok for v in verdicts] == [want for _, want in singles], [
      (s["id"], want, v.details) for (s, want), v in zip(singles, verdicts) if v.ok != want]


def test_verifier_rejects_corrupted_records(records):
  math = dict(records["sft", "math", "train"][0])
  math["answer"] = str(int(math["answer"]) + 1) if math["answer"].lstrip("-").isdigit() else "0"
  tool = json.loads(json.dumps(records["sft", "tool", "train"][0]))
  result = next(m for m in tool["messages"] if m["role"] == "tool")
  result["content"] = {"value": 123456789}
  doc = {"text": records["reasoning", "math_cot", "train"][0]["text"].replace("\\boxed{", "\\boxed{9")}
  ifeval = json.loads(json.dumps(records["sft", "ifeval", "train"][0]))
  ifeval["constraints"].append({"id": "length:max_words", "kwargs": {"n": 1}})
  chat = dict(records["sft", "chat", "train"][0], expect=["a string no reply contains"])
  verdicts = P.verify_records([math, tool, doc, ifeval, chat], sandbox=False)
  assert not any(v.ok for v in verdicts), [v.details for v in verdicts]


def test_tool_trajectories_round_trip_and_are_multi_tool(records):
  recs = records["sft", "tool", "train"] + records["sft", "tool", "eval"]
  for r in recs:
    assert from_text_messages(to_text_messages(r["messages"])) == r["messages"], r["id"]
    assert r["messages"][0]["role"] == "system" and "<tools>" in r["messages"][0]["content"]
  calls = [len({c["name"] for m in r["messages"] for c in m.get("tool_calls", [])}) for r in recs]
  assert sum(c >= 2 for c in calls) / len(calls) > 0.6
  assert any(sum(m["role"] == "user" for m in r["messages"]) > 1 for r in recs)  # multi-turn conversations
  assert any("error" in m["content"] for r in recs for m in r["messages"] if m["role"] == "tool")  # recovery


def _user_texts(rec):
  if "text" in rec:
    return [rec["text"].split("\n")[0]]  # the problem statement of a reasoning document
  msgs = rec.get("messages") or rec["prompt"]
  return [m["content"] for m in msgs if m["role"] == "user"]


def _norm(s):
  return " ".join(s.lower().split())


def _numbers(text):
  return tuple(str(float(n.replace(",", ""))) for n in NUM.findall(text))


def test_disjoint_from_the_eval_suites_and_between_splits(records):
  eval_texts, eval_numbers = [], set()
  for name in SUITE_NAMES:
    for item in load_suite(name):
      text = item.get("question") or item["prompt"]
      eval_texts.append(_norm(text))
      if name in ("math", "tools"):
        eval_numbers.add(_numbers(text))
  entry_points = {item["entry_point"] for item in load_suite("code") if item["entry_point"]}
  task_splits = collections.defaultdict(set)
  for (kind, name, split), recs in records.items():
    for r in recs:
      for text in _user_texts(r):
        mine = _norm(text.split("\n\n")[0])  # the question, without the appended instruction
        hit = next((e for e in eval_texts if e in mine or (len(mine) >= 20 and mine in e)), None)
        assert hit is None, (kind, name, r.get("id"), hit)
        if name in ("math", "math_cot", "arith", "tool") or r.get("bucket") == "math":
          assert not _numbers(mine) or _numbers(mine) not in eval_numbers, (kind, name, r.get("id"), mine)
      assert r.get("entry_point") not in entry_points, r.get("entry_point")
      if "task_key" in r:
        task_splits[r["task_key"]].add(split)
    if split == "train":  # no task prompt (the first user turn) is in both splits
      seen = {_user_texts(r)[0] for r in recs}
      assert not seen & {_user_texts(r)[0] for r in records[kind, name, "eval"]}, (kind, name)
  both = [k for k, s in task_splits.items() if len(s) > 1]
  assert not both, both[:5]  # a task held out anywhere is trained on nowhere
  code_text = " ".join(r["text"] for s in P.SPLITS for r in records["reasoning", "code_cot", s])
  assert not any(re.search(rf"def {e}\(", code_text) for e in entry_points if e)


def test_arith_family_is_short_and_has_three_difficulties(records):
  for split in P.SPLITS:
    recs = records["prompts", "arith", split]
    counts = collections.Counter(r["difficulty"] for r in recs)
    assert set(counts) == {1, 2, 3} and min(counts.values()) >= (150 if split == "train" else 30), counts
    for r in recs:
      q = r["messages"][0]["content"]
      assert len(q.encode("utf-8")) <= 45 and "\\boxed{}" in q, q
      a, op, b = re.match(r"(\d+)([+-])(\d+)=", q).groups()
      assert len(a) == len(b) == r["difficulty"] or r["difficulty"] == 1 and max(len(a), len(b)) == 1
      assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0


def test_bad_records_name_file_line_and_field(tmp_path, records):
  good = records["sft", "math", "train"][:2]
  cases = [
      ("sft", "math", dict(good[0], id="x", answer=12), "'answer'"),
      ("sft", "math", dict(good[0], id="x", messages=[{"role": "bot", "content": "hi"}]), "'messages'[0]"),
      ("sft", "math", dict(good[0], id="x", messages=good[0]["messages"][:1]), "'messages'"),
      ("sft", "math", dict(good[0], id="x", lang="fr"), "'lang'"),
      ("sft", "math", dict(good[0]), "'id'"),  # repeats the id of line 1
      ("sft", "ifeval", dict(records["sft", "ifeval", "train"][0], id="x",
                             constraints=[{"id": "length:bogus", "kwargs": {}}]), "'constraints'[0]"),
      ("sft", "tool", dict(records["sft", "tool", "train"][0], id="x", tools=["teleport"]), "'tools'"),
      ("reasoning", "math_cot", {"text": "x", "extra": 1}, "'text'"),
  ]
  for kind, name, bad, field in cases:
    first = records[kind, name, "train"][0]
    path = tmp_path / f"{kind}_{name}.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [first, records[kind, name, "train"][1], bad]),
                    encoding="utf-8")
    if field == "'id'":
      path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [first, good[1], first]), encoding="utf-8")
    with pytest.raises(P.RecordError) as err:
      P.read_records(path, kind, name)
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and field in msg, msg
