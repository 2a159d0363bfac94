"""Multi-turn, multi-tool trajectories produced by really executing the calls in rewards.tools.ToolEnv.

A family writes the user turns and decides each assistant turn from the tool results it got back (the
price it looked up goes into the next calculator call), so every tool message holds what the
environment returned. Final answers put the answer number last (rewards.math extracts the last number).
"""
from __future__ import annotations

import copy
import random
from fractions import Fraction
from typing import Any

from kanana_jax.evals.suites import build_messages
from kanana_jax.generate.tool_calls import ToolCall
from kanana_jax.rewards.tools import TABLES, TOOLS, ToolEnv, _TABLE_ALIASES
from kanana_jax.data.synth.common import fmt, josa, won

KV = ["kv_set", "kv_get", "kv_delete", "kv_list"]
# product key -> (English plural, Korean name, Korean counter)
PRODUCTS = {"notebook": ("notebooks", "공책", "권"), "pen": ("pens", "펜", "자루"), "backpack": ("backpacks", "백팩", "개"),
            "water bottle": ("water bottles", "물병", "개"), "coffee mug": ("coffee mugs", "머그컵", "개"),
            "desk lamp": ("desk lamps", "책상 스탠드", "개"), "usb cable": ("USB cables", "USB 케이블", "개"),
            "headphones": ("headphones", "헤드폰", "개"), "umbrella": ("umbrellas", "우산", "개"),
            "t-shirt": ("t-shirts", "티셔츠", "장")}
COUNTRY_KO = {v: k for k, v in _TABLE_ALIASES.items() if not k.isascii() and k != "한국"}
CONTINENT_KO = {"Asia": "아시아", "Europe": "유럽", "North America": "북아메리카", "South America": "남아메리카",
                "Oceania": "오세아니아", "Africa": "아프리카"}
INSTRUCTIONS = "You are a helpful assistant. Use the tools to get exact results; do not guess values."


def _country(r, lang):
  key = r.choice(sorted(TABLES["countries"]))
  shown = " ".join(w.capitalize() for w in key.split()) if lang == "en" else COUNTRY_KO[key]
  return key, ("the " + shown if key in ("united states", "united kingdom") and lang == "en" else shown)


def _num(x) -> str:
  """A tool result number as the assistant writes it (thousands separators for integers)."""
  return won(x) if isinstance(x, int) and abs(x) >= 1000 else fmt(Fraction(str(x)))


class Episode:
  """A conversation whose tool calls run in a ToolEnv as they are written."""

  def __init__(self, tools: list[str], state: dict[str, Any] | None = None):
    self.tools = [t for t in TOOLS if t in set(tools)]
    self.initial_state = copy.deepcopy(state or {})
    self.env = ToolEnv(self.tools, self.initial_state)
    self.turns: list[dict] = []

  def user(self, text: str) -> None:
    self.turns.append({"role": "user", "content": text})

  def call(self, *calls: tuple[str, dict], content: str = "") -> list[Any]:
    self.turns.append({"role": "assistant", "content": content,
                       "tool_calls": [{"name": n, "arguments": a} for n, a in calls]})
    results = []
    for name, args in calls:
      resp = self.env.call(ToolCall(name, args))
      self.turns.append({"role": "tool", "name": resp.name, "content": resp.content})
      results.append(resp.content)
    return results

  def say(self, text: str) -> None:
    self.turns.append({"role": "assistant", "content": text})


def _task(key, lang, ep: Episode, answer=None, state=None, tolerance=None, hidden="") -> dict:
  """A task record; `key` holds what the first user turn shows (the split follows it), `hidden` the rest."""
  first = ep.turns[0]["content"]
  messages = build_messages("tools", {"tools": ep.tools, "initial_state": ep.initial_state, "prompt": first,
                                      "lang": lang}, ask_confidence=False)
  return {"key": key, "uid": f"{key}|{hidden}", "lang": lang, "prompt": first, "tools": ep.tools, "initial_state": ep.initial_state,
          "expected_answer": answer, "expected_state": state, "tolerance": tolerance,
          "messages": messages + ep.turns[1:]}


