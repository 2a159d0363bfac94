"""Instruction-following prompts (EN, KO) with constraints from rewards.ifeval.REGISTRY and long answers.

The answer is written first, from the sentences of a hand-written encyclopedia paragraph
(corpus/src/encyclopedia_*.txt): a body shape (plain text, paragraphs, bullets, numbered list, sections
or JSON), then modifiers (title, highlights, placeholders, start/end phrases, postscript, no commas,
letter case, quotation). Counting constraints (words, sentences, keyword frequency) take their numbers
from the finished answer, so it satisfies every constraint by construction; evaluate_instructions checks
it at build. `violate` makes an answer that breaks one constraint (for preference pairs).
"""
from __future__ import annotations

import hashlib
import json
import random
import re

from kanana_jax.data.synth.common import josa, read_paragraphs, sentences_of
from kanana_jax.rewards.ifeval import _words, evaluate_instructions, make_constraint

# eval-suite topics (moon, rainbow, coffee, tea, kimchi, Seoul, recycling, seasons) stay out
EXCLUDE = {"The Moon", "Rainbows", "Coffee", "Tea", "Kimchi", "Seoul", "Recycling", "Seasons",
           "달", "무지개", "김치", "서울", "재활용", "차", "계절"}
_PROPER = {"Hangul", "Jeju", "Island", "DNA", "Mount", "Everest", "Amazon", "Sahara", "Olympic", "Games", "Antarctica",
           "Hanok", "Taekwondo", "Gyeongju", "Sun", "Internet"}
TOPICS = {lang: [(t, sentences_of(p)) for t, p in read_paragraphs(lang) if t not in EXCLUDE] for lang in ("en", "ko")}
# held-out topics: per language, the 3 whose key hashes lowest (a rule of the key, the same for every dataset)
HELD_OUT = {t for lang in TOPICS for t in sorted((t for t, _ in TOPICS[lang]),
                                                 key=lambda t: hashlib.sha256(f"ifeval/{t}".encode()).hexdigest())[:3]}
FORBIDDEN = {"en": ["very", "really", "basically", "thing", "stuff", "amazing", "literally", "nice"],
             "ko": ["정말", "매우", "진짜", "아주", "너무", "굉장히"]}
PHRASES = {
    "start": {"en": ["Here is an overview.", "Sure, here you go.", "Great question.", "Let me explain."],
              "ko": ["좋은 질문입니다.", "다음과 같이 정리했습니다.", "간단히 설명해 드릴게요."]},
    "end": {"en": ["Thank you for reading.", "I hope this helps!", "That is the whole story.",
                   "Let me know if you want more details."],
            "ko": ["읽어 주셔서 감사합니다.", "도움이 되었기를 바랍니다.", "궁금한 점이 있으면 물어보세요."]},
    "ps": {"en": ["I can suggest a good book on this topic.", "Ask me anytime for more facts."],
           "ko": ["이 주제에 관한 좋은 책도 추천해 드릴 수 있어요.", "더 궁금한 점은 언제든 물어보세요."]},
}
PLACEHOLDERS = {"en": ("Join the talk on this topic at [place] on [date]; ask [name] for a seat.", 3),
                "ko": ("이 주제의 강연은 [날짜]에 [장소]에서 열리며, 자리는 [담당자]에게 문의하세요.", 3)}
TASKS = {"en": ["Write a short article about {t}.", "Explain {t} to a curious high-school student.",
                "Write an encyclopedia-style note on {t}.", "Describe {t} for a science newsletter."],
         "ko": ["{t}에 대해 짧은 글을 쓰세요.", "{t}에 대해 고등학생에게 설명하는 글을 쓰세요.",
                "{t}{j} 소개하는 백과사전식 글을 쓰세요.", "학교 소식지에 실을 {t} 이야기를 쓰세요."]}
SHAPES = ["plain", "plain", "paragraphs", "bullets", "numbered", "sections", "json"]
# constraint -> shapes it cannot go with (None: any) and other modifiers it excludes
_MODIFIERS = ["title", "highlights", "placeholders", "start", "end", "postscript", "no_comma", "lowercase",
              "uppercase", "quotation"]
_CLASH = {("title", "start"), ("title", "quotation"), ("start", "quotation"), ("end", "quotation"),
          ("postscript", "quotation"), ("end", "postscript"), ("postscript", "lowercase"), ("lowercase", "uppercase"),
          ("highlights", "quotation"), ("placeholders", "quotation")}
