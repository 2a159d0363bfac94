"""The embedded corpus: rebuilt bytes equal the committed files, size and split, correct arithmetic."""
import contextlib
import glob
import io
import json
import os
import re
import subprocess
import sys

from kanana_jax.data import sources

CORPUS = sources.CORPUS_DIR
DOMAINS = ["code", "dialogue", "math", "wiki_en", "wiki_ko"]


def load(domain, split):
  with open(os.path.join(CORPUS, f"{domain}_{split}.jsonl"), encoding="utf-8") as f:
    return [json.loads(line)["text"] for line in f]


def test_generator_reproduces_committed_files(tmp_path):
  script = os.path.join(CORPUS, "build_corpus.py")
  subprocess.run([sys.executable, script, "--out", str(tmp_path)], check=True, capture_output=True,
                 env={**os.environ, "PYTHONHASHSEED": "1"})
  committed = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CORPUS, "*.jsonl")))
  assert committed == sorted(os.listdir(tmp_path))
  for name in committed:
    with open(os.path.join(CORPUS, name), "rb") as a, open(tmp_path / name, "rb") as b:
      assert a.read() == b.read(), f"{name} differs from build_corpus.py output: rerun the script"


def test_size_split_and_languages():
  assert sources.embedded_domains() == DOMAINS
  total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(CORPUS, "*.jsonl")))
  assert 300_000 <= total <= 420_000, total
  n_train = sum(len(load(d, "train")) for d in DOMAINS)
  n_eval = sum(len(load(d, "eval")) for d in DOMAINS)
  assert 0.03 <= n_eval / (n_train + n_eval) <= 0.05
  hangul = re.compile("[\uac00-\ud7a3]")
  for d in DOMAINS:
    docs = load(d, "train")
    assert len(set(docs)) == len(docs), f"{d} has duplicate documents"
    korean = sum(bool(hangul.search(t)) for t in docs) / len(docs)
    assert (korean > 0.9) if d == "wiki_ko" else (korean < 0.1 if d == "wiki_en" else 0.05 < korean < 0.7), (d, korean)


_EXPR = r"[\d,]+(?: [-+x÷/] [\d,]+)*"
_LEFT = re.compile(r"(?<![-+x÷/] )(?<![\w.])(" + _EXPR + r")$")
_RIGHT = re.compile(r"^(" + _EXPR + r")(?!\.?\d)")


def _value(expr):
  return eval(expr.replace(",", "").replace("x", "*").replace("÷", "/"))  # pylint: disable=eval-used


def test_arithmetic_in_math_and_dialogues_is_correct():
  checked = 0
  for d in ("math", "dialogue"):
    for text in load(d, "train") + load(d, "eval"):
      for line in text.splitlines():
        parts = line.split(" = ")
        for left, right in zip(parts, parts[1:]):
          lm, rm = _LEFT.search(left), _RIGHT.search(right)
          if lm and rm and re.search(r" [-+x÷/] ", lm.group(1)):
            assert abs(_value(lm.group(1)) - _value(rm.group(1))) < 1e-9, line
            checked += 1
  assert checked > 500


def _expected_output(snippet):
  """Expected printed lines: `print(...)  # out` comments, then `# out` lines after the code."""
  out = []
  lines = snippet.splitlines()
  for i, line in enumerate(lines):
    if line.startswith("print(") and "  # " in line:
      out.append(line.split("  # ", 1)[1])
    elif line.startswith("# ") and i > 3 and not lines[i - 1].startswith(("def ", "class ")):
      out.append(line[2:])
  return out


def test_hand_written_code_snippets_print_what_their_comments_say():
  with open(os.path.join(CORPUS, "src", "code_snippets.txt"), encoding="utf-8") as f:
    snippets = [s for s in f.read().split("=====\n") if s.strip()]
  assert len(snippets) >= 20
  for snippet in snippets:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      exec(snippet, {})  # pylint: disable=exec-used
    assert buf.getvalue().splitlines() == _expected_output(snippet), snippet[:80]