def shop_total(r, lang):
  p, n = r.choice(sorted(PRODUCTS)), r.randint(2, 15)
  pl, ko, unit = PRODUCTS[p]
  ep = Episode(["calculator", "table_lookup"])
  ep.user(f"I'd like {n} {pl} from the shop. Using the catalogue prices, what would they cost altogether in won?"
          if lang == "en" else f"상점에서 {ko} {n}{josa(unit, '을/를')} 사려고 해요. 카탈로그 가격으로 모두 몇 원인지 알려 주세요.")
  price = ep.call(("table_lookup", {"table": "products", "key": p, "column": "price_krw"}))[0]["value"]
  total = ep.call(("calculator", {"expression": f"{price} * {n}"}))[0]["result"]
  ep.say(f"One costs {won(price)} won, so {n} {pl} cost {won(total)} won." if lang == "en" else
         f"한 {unit}에 {won(price)}원이므로 {ko} {n}{unit}의 가격은 {won(total)}원입니다.")
  return _task(f"tool/shop_total/{p}/{n}", lang, ep, total)


def shop_two(r, lang):
  (p1, p2), n1, n2 = r.sample(sorted(PRODUCTS), 2), r.randint(1, 6), r.randint(1, 6)
  (pl1, ko1, u1), (pl2, ko2, u2) = PRODUCTS[p1], PRODUCTS[p2]
  ep = Episode(["calculator", "table_lookup"] + (["convert_units"] if r.random() < 0.3 else []))
  ep.user(f"For our club I need {n1} × {p1} and {n2} × {p2} from the catalogue. What is the total price in won?"
          if lang == "en" else f"동아리에서 쓸 {ko1} {n1}{josa(u1, '과/와')} {ko2} {n2}{josa(u2, '이/가')} 필요해요. 카탈로그 "
          f"가격으로 합계가 몇 원인가요?")
  a, b = [x["value"] for x in ep.call(("table_lookup", {"table": "products", "key": p1, "column": "price_krw"}),
                                      ("table_lookup", {"table": "products", "key": p2, "column": "price_krw"}))]
  total = ep.call(("calculator", {"expression": f"{a} * {n1} + {b} * {n2}"}))[0]["result"]
  ep.say(f"{n1} × {won(a)} + {n2} × {won(b)}: the total is {won(total)} won." if lang == "en" else
         f"{n1} × {won(a)} + {n2} × {won(b)}이므로 합계는 {won(total)}원입니다.")
  return _task(f"tool/shop_two/{p1}/{n1}/{p2}/{n2}", lang, ep, total)


def capital_store(r, lang):
  c, shown = _country(r, lang)
  slot = c.replace(" ", "_") + r.choice(["_capital", "_city", "_trip"])
  extra = {"owner": r.choice(["Mina", "Jun", "Sora"])} if r.random() < 0.5 else {}
  ep = Episode(["table_lookup"] + KV, extra)
  ep.user(f"Please look up the capital city of {shown} and keep it in the store under the key '{slot}'." if lang == "en"
          else f"{shown}의 수도를 찾아서 저장소의 '{slot}' 키에 넣어 주세요.")
  cap = ep.call(("table_lookup", {"table": "countries", "key": shown.removeprefix("the "), "column": "capital"}))[0]["value"]
  ep.call(("kv_set", {"key": slot, "value": cap}))
  ep.say(f"The capital of {shown} is {cap}; I saved it under '{slot}'." if lang == "en" else
         f"{shown}의 수도는 {cap}이며, '{slot}' 키에 저장했습니다.")
  return _task(f"tool/capital_store/{c}/{slot}", lang, ep, cap, {**extra, slot: cap}, hidden=str(extra))


_OPS = {"add": ("+", "Add", "더한"), "subtract": ("-", "Subtract the second from the first", "첫 번째에서 두 번째를 뺀"),
        "multiply": ("*", "Multiply", "곱한")}