_SHAPE_BAN = {"json": set(_MODIFIERS), "paragraphs": {"postscript", "end", "quotation"},
              "bullets": {"quotation"}, "numbered": {"quotation"}, "sections": {"quotation"}}


def _topic_en(title: str) -> str:
  words = title.split()
  return " ".join(w if w in _PROPER else w.lower() for w in words)


def _groups(items: list[str], n: int) -> list[list[str]]:
  size, extra = divmod(len(items), n)
  out, i = [], 0
  for k in range(n):
    j = i + size + (k < extra)
    out.append(items[i:j])
    i = j
  return out


def _body(r, lang, shape, title, sents) -> tuple[str, list[dict], dict]:
  """(text, shape constraints, facts about the body) for one body shape."""
  if shape == "plain":
    return " ".join(sents), [], {}
  if shape == "paragraphs":
    n = r.randint(2, min(3, len(sents)))
    sep = r.choice(["\n\n", "\n\n***\n\n"])
    return sep.join(" ".join(g) for g in _groups(sents, n)), [{"id": "length:paragraphs", "kwargs": {"n": n}}], \
        {"sep": sep}
  if shape in ("bullets", "numbered"):
    n = r.randint(3, min(6, len(sents)))
    items = sents[:n]
    if shape == "bullets":
      return "\n".join(f"* {s}" for s in items), \
          [{"id": "format:bullets", "kwargs": {"n": n}}], {}
    return "\n".join(f"{i + 1}. {s}" for i, s in enumerate(items)), \
        [{"id": "format:numbered_list", "kwargs": {"n": n}}], {}
  if shape == "sections":
    n = r.randint(2, min(3, len(sents)))
    splitter = r.choice(["Section", "SECTION", "Part"] if lang == "en" else ["부분", "Section"])
    text = "\n\n".join(f"{splitter} {k + 1}\n" + " ".join(g) for k, g in enumerate(_groups(sents, n)))
    return text, [{"id": "format:sections", "kwargs": {"n": n, "splitter": splitter}}], {}
  data = {"topic": title, "facts": sents[:r.randint(3, len(sents))]}
  return json.dumps(data, ensure_ascii=False, indent=2), [{"id": "format:json", "kwargs": {}}], {}


def _pick_modifiers(r, lang, shape) -> list[str]:
  pool = [m for m in _MODIFIERS if m not in _SHAPE_BAN.get(shape, set())]
  if lang == "ko":
    pool = [m for m in pool if m not in ("lowercase", "uppercase")]
  if shape != "plain":
    pool = [m for m in pool if m != "quotation"]
  chosen: list[str] = []
  for m in r.sample(pool, len(pool)):
    if len(chosen) >= r.choice([1, 1, 2, 2, 3]):
      break
    if not any((m, c) in _CLASH or (c, m) in _CLASH for c in chosen):
      chosen.append(m)
  return chosen


def _keywords(r, lang, text, k) -> list[str]:
  """k words that occur in the text (content words; Korean ones without their particle)."""
  if lang == "en":
    cands = sorted({w.lower() for w in re.findall(r"[A-Za-z]{5,}", text)} - {"which", "there", "their", "about"})
  else:
    cands = sorted({re.sub(r"(은|는|이|가|을|를|의|에|에서|으로|로|과|와|도)$", "", w)
                    for w in re.findall(r"[가-힣]{3,}", text)})
    cands = [c for c in cands if len(c) >= 2]
  return r.sample(cands, min(k, len(cands)))


def _count(cid: str, text: str, relation: str = "exactly") -> int:
  for n in range(0, 400):
    if make_constraint(cid, {"n": n, "relation": relation}).check(text):
      return n
  raise ValueError(f"cannot count {cid} in {text[:80]!r}")


