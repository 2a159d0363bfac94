"""Builds the embedded corpus: python kanana_jax/data/corpus/build_corpus.py [--out DIR].

Inputs: hand-written text in src/ (encyclopedia paragraphs in English and Korean, code snippets)
and the fact tables in facts.py; generators expand them deterministically (fixed seeds) into
math word problems, dialogues, fact paragraphs, quizzes and code. Output: one JSONL file per
domain and split, `<domain>_{train,eval}.jsonl`, one {"text": ...} document per line; about 4%
of each domain's distinct documents (at least 2) are held out for eval. Re-running gives identical bytes.
"""
import argparse
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import facts  # pylint: disable=wrong-import-position
import gen_code  # pylint: disable=wrong-import-position
import gen_dialogue  # pylint: disable=wrong-import-position
import gen_math  # pylint: disable=wrong-import-position
from gen_math import josa  # pylint: disable=wrong-import-position

EVAL_FRACTION = 0.04
# (domain, number of generated documents)
COUNTS = {"math": 300, "dialogue": 200, "code": 140}


def _cap(s: str) -> str:
  return s[0].upper() + s[1:]


def _tail(word: str, pair: str) -> str:
  """Just the particle that follows `word`."""
  return josa(word, pair)[len(word):]


def read_paragraphs(path: str) -> list[str]:
  """Blocks separated by blank lines: a title line then the paragraph."""
  with open(path, encoding="utf-8") as f:
    blocks = f.read().strip().split("\n\n")
  return [b.strip() for b in blocks if b.strip()]