def kv_arith(r, lang):
  k1, k2 = r.sample(["apples", "pears", "plums", "oranges", "melons", "grapes", "lemons"], 2)
  out = r.choice(["result", "answer", "combined", "total_fruit"])
  op = r.choice(sorted(_OPS))
  v1, v2 = r.randint(10, 400), r.randint(2, 99)
  sym, en_verb, ko_verb = _OPS[op]
  ep = Episode(["calculator"] + KV, {k1: v1, k2: v2, "unit": "boxes"})
  ep.user(f"The store holds two numbers, under '{k1}' and '{k2}'. {en_verb} them, save the result under '{out}' and "
          f"tell me the result." if lang == "en" else
          f"저장소의 '{k1}' 값과 '{k2}' 값을 {ko_verb} 결과를 '{out}' 키에 저장하고 결과를 알려 주세요.")
  a, b = [x["value"] for x in ep.call(("kv_get", {"key": k1}), ("kv_get", {"key": k2}))]
  res = ep.call(("calculator", {"expression": f"{a} {sym} {b}"}))[0]["result"]
  ep.call(("kv_set", {"key": out, "value": res}))
  ep.say(f"{a} {sym} {b} = {res}; saved under '{out}'. The result is {res}." if lang == "en" else
         f"{a} {sym} {b} = {res}이고 '{out}' 키에 저장했습니다. 결과는 {res}입니다.")
  return _task(f"tool/kv_arith/{k1}/{k2}/{op}/{out}", lang, ep, res, {k1: v1, k2: v2, "unit": "boxes", out: res},
               hidden=f"{v1},{v2}")


_CONVERSIONS = [("km", "mi", [5, 10, 21, 50, 100]), ("kg", "lb", [2, 5, 12, 70]), ("ft", "m", [6, 100, 330, 1000]),
                ("l", "gal", [4, 20, 50]), ("min", "h", [45, 90, 150, 400]), ("km/h", "m/s", [36, 90, 120])]


def convert_store(r, lang):
  src, dst, values = r.choice(_CONVERSIONS)
  v = r.choice(values)
  slot = r.choice(["converted", "distance_note", "measurement", "value_out"])
  ep = Episode(["convert_units"] + KV)
  ep.user(f"Convert {v} {src} to {dst} and store the converted number under the key '{slot}'." if lang == "en" else
          f"{v} {josa(src, '을/를')} {dst} 단위로 바꾸고, 바꾼 값을 '{slot}' 키에 저장해 주세요.")
  val = ep.call(("convert_units", {"value": v, "from_unit": src, "to_unit": dst}))[0]["value"]
  ep.call(("kv_set", {"key": slot, "value": val}))
  shown = f"{val:.2f}" if isinstance(val, float) else str(val)
  ep.say(f"I stored the exact value under '{slot}'; {v} {src} is about {shown} {dst}." if lang == "en" else
         f"정확한 값을 '{slot}' 키에 저장했습니다. {v}{src}는 약 {shown}{dst}입니다.")
  return _task(f"tool/convert_store/{src}/{dst}/{v}/{slot}", lang, ep, val, {slot: val}, 0.01)


def stock_gap(r, lang):
  p = r.choice(sorted(PRODUCTS))
  pl, ko, unit = PRODUCTS[p]
  stock = TABLES["products"][p]["stock"]
  want = stock + r.randint(5, 120)
  ep = Episode(["calculator", "table_lookup"])
  ep.user(f"A school wants to order {want} {pl}. How many more would the shop need beyond what it has in stock?"
          if lang == "en" else f"한 학교가 {ko} {want}{josa(unit, '을/를')} 주문하려고 합니다. 상점 재고보다 몇 {unit}가 더 필요한가요?")
  s = ep.call(("table_lookup", {"table": "products", "key": p, "column": "stock"}))[0]["value"]
  gap = ep.call(("calculator", {"expression": f"{want} - {s}"}))[0]["result"]
  ep.say(f"The shop has {s} in stock, so it needs {gap} more." if lang == "en" else
         f"재고가 {s}{unit}이므로 {gap}{unit}가 더 필요합니다.")
  return _task(f"tool/stock_gap/{p}/{want}", lang, ep, gap)