def make_task(r: random.Random, lang: str) -> dict | None:
  """One prompt with 2-4 constraints and an answer satisfying all of them (None when a draw is unusable)."""
  title, sents = r.choice(TOPICS[lang])
  shape = r.choice(SHAPES)
  text, cons, _ = _body(r, lang, shape, title, sents)
  mods = _pick_modifiers(r, lang, shape)
  tf = (lambda s: s.lower()) if "lowercase" in mods else (lambda s: s.upper()) if "uppercase" in mods else (lambda s: s)
  nc = (lambda s: re.sub(r",\s*", " ", s)) if "no_comma" in mods else (lambda s: s)
  fix = lambda s: tf(nc(s))  # noqa: E731  applied to the text and to every phrase put into it
  extra: dict = {}
  if "highlights" in mods:
    words = [w for w in dict.fromkeys(re.findall(r"[A-Za-z]{6,}" if lang == "en" else r"[가-힣]{3,}", text))][:3]
    for w in words:
      text = re.sub(rf"(?<![\w*]){re.escape(w)}(?![\w*])", f"*{w}*", text, count=1)
    extra["highlights"] = len(words)
  if "placeholders" in mods:
    sentence, n_ph = PLACEHOLDERS[lang]
    text = text + (" " if shape in ("plain", "paragraphs", "sections") else "\n") + sentence
    extra["placeholders"] = r.randint(1, n_ph)
  if "title" in mods:
    text = f"<<{title}>>\n{text}"
  if "start" in mods:
    extra["start"] = r.choice(PHRASES["start"][lang])
    text = extra["start"] + (" " if shape in ("plain", "paragraphs") else "\n") + text
  if "end" in mods:
    extra["end"] = r.choice(PHRASES["end"][lang])
    text = text + ("\n\n" if shape != "plain" else " ") + extra["end"]
  if "postscript" in mods:
    extra["marker"] = "P.S." if lang == "en" else r.choice(["P.S.", "추신:"])
    text = f"{text}\n\n{extra['marker']} {r.choice(PHRASES['ps'][lang])}"
  text = fix(text)
  if "quotation" in mods:
    text = f'"{text}"'
  add = {"title": ("format:title", {}), "no_comma": ("punctuation:no_comma", {}), "lowercase": ("case:lowercase", {}),
         "uppercase": ("case:uppercase", {}), "quotation": ("format:quotation", {}),
         "highlights": ("format:highlights", {"n": extra.get("highlights", 0)}),
         "placeholders": ("content:placeholders", {"n": extra.get("placeholders", 0)}),
         "start": ("starting:phrase", {"phrase": fix(extra.get("start", ""))}),
         "end": ("ending:phrase", {"phrase": fix(extra.get("end", ""))}),
         "postscript": ("content:postscript", {"marker": fix(extra.get("marker", "P.S."))})}
  cons += [{"id": add[m][0], "kwargs": add[m][1]} for m in mods]
  if extra.get("highlights") == 0:
    return None
  n_words = len(_words(text))
  counting = r.sample(["min_words", "max_words", "sentences", "include", "forbidden", "frequency", "language"],
                      r.randint(1, 2))
  for c in counting:
    if c == "min_words":
      cons.append({"id": "length:min_words", "kwargs": {"n": max(10, n_words // 10 * 10)}})
    elif c == "max_words":
      cons.append({"id": "length:max_words", "kwargs": {"n": (n_words // 10 + 2) * 10}})
    elif c == "sentences" and shape in ("plain", "paragraphs"):
      rel = r.choice(["exactly", "at least", "at most"])
      n = _count("length:sentences", text)
      cons.append({"id": "length:sentences", "kwargs": {"n": n + {"exactly": 0, "at least": -1, "at most": 1}[rel],
                                                        "relation": rel}})
    elif c == "include":
      cons.append({"id": "keywords:include", "kwargs": {"keywords": _keywords(r, lang, text, r.randint(1, 3))}})
    elif c == "forbidden":
      words = [w for w in FORBIDDEN[lang] if not make_constraint("keywords:include", {"keywords": [w]}).check(text)]
      cons.append({"id": "keywords:forbidden", "kwargs": {"words": r.sample(words, 2)}})
    elif c == "frequency":
      kw = _keywords(r, lang, text, 6)
      best = max(kw, key=lambda w: (_count_kw(text, w), w)) if kw else None
      if best and _count_kw(text, best) >= 2:
        cons.append({"id": "keywords:frequency", "kwargs": {"keyword": best, "n": _count_kw(text, best),
                                                             "relation": "at least"}})
    elif c == "language":
      cons.append({"id": "language:response", "kwargs": {"language": lang}})
  if len(cons) < 2 or not evaluate_instructions(text, cons).all_passed:
    return None
  topic = _topic_en(title) if lang == "en" else title
  task = r.choice(TASKS[lang]).format(t=topic, j=josa(topic, "을/를")[len(topic):])
  prompt = " ".join([task] + [instruction(c, lang) for c in cons])
  digest = hashlib.sha256(json.dumps(cons, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:10]
  # the split follows the topic (held-out topics are unseen in training); uid tells draws apart
  return {"key": f"ifeval/{title}", "uid": f"ifeval/{title}/{digest}", "held_out": title in HELD_OUT, "lang": lang,
          "prompt": prompt, "constraints": cons, "answer": text}


def _count_kw(text: str, word: str) -> int:
  for n in range(60, -1, -1):
    if make_constraint("keywords:frequency", {"keyword": word, "n": n, "relation": "at least"}).check(text):
      return n
  return 0


def _q(words: list[str], lang: str) -> str:
  quoted = [f"'{w}'" for w in words]
  if lang == "ko":
    return ", ".join(quoted)
  return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def instruction(c: dict, lang: str) -> str:
  """The prompt sentence that asks for constraint `c`."""
  k, en = c["kwargs"], lang == "en"
  rel_en = {"exactly": "exactly", "at least": "at least", "at most": "no more than"}
  rel_ko = {"exactly": "정확히 {n}문장으로", "at least": "{n}문장 이상으로", "at most": "{n}문장 이하로"}
  return {
      "length:min_words": lambda: f"Use at least {k.get('n')} words." if en else f"{k.get('n')}단어(어절) 이상으로 쓰세요.",
      "length:max_words": lambda: f"Use no more than {k.get('n')} words." if en else f"전체를 {k.get('n')}단어(어절) 이하로 쓰세요.",
      "length:sentences": lambda: (f"Write {rel_en[k['relation']]} {k['n']} sentences." if en else
                                   rel_ko[k["relation"]].format(n=k["n"]) + " 쓰세요."),
      "length:paragraphs": lambda: (f"Write exactly {k['n']} paragraphs separated by blank lines or by the markdown "
                                    "divider ***." if en else f"빈 줄이나 *** 구분선으로 나눈 {k['n']}개의 단락으로 쓰세요."),
      "keywords:include": lambda: (f"Include the keyword{'s' if len(k['keywords']) > 1 else ''} "
                                   f"{_q(k['keywords'], lang)}." if en else
                                   f"{_q(k['keywords'], lang)}라는 단어를 반드시 포함하세요."),
      "keywords:forbidden": lambda: (f"Do not use the words {_q(k['words'], lang).replace(' and ', ' or ')}." if en
                                     else f"{_q(k['words'], lang)}라는 단어는 쓰지 마세요."),
      "keywords:frequency": lambda: (f"Use the word '{k['keyword']}' at least {k['n']} times." if en else
                                     f"'{k['keyword']}'라는 말을 {k['n']}번 이상 쓰세요."),
      "format:json": lambda: ('Answer only with a JSON object with the keys "topic" and "facts".' if en else
                              '"topic"과 "facts" 키를 가진 JSON 객체로만 답하세요.'),
      "format:bullets": lambda: (f"Present it as exactly {k['n']} markdown bullet points (* item)." if en else
                                 f"정확히 {k['n']}개의 글머리 기호(* )로 정리하세요."),
      "format:numbered_list": lambda: (f"Format it as a numbered list with exactly {k['n']} items (1., 2., ...)." if en
                                       else f"1., 2., ... 형식의 번호 목록 {k['n']}개 항목으로 쓰세요."),
      "format:sections": lambda: (f"Divide it into {k['n']} sections, each opened by a line '{k['splitter']} X' where X "
                                  "is the section number." if en else
                                  f"'{k['splitter']} 1', '{k['splitter']} 2'처럼 시작하는 {k['n']}개의 부분으로 나누어 쓰세요."),
      "language:response": lambda: "Respond in English only." if en else "한국어로만 답하세요.",
      "ending:phrase": lambda: (f"End your response with the exact sentence: {k['phrase']}" if en else
                                f"답변의 마지막은 반드시 '{k['phrase']}'로 끝내세요."),
      "starting:phrase": lambda: f"Begin your response with: {k['phrase']}" if en else f"답변을 '{k['phrase']}'로 시작하세요.",
      "format:title": lambda: ("Give it a title in double angular brackets, such as <<my title>>." if en else
                               "<<제목>>처럼 이중 꺾쇠괄호로 감싼 제목을 붙이세요."),
      "case:lowercase": lambda: "Write everything in lowercase letters, with no capitals at all.",
      "case:uppercase": lambda: "Write the entire response in capital letters.",
      "punctuation:no_comma": lambda: "Do not use any commas." if en else "쉼표를 쓰지 마세요.",
      "content:placeholders": lambda: (f"Include at least {k['n']} placeholders in square brackets, like [date]." if en
                                       else f"[날짜]처럼 대괄호로 된 자리표시자를 {k['n']}개 이상 넣으세요."),
      "format:highlights": lambda: (f"Highlight at least {k['n']} key words with markdown, like *this*." if en else
                                    f"*이것*처럼 마크다운으로 강조한 부분을 {k['n']}개 이상 넣으세요."),
      "content:postscript": lambda: (f"Add a postscript at the end that starts with {k['marker']}" if en else
                                     f"마지막에 '{k['marker']}'로 시작하는 추신을 덧붙이세요."),
      "format:quotation": lambda: "Wrap your whole answer in double quotation marks." if en else "답변 전체를 큰따옴표로 감싸세요.",
  }[c["id"]]()


def _drop_sentences(text: str, word: str, keep: int) -> str:
  """The text without the sentences that mention `word`, except the first `keep` of them (lines kept apart)."""
  lines, seen = [], 0
  for line in text.split("\n"):
    kept = []
    for sent in re.split(r"(?<=[.!?])\s+", line):
      if word.lower() in sent.lower():
        seen += 1
        if seen > keep:
          continue
      kept.append(sent)
    if line.strip() and not " ".join(kept).strip(" *-0123456789.)"):
      continue  # a bullet or numbered line that lost its only sentence
    lines.append(" ".join(kept))
  return "\n".join(lines)


def _violators(text: str, c: dict, lang: str) -> str | None:
  k = c["kwargs"]
  cid = c["id"]
  if cid == "length:min_words":
    return text.split("\n")[0][:60]
  if cid == "length:max_words":
    return text + "\n\n" + text
  if cid == "length:sentences":
    return text + (" Many people find this topic fascinating." if lang == "en" else " 많은 사람이 이 주제를 흥미롭게 여깁니다.")
  if cid == "length:paragraphs":
    return re.sub(r"\n\s*(\*\*\*\s*\n\s*)?\n", " ", text)
  if cid == "keywords:include":
    return _drop_sentences(text, k["keywords"][0], keep=0)
  if cid == "keywords:forbidden":
    return text + " " + (f"It is {k['words'][0]} worth knowing." if lang == "en" else f"{k['words'][0]} 알아 둘 만합니다.")
  if cid == "keywords:frequency":
    return _drop_sentences(text, k["keyword"], keep=1)
  if cid == "format:json":
    return text.rstrip().rstrip("}")
  if cid in ("format:bullets", "format:numbered_list"):
    lines = text.split("\n")
    items = [i for i, line in enumerate(lines) if re.match(r"^\s*([*-]|\d+[.)])\s+\S", line)]
    return "\n".join(line for i, line in enumerate(lines) if i != items[-1]) if items else None
  if cid == "format:sections":
    return text.rsplit(f"{k['splitter']} {k['n']}", 1)[0].rstrip()
  if cid == "ending:phrase":
    return text + ("\nGoodbye." if lang == "en" else "\n안녕히 계세요.")
  if cid == "starting:phrase":
    return text.lstrip()[len(k["phrase"]):].lstrip()
  if cid == "format:title":
    return text.replace("<<", "").replace(">>", "")
  if cid == "case:lowercase":
    return re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
  if cid == "case:uppercase":
    return text[:1] + text[1:].lower()
  if cid == "punctuation:no_comma":
    return re.sub(r"(\S+) ", r"\1, ", text, count=1)
  if cid == "content:placeholders":
    return re.sub(r"\[([^\]]+)\]", r"\1", text)
  if cid == "format:highlights":
    return re.sub(r"\*(\S[^*\n]*?)\*", r"\1", text)
  if cid == "content:postscript":
    return "\n".join(line for line in text.split("\n") if not line.strip().startswith(k["marker"])).rstrip()
  if cid == "format:quotation":
    return text.strip().strip('"')
  return None


def violate(r: random.Random, task: dict) -> tuple[str, str]:
  """(an answer that breaks at least one constraint, the id of the constraint it was made to break)."""
  for c in r.sample(task["constraints"], len(task["constraints"])):
    bad = _violators(task["answer"], c, task["lang"])
    if bad and bad.strip() and not evaluate_instructions(bad, task["constraints"]).all_passed:
      return bad, c["id"]
  raise ValueError(f"no violation found for {task['key']}")
