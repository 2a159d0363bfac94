"""Builds the mid-training reasoning corpus: python kanana_jax/data/corpus/build_reasoning.py [--out DIR] [--no-sandbox].

Writes `math_cot_{train,eval}.jsonl` and `code_cot_{train,eval}.jsonl` (one {"text": ...} document per
line) into corpus/reasoning/ (not corpus/ itself, whose *_train.jsonl files are all pre-training domains).
Every document is verified before anything is written (see gen_reasoning.py); `--no-sandbox` skips only
the sandbox runs of the code documents (the determinism test uses it; the output bytes are the same).
Re-running gives identical bytes.
"""
import argparse
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gen_reasoning  # noqa: E402  pylint: disable=wrong-import-position

from kanana_jax.data.posttrain_verify import verify_records  # noqa: E402  pylint: disable=wrong-import-position
from kanana_jax.data.synth.common import EvalGuard, write_jsonl  # noqa: E402  pylint: disable=wrong-import-position

OUT = os.path.join(HERE, "reasoning")
MATH_COUNTS = (330, 16)  # train, eval documents
SEED = 101


def build(sandbox: bool = True) -> dict[str, list[dict]]:
  """File name -> records, all verified."""
  guard = EvalGuard()
  math_train, math_eval = gen_reasoning.math_documents(SEED, *MATH_COUNTS, guard)
  code_train, code_eval = gen_reasoning.code_documents(guard)
  r = random.Random(SEED)
  r.shuffle(code_train)
  files = {"math_cot_train.jsonl": [{"text": d} for d in math_train],
           "math_cot_eval.jsonl": [{"text": d} for d in math_eval],
           "code_cot_train.jsonl": [{"text": d} for d, _ in code_train],
           "code_cot_eval.jsonl": [{"text": d} for d, _ in code_eval]}
  for name, records in files.items():
    todo = records if sandbox or name.startswith("math") else []
    bad = [(i, v.details) for i, v in enumerate(verify_records(todo)) if not v.ok]
    if bad:
      raise ValueError(f"{name}: {len(bad)} documents fail verification, e.g. line {bad[0][0] + 1}: {bad[0][1]}")
  return files


def write(out_dir: str = OUT, sandbox: bool = True) -> dict[str, int]:
  """Builds and writes the files; returns bytes per file."""
  return {name: write_jsonl(os.path.join(out_dir, name), recs) for name, recs in build(sandbox).items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=OUT, help="output folder (default: corpus/reasoning next to this script)")
  parser.add_argument("--no-sandbox", action="store_true", help="skip the sandbox runs (same output bytes)")
  args = parser.parse_args()
  sizes = write(args.out, sandbox=not args.no_sandbox)
  for name, size in sorted(sizes.items()):
    print(f"{name:24s} {size / 1024:8.1f} KB")
  print(f"{'total':24s} {sum(sizes.values()) / 1024:8.1f} KB")


if __name__ == "__main__":
  main()