def move_key(r, lang):
  old, new = r.choice([("draft", "final"), ("tmp_title", "title"), ("city_old", "city"), ("nick", "nickname"),
                       ("todo", "done"), ("guest", "member")])
  val = r.choice(["Kanana", "Busan", "blue", "42 Jeju-ro", "Minji", "report v2"])
  keep = {"lang": r.choice(["ko", "en"])}
  ep = Episode(KV, {old: val, **keep})
  ep.user(f"Move the value stored under '{old}' to the key '{new}'; '{old}' should not exist afterwards." if lang == "en"
          else f"'{old}' 키에 있는 값을 '{new}' 키로 옮기고, '{old}' 키는 지워 주세요.")
  got = ep.call(("kv_get", {"key": old}))[0]["value"]
  ep.call(("kv_set", {"key": new, "value": got}), ("kv_delete", {"key": old}))
  ep.say(f"Done: '{new}' now holds {got!r} and '{old}' is deleted." if lang == "en" else
         f"완료했습니다. 이제 '{new}' 키에 {got!r} 값이 있고 '{old}' 키는 삭제되었습니다.")
  return _task(f"tool/move_key/{old}/{new}", lang, ep, None, {new: val, **keep}, hidden=f"{val}/{keep['lang']}")


def cleanup(r, lang):
  prefix = r.choice(["tmp_", "old_", "test_", "draft_"])
  tmp = [f"{prefix}{w}" for w in r.sample(["a", "b", "cache", "notes", "log", "x"], r.randint(1, 3))]
  kept = r.sample(["name", "city", "score", "theme", "level"], r.randint(1, 3))
  state = {k: r.randint(1, 9) for k in sorted(tmp + kept)}
  ep = Episode(KV, state)
  ep.user(f"Delete every key whose name starts with '{prefix}' from the store, then tell me how many keys remain."
          if lang == "en" else f"저장소에서 이름이 '{prefix}'로 시작하는 키를 모두 지우고, 남은 키가 몇 개인지 알려 주세요.")
  keys = ep.call(("kv_list", {}))[0]["keys"]
  ep.call(*[("kv_delete", {"key": k}) for k in keys if k.startswith(prefix)])
  left = ep.call(("kv_list", {}))[0]["keys"]
  ep.say(f"I deleted {len(keys) - len(left)} temporary keys. Keys left: {len(left)}." if lang == "en" else
         f"임시 키 {len(keys) - len(left)}개를 지웠습니다. 남은 키는 {len(left)}개입니다.")
  return _task(f"tool/cleanup/{prefix}", lang, ep, len(left), {k: v for k, v in state.items()
                                                                 if not k.startswith(prefix)}, hidden=str(state))


def dial_code(r, lang):
  c, shown = _country(r, lang)
  ep = Episode(["table_lookup"] + KV)
  ep.user(f"I have to phone a hotel in {shown}. Find the international calling code and save it as 'dial_code'." if lang
          == "en" else f"{shown}에 있는 호텔에 전화해야 해요. 국가 전화 코드를 찾아서 'dial_code' 키에 저장해 주세요.")
  code = ep.call(("table_lookup", {"table": "countries", "key": shown.removeprefix("the "), "column": "calling_code"}))[0]["value"]
  ep.call(("kv_set", {"key": "dial_code", "value": code}))
  ep.say(f"Saved under 'dial_code'. The calling code of {shown} is +{code}." if lang == "en" else
         f"'dial_code' 키에 저장했습니다. {shown}의 국가 전화 코드는 +{code}입니다.")
  return _task(f"tool/dial_code/{c}", lang, ep, code, {"dial_code": code})