def read_snippets(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [s.strip("\n") for s in f.read().split("=====\n") if s.strip()]


def country_docs(r: random.Random) -> tuple[list[str], list[str]]:
  en, ko = [], []
  for c in facts.COUNTRIES:
    name, nko, cap, cko, cont, contko, lang, langko, cur, curko = c
    en.append(f"{_cap(name)}\n{_cap(name)} is a country in {cont}. Its capital city is {cap}. "
              f"The language{'s' if ' and ' in lang else ''} most widely used there "
              f"{'are' if ' and ' in lang else 'is'} {lang}, and the currency is the {cur}.")
    en.append(f"{cap}\n{cap} is the capital of {name}, a country in {cont}. Visitors to {cap} pay with the "
              f"{cur} and hear {lang} spoken around them.")
    ko.append(f"{nko}\n{josa(nko, '은/는')} {contko}에 있는 나라이다. 수도는 {cko}이고, 주로 "
              f"{josa(langko, '을/를')} 사용한다. 화폐 단위는 {curko}이다.")
    ko.append(f"{cko}\n{josa(cko, '은/는')} {contko}의 나라 {nko}의 수도이다. {nko}에서는 "
              f"{josa(curko, '을/를')} 화폐로 쓴다.")
  continents = {}
  for c in facts.COUNTRIES:
    continents.setdefault((c[4], c[5]), []).append(c)
  for (cont, contko), cs in continents.items():
    cs = sorted(cs, key=lambda c: r.random())
    en.append(f"Countries of {cont}\nSome countries in {cont} and their capitals: "
              + "; ".join(f"{c[0]}, capital {c[2]}" for c in cs) + ".")
    ko.append(f"{contko}의 나라들\n{contko}에 있는 몇몇 나라와 그 수도는 다음과 같다. "
              + ", ".join(f"{c[1]}의 수도는 {c[3]}" for c in cs) + ".")
  return en, ko


def element_docs() -> tuple[list[str], list[str]]:
  en, ko = [], []
  for sym, name, nko, z, cat, catko, state, stateko, note, noteko in facts.ELEMENTS:
    en.append(f"{_cap(name)}\n{_cap(name)}, with the symbol {sym}, is the chemical element with atomic number "
              f"{z}. It is {'an' if cat[0] in 'aeiou' else 'a'} {cat} and is a {state} at room temperature. {note}")
    ko.append(f"{nko}\n{nko}({sym}){_tail(nko, '은/는')} 원자 번호가 {z}번인 원소이다. {catko}에 속하며 "
              f"상온에서 {stateko} 상태로 존재한다. {noteko}")
  rows = facts.ELEMENTS[:20]
  en.append("The first twenty elements\nIn order of atomic number, the first twenty elements are "
            + ", ".join(f"{e[1]} ({e[0]})" for e in rows) + ".")
  ko.append("처음 스무 개의 원소\n원자 번호 순서대로 처음 스무 개의 원소는 "
            + ", ".join(f"{e[2]}({e[0]})" for e in rows) + "이다.")
  return en, ko


def planet_docs() -> tuple[list[str], list[str]]:
  ordinal = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
  en, ko = [], []
  for name, nko, n, kind, kindko, fact, factko in facts.PLANETS:
    en.append(f"{name}\n{name} is the {ordinal[n - 1]} planet from the Sun and is a {kind}. {fact}")
    ko.append(f"{nko}\n{josa(nko, '은/는')} 태양에서 {n}번째로 가까운 행성이며 {kindko}이다. {factko}")
  en.append("The Solar System\nThe eight planets, in order from the Sun, are "
            + ", ".join(p[0] for p in facts.PLANETS[:-1]) + f" and {facts.PLANETS[-1][0]}. The first four are "
            "small rocky planets; Jupiter and Saturn are gas giants; Uranus and Neptune are ice giants.")
  ko.append("태양계\n태양에서 가까운 순서대로 여덟 행성은 " + ", ".join(p[1] for p in facts.PLANETS)
            + "이다. 안쪽의 네 행성은 작은 암석 행성이고, 목성과 토성은 거대 기체 행성, 천왕성과 해왕성은 거대 얼음 행성이다.")
  return en, ko


def animal_docs() -> tuple[list[str], list[str]]:
  en, ko = [], []
  for name, nko, cls, clsko, diet, dietko, fact, factko in facts.ANIMALS:
    art = "an" if cls[0] in "aeiou" else "a"
    en.append(f"{_cap(name)}\nThe {name} is {art} {cls}. It mainly eats {diet}. {fact}")
    ko.append(f"{nko}\n{josa(nko, '은/는')} {clsko}에 속하는 동물이다. 주로 {josa(dietko, '을/를')} 먹는다. {factko}")
  return en, ko


def quiz_docs(r: random.Random, count: int, en: bool) -> list[str]:
  """Question-and-answer lists drawn from all the fact tables."""
  docs = []
  for _ in range(count):
    lines = ["Quiz" if en else "퀴즈"]
    for k in range(r.randint(4, 7)):
      t = r.randrange(5)
      if t == 0:
        c = r.choice(facts.COUNTRIES)
        q, a = (f"What is the capital of {c[0]}?", c[2]) if en else (f"{c[1]}의 수도는?", c[3])
      elif t == 1:
        c = r.choice(facts.COUNTRIES)
        q, a = (f"Which continent is {c[0]} in?", c[4]) if en else (f"{josa(c[1], '은/는')} 어느 대륙에 있나요?", c[5])
      elif t == 2:
        e = r.choice(facts.ELEMENTS)
        q, a = ((f"Which element has the symbol {e[0]}?", f"{e[1]}, atomic number {e[3]}") if en else
                (f"원소 기호가 {e[0]}인 원소는?", f"{e[2]}, 원자 번호 {e[3]}번"))
      elif t == 3:
        p = r.choice(facts.PLANETS)
        q, a = ((f"What kind of planet is {p[0]}?", f"a {p[3]}") if en else
                (f"{josa(p[1], '은/는')} 어떤 행성인가요?", p[4]))
      else:
        x = r.choice(facts.ANIMALS)
        q, a = ((f"What does the {x[0]} mainly eat?", x[4]) if en else
                (f"{josa(x[1], '은/는')} 주로 무엇을 먹나요?", x[5]))
      lines.append(f"Q{k + 1}. {q}\nA{k + 1}. {a}")
    docs.append("\n".join(lines))
  return docs


def build() -> dict[str, list[str]]:
  """All documents by domain."""
  r = random.Random(2024)
  src = os.path.join(HERE, "src")
  wiki_en = read_paragraphs(os.path.join(src, "encyclopedia_en.txt"))
  wiki_ko = read_paragraphs(os.path.join(src, "encyclopedia_ko.txt"))
  for make in (lambda: country_docs(r), element_docs, planet_docs, animal_docs):
    en, ko = make()
    wiki_en += en
    wiki_ko += ko
  wiki_en += quiz_docs(r, 60, en=True)
  wiki_ko += quiz_docs(r, 60, en=False)
  snippets = read_snippets(os.path.join(src, "code_snippets.txt"))
  return {
      "wiki_en": wiki_en,
      "wiki_ko": wiki_ko,
      "math": gen_math.math_documents(seed=7, count=COUNTS["math"]),
      "dialogue": gen_dialogue.dialogue_documents(seed=11, count=COUNTS["dialogue"]),
      "code": gen_code.code_documents(snippets, seed=13, count=COUNTS["code"]),
  }


def split(domain: str, docs: list[str]) -> tuple[list[str], list[str]]:
  """Deterministic held-out eval documents (EVAL_FRACTION of them, at least 2); duplicates dropped."""
  docs = list(dict.fromkeys(docs))
  k = max(2, round(EVAL_FRACTION * len(docs)))
  held = set(random.Random(f"eval:{domain}").sample(range(len(docs)), k))
  return ([d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held])


def write(out_dir: str) -> dict[str, int]:
  """Writes `<domain>_{train,eval}.jsonl` into out_dir; returns bytes written per file."""
  os.makedirs(out_dir, exist_ok=True)
  sizes = {}
  for domain, docs in build().items():
    for name, part in zip(("train", "eval"), split(domain, docs)):
      path = os.path.join(out_dir, f"{domain}_{name}.jsonl")
      data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in part)
      with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(data)
      sizes[os.path.basename(path)] = len(data.encode("utf-8"))
  return sizes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=HERE, help="output folder (default: next to this script)")
  args = parser.parse_args()
  sizes = write(args.out)
  for name, size in sorted(sizes.items()):
    print(f"{name:24s} {size / 1024:8.1f} KB")
  print(f"{'total':24s} {sum(sizes.values()) / 1024:8.1f} KB")


if __name__ == "__main__":
  main()