def shipping_kg(r, lang):
  p, n = r.choice(sorted(PRODUCTS)), r.randint(2, 24)
  pl, ko, unit = PRODUCTS[p]
  ep = Episode(["calculator", "convert_units", "table_lookup"])
  ep.user(f"What would {n} {pl} from the catalogue weigh for shipping, in kilograms?" if lang == "en" else
          f"카탈로그의 {ko} {n}{unit}를 배송하면 무게가 몇 킬로그램인가요?".replace(f"{n}{unit}를", f"{n}{josa(unit, '을/를')}"))
  w = ep.call(("table_lookup", {"table": "products", "key": p, "column": "weight_g"}))[0]["value"]
  grams = ep.call(("calculator", {"expression": f"{w} * {n}"}))[0]["result"]
  kg = ep.call(("convert_units", {"value": grams, "from_unit": "g", "to_unit": "kg"}))[0]["value"]
  ep.say(f"Each weighs {w} g, so {n} weigh {_num(grams)} g, which is {_num(kg)} kg." if lang == "en" else
         f"하나에 {w}g이므로 {n}{unit}는 {_num(grams)}g이고, 이는 {_num(kg)}kg입니다.")
  return _task(f"tool/shipping_kg/{p}/{n}", lang, ep, kg)


def budget_cut(r, lang):
  slot = r.choice(["savings", "allowance", "food_budget", "travel_fund"])
  amount, pct = r.choice([50000, 120000, 200000, 360000, 800000]), r.choice([5, 10, 20, 25, 40])
  ep = Episode(["calculator"] + KV, {slot: amount})
  ep.user(f"Lower the amount stored under '{slot}' by {pct}% and save the new amount under the same key. What is it "
          f"now?" if lang == "en" else f"'{slot}' 키에 저장된 금액을 {pct}% 줄여서 같은 키에 다시 저장하고, 새 금액을 알려 주세요.")
  old = ep.call(("kv_get", {"key": slot}))[0]["value"]
  new = ep.call(("calculator", {"expression": f"{old} * (1 - {pct} / 100)"}))[0]["result"]
  ep.call(("kv_set", {"key": slot, "value": new}))
  ep.say(f"{won(old)} reduced by {pct}% is {won(new)}, and it is saved. New amount: {won(new)}." if lang == "en" else
         f"{won(old)}에서 {pct}%를 줄이면 {won(new)}이며 저장했습니다. 새 금액은 {won(new)}입니다.")
  return _task(f"tool/budget_cut/{slot}/{pct}", lang, ep, new, {slot: new}, hidden=str(amount))


def recover_average(r, lang):
  total_key, count_key = r.choice([("score_total", "score_count"), ("sales_sum", "sales_days"),
                                   ("steps_sum", "steps_days")])
  count = r.randint(2, 12)
  total = count * r.randint(20, 900)
  ep = Episode(["calculator"] + KV, {total_key: total, count_key: count})
  ep.user(f"The store has a total and a count for my {total_key.split('_')[0]}. What is the average?" if lang == "en"
          else f"저장소에 {total_key.split('_')[0]}의 합계와 개수가 있어요. 평균은 얼마인가요?")
  ep.call(("kv_get", {"key": "total"}))  # a guess that fails; the error result lists the keys
  ep.call(("kv_list", {}), content="That key does not exist; let me list the keys." if lang == "en" else
          "그 키는 없네요. 키 목록을 확인하겠습니다.")
  t, c = [x["value"] for x in ep.call(("kv_get", {"key": total_key}), ("kv_get", {"key": count_key}))]
  avg = ep.call(("calculator", {"expression": f"{t} / {c}"}))[0]["result"]
  ep.say(f"The total is {t} over {c} entries, so the average is {avg}." if lang == "en" else
         f"합계가 {t}이고 개수가 {c}이므로 평균은 {avg}입니다.")
  return _task(f"tool/recover_average/{total_key}", lang, ep, avg, hidden=f"{total}/{count}")


def price_then_save(r, lang):
  p = r.choice(sorted(PRODUCTS))
  pl, ko, unit = PRODUCTS[p]
  slot = r.choice(["price", "quote", "last_price"])
  ep = Episode(["table_lookup"] + KV)
  ep.user(f"How much is a single {p} in the shop catalogue?" if lang == "en" else
          f"상점 카탈로그에서 {ko} 한 {unit}의 가격은 얼마인가요?")
  price = ep.call(("table_lookup", {"table": "products", "key": p, "column": "price_krw"}))[0]["value"]
  ep.say(f"A {p} costs {won(price)} won." if lang == "en" else f"{ko} 한 {unit}의 가격은 {won(price)}원입니다.")
  ep.user(f"Thanks. Please save that price under '{slot}'." if lang == "en" else f"고마워요. 그 가격을 '{slot}' 키에 저장해 주세요.")
  ep.call(("kv_set", {"key": slot, "value": price}))
  ep.say(f"Saved under '{slot}': {won(price)} won." if lang == "en" else f"'{slot}' 키에 저장했습니다: {won(price)}원.")
  return _task(f"tool/price_then_save/{p}", lang, ep, price, {slot: price}, hidden=slot)


def continent(r, lang):
  c, shown = _country(r, lang)
  ep = Episode(["table_lookup"] + (["calculator"] if r.random() < 0.4 else []))
  ep.user(f"On which continent is {shown}? Please check the countries table." if lang == "en" else
          f"{josa(shown, '은/는')} 어느 대륙에 있나요? 국가 표에서 확인해 주세요.")
  cont = ep.call(("table_lookup", {"table": "countries", "key": shown.removeprefix("the "), "column": "continent"}))[0]["value"]
  ep.say(f"{shown[0].upper() + shown[1:]} is in {cont}." if lang == "en" else
         f"{josa(shown, '은/는')} {CONTINENT_KO[cont]}({cont})에 있습니다.")
  return _task(f"tool/continent/{c}", lang, ep, [cont, CONTINENT_KO[cont]])


def price_difference(r, lang):
  p1, p2 = r.sample(sorted(PRODUCTS), 2)
  a, b = TABLES["products"][p1]["price_krw"], TABLES["products"][p2]["price_krw"]
  if a == b:
    return None
  ko1, ko2 = PRODUCTS[p1][1], PRODUCTS[p2][1]
  ep = Episode(["calculator", "table_lookup"])
  ep.user(f"Which costs more in the catalogue, a {p1} or a {p2}, and by how many won?" if lang == "en" else
          f"카탈로그에서 {josa(ko1, '과/와')} {ko2} 중 어느 것이 더 비싸고, 몇 원 더 비싼가요?")
  x, y = [v["value"] for v in ep.call(("table_lookup", {"table": "products", "key": p1, "column": "price_krw"}),
                                      ("table_lookup", {"table": "products", "key": p2, "column": "price_krw"}))]
  hi, lo, name = (x, y, p1 if lang == "en" else ko1) if x > y else (y, x, p2 if lang == "en" else ko2)
  diff = ep.call(("calculator", {"expression": f"{hi} - {lo}"}))[0]["result"]
  ep.say(f"The {name} is more expensive: {won(hi)} - {won(lo)} = {won(diff)} won." if lang == "en" else
         f"{josa(name, '이/가')} 더 비쌉니다. {won(hi)} - {won(lo)} = {won(diff)}원 더 비쌉니다.")
  return _task(f"tool/price_difference/{p1}/{p2}", lang, ep, diff)


FAMILIES = [shop_total, shop_two, capital_store, kv_arith, convert_store, stock_gap, move_key, cleanup, dial_code,
            shipping_kg, budget_cut, recover_average, price_then_save, continent, price_difference]


def draw_task(r: random.Random, lang: str) -> dict | None:
  return r.choice(FAMILIES)(r, lang)


def reference_steps(task: dict) -> list[dict]:
  """The assistant turns in the eval suite's `reference` form: [{'content', 'calls': [{'name', 'arguments'}]}]."""
  return [{"content": m["content"], "calls": m.get("tool_calls", [])}
          for m in task["messages"] if m["role"] == "assistant"]
