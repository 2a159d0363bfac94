"""Math word problems (English and Korean) with numbered reasoning steps, a gold answer and a solution expression.

Each family draws its numbers, then writes the problem, the steps and `expr` (an expression that
kanana_jax.rewards.expr evaluates to the answer, the independent check at build). Steps write arithmetic
as `a × b = c` so verify.check_equations can recompute every equation. The last step ends with the answer.
"""
from __future__ import annotations

import dataclasses
import math
import random
from fractions import Fraction

from kanana_jax.data.synth.common import ITEMS, NAMES_EN, NAMES_KO, fmt, josa, won


@dataclasses.dataclass(frozen=True)
class MathItem:
  family: str
  lang: str
  numbers: tuple
  question: str
  steps: tuple[str, ...]
  answer: str  # canonical gold answer (fmt)
  expr: str  # evaluates to the answer

  @property
  def key(self) -> str:
    return f"math/{self.family}/" + ",".join(map(str, self.numbers))


def disp(x) -> str:
  """How a value is written in the steps: thousands separators from 1,000 on."""
  x = Fraction(x)
  return won(x) if x.denominator == 1 and abs(x) >= 1000 else fmt(x)


def _pick_names(r, n):
  return [p[0] for p in r.sample(NAMES_EN, n)], r.sample(NAMES_KO, n)


def two_items(r, lang):
  (s1, p1, k1, u1), (s2, p2, k2, u2) = r.sample(ITEMS, 2)
  a, b = r.randint(2, 9), r.randint(2, 9)
  pa, pb = r.choice([300, 450, 600, 700, 900, 1100, 1300]), r.choice([250, 400, 550, 800, 1200, 1600])
  ta, tb = a * pa, b * pb
  (ne,), (nk,) = _pick_names(r, 1)
  q = (f"{ne} buys {a} {p1} at {disp(pa)} won each and {b} {p2} at {disp(pb)} won each. How many won does {ne} "
       f"spend altogether?" if lang == "en" else
       f"{josa(nk, '이/가')} 한 {u1}에 {disp(pa)}원인 {k1} {a}{josa(u1, '과/와')} 한 {u2}에 {disp(pb)}원인 {k2} "
       f"{b}{josa(u2, '을/를')} 샀습니다. 모두 몇 원을 썼을까요?")
  steps = ([f"The {p1} cost {a} × {disp(pa)} = {disp(ta)} won.", f"The {p2} cost {b} × {disp(pb)} = {disp(tb)} won.",
            f"Altogether: {disp(ta)} + {disp(tb)} = {disp(ta + tb)} won."] if lang == "en" else
           [f"{k1} 값은 {a} × {disp(pa)} = {disp(ta)}원입니다.", f"{k2} 값은 {b} × {disp(pb)} = {disp(tb)}원입니다.",
            f"모두 더하면 {disp(ta)} + {disp(tb)} = {disp(ta + tb)}원입니다."])
  return MathItem("two_items", lang, (a, pa, b, pb), q, tuple(steps), fmt(ta + tb), f"{a}*{pa}+{b}*{pb}")


def change(r, lang):
  _, pl, ko, unit = r.choice(ITEMS)
  a, p = r.randint(2, 8), r.choice([350, 650, 850, 1250, 1450, 1800, 2400])
  cost = a * p
  bill = next(x for x in (5000, 10000, 20000, 50000) if x > cost)
  (ne,), (nk,) = _pick_names(r, 1)
  q = (f"{ne} buys {a} {pl} that cost {disp(p)} won each and pays with a {disp(bill)} won note. How much change, "
       f"in won, does {ne} get back?" if lang == "en" else
       f"{josa(nk, '은/는')} 한 {unit}에 {disp(p)}원인 {josa(ko, '을/를')} {a}{unit} 사고 {disp(bill)}원짜리 지폐를 냈습니다. "
       f"거스름돈은 몇 원일까요?")
  steps = ([f"The {pl} cost {a} × {disp(p)} = {disp(cost)} won.", f"The change is {disp(bill)} - {disp(cost)} = "
            f"{disp(bill - cost)} won."] if lang == "en" else
           [f"물건값은 {a} × {disp(p)} = {disp(cost)}원입니다.", f"거스름돈은 {disp(bill)} - {disp(cost)} = "
            f"{disp(bill - cost)}원입니다."])
  return MathItem("change", lang, (a, p, bill), q, tuple(steps), fmt(bill - cost), f"{bill}-{a}*{p}")


def leftover(r, lang):
  _, pl, ko, unit = r.choice(ITEMS)
  k = r.randint(4, 12)
  n = k * r.randint(3, 15) + r.randint(1, k - 1)
  full, rest = divmod(n, k)
  q = (f"There are {n} {pl}. They are packed into bags of {k}, filling as many bags as possible. How many {pl} "
       f"are left over?" if lang == "en" else
       f"{ko} {n}{josa(unit, '이/가')} 있습니다. 한 봉지에 {k}{unit}씩 담아 봉지를 최대한 많이 채우면 남는 {josa(ko, '은/는')} "
       f"몇 {unit}일까요?")
  steps = ([f"{full} bags hold {full} × {k} = {full * k} {pl}.", f"One more bag would need {full + 1} × {k} = "
            f"{(full + 1) * k}, which is more than {n}, so {full} bags are filled.",
            f"Left over: {n} - {full * k} = {rest}."] if lang == "en" else
           [f"{full}봉지에는 {full} × {k} = {full * k}{josa(unit, '이/가')} 들어갑니다.",
            f"한 봉지를 더 채우려면 {full + 1} × {k} = {(full + 1) * k}{josa(unit, '이/가')} 필요한데 {n}보다 많으므로 "
            f"{full}봉지만 채울 수 있습니다.", f"남는 것은 {n} - {full * k} = {rest}{unit}입니다."])
  return MathItem("leftover", lang, (n, k), q, tuple(steps), fmt(rest), f"{n}-{k}*floor({n}/{k})")


def trip_time(r, lang):
  v = r.choice([40, 48, 60, 64, 72, 80, 90, 96, 120])
  t = Fraction(r.choice([3, 4, 5, 6, 7, 8, 9, 10]), 2)
  d = v * t
  if d.denominator != 1:
    return None
  q = (f"A delivery van drives {fmt(d)} km at a steady {v} km/h. How many hours does the drive take?"
       if lang == "en" else f"배달 트럭이 시속 {v}km의 일정한 속력으로 {fmt(d)}km를 달립니다. 몇 시간이 걸릴까요?")
  steps = ([f"Time is distance divided by speed.", f"{fmt(d)} ÷ {v} = {fmt(t)} hours."] if lang == "en" else
           ["걸리는 시간은 거리를 속력으로 나눈 값입니다.", f"{fmt(d)} ÷ {v} = {fmt(t)}시간입니다."])
  return MathItem("trip_time", lang, (int(d), v), q, tuple(steps), fmt(t), f"{int(d)}/{v}")


def pond_area(r, lang):
  w, h = r.randint(8, 30), r.randint(8, 30)
  s = r.randint(2, min(w, h) - 3)
  q = (f"A park lawn is a rectangle {w} m long and {h} m wide. A square pond with sides of {s} m is dug in it. "
       f"What area of lawn, in square meters, is left?" if lang == "en" else
       f"가로 {w}m, 세로 {h}m인 직사각형 잔디밭 안에 한 변이 {s}m인 정사각형 연못을 만들었습니다. 남은 잔디밭의 넓이는 "
       f"몇 제곱미터일까요?")
  steps = ([f"The whole lawn is {w} × {h} = {w * h} square meters.", f"The pond takes {s} × {s} = {s * s} square meters.",
            f"Lawn left: {w * h} - {s * s} = {w * h - s * s} square meters."] if lang == "en" else
           [f"잔디밭 전체의 넓이는 {w} × {h} = {w * h}제곱미터입니다.", f"연못의 넓이는 {s} × {s} = {s * s}제곱미터입니다.",
            f"남은 넓이는 {w * h} - {s * s} = {w * h - s * s}제곱미터입니다."])
  return MathItem("pond_area", lang, (w, h, s), q, tuple(steps), fmt(w * h - s * s), f"{w}*{h}-{s}^2")


def percent_not(r, lang):
  p = r.choice([10, 20, 25, 30, 40, 45, 60, 75])
  n = r.choice([20, 40, 60, 80, 120, 160, 200, 240, 300, 360])
  yes = Fraction(n * p, 100)
  if yes.denominator != 1:
    return None
  club, club_ko = r.choice([("the chess club", "바둑부"), ("the choir", "합창부"), ("the robotics club", "로봇부"),
                            ("the swim team", "수영부")])
  q = (f"A school has {n} students, and {p}% of them belong to {club}. How many students do not belong to {club}?"
       if lang == "en" else f"어느 학교 학생 {n}명 중 {p}%가 {club_ko}에 들어 있습니다. {club_ko}에 들어 있지 않은 학생은 몇 명일까요?")
  steps = ([f"Members of {club}: {n} × {p} ÷ 100 = {yes}.", f"Students who are not members: {n} - {yes} = {n - yes}."]
           if lang == "en" else [f"{club_ko} 학생은 {n} × {p} ÷ 100 = {yes}명입니다.",
                                 f"들어 있지 않은 학생은 {n} - {yes} = {n - yes}명입니다."])
  return MathItem("percent_not", lang, (n, p), q, tuple(steps), fmt(n - yes), f"{n}-{n}*{p}/100")


def price_rise(r, lang):
  price = r.choice([2000, 3500, 4800, 6000, 7500, 12000, 16000, 25000, 32000])
  p = r.choice([5, 10, 15, 20, 30])
  inc = Fraction(price * p, 100)
  thing, thing_ko = r.choice([("bus pass", "버스 정기권"), ("lunch set", "점심 세트"), ("haircut", "머리 손질"),
                              ("movie ticket", "영화표"), ("pizza", "피자")])
  q = (f"A {thing} cost {disp(price)} won last year. This year the price went up by {p}%. What does it cost now, in "
       f"won?" if lang == "en" else
       f"작년에 {disp(price)}원이던 {thing_ko} 가격이 올해 {p}% 올랐습니다. 지금 가격은 몇 원일까요?")
  steps = ([f"The increase is {disp(price)} × {p} ÷ 100 = {disp(inc)} won.",
            f"The new price is {disp(price)} + {disp(inc)} = {disp(price + inc)} won."] if lang == "en" else
           [f"오른 금액은 {disp(price)} × {p} ÷ 100 = {disp(inc)}원입니다.",
            f"지금 가격은 {disp(price)} + {disp(inc)} = {disp(price + inc)}원입니다."])
  return MathItem("price_rise", lang, (price, p), q, tuple(steps), fmt(price + inc), f"{price}*(1+{p}/100)")


def mean_score(r, lang):
  n = r.randint(4, 5)
  mean = r.randint(62, 94)
  scores = [mean + r.randint(-7, 7) for _ in range(n - 1)]
  scores.append(mean * n - sum(scores))
  if not 0 <= scores[-1] <= 100:
    return None
  (ne,), (nk,) = _pick_names(r, 1)
  listed = ", ".join(map(str, scores[:-1])) + (f" and {scores[-1]}" if lang == "en" else f", {scores[-1]}")
  total = sum(scores)
  q = (f"{ne}'s quiz scores this term were {listed}. What is the mean score?" if lang == "en" else
       f"{nk}의 이번 학기 쪽지 시험 점수는 {listed}점입니다. 평균 점수는 몇 점일까요?")
  plus = " + ".join(map(str, scores))
  steps = ([f"Add the scores: {plus} = {total}.", f"Divide by the number of quizzes: {total} ÷ {n} = {mean}."]
           if lang == "en" else [f"점수를 모두 더하면 {plus} = {total}입니다.", f"시험 횟수로 나누면 {total} ÷ {n} = {mean}점입니다."])
  return MathItem("mean_score", lang, tuple(scores), q, tuple(steps), fmt(mean), f"({'+'.join(map(str, scores))})/{n}")


def parent_age(r, lang):
  a, k, z = r.randint(6, 15), r.randint(3, 5), r.randint(2, 9)
  (ne,), (nk,) = _pick_names(r, 1)
  q = (f"{ne} is {a} years old, and {ne}'s grandmother is {k} times as old. How old will the grandmother be in "
       f"{z} years?" if lang == "en" else
       f"{josa(nk, '은/는')} {a}살이고, 할머니의 나이는 {nk}의 {k}배입니다. {z}년 뒤에 할머니는 몇 살이 될까요?")
  steps = ([f"The grandmother is {a} × {k} = {a * k} now.", f"In {z} years she will be {a * k} + {z} = {a * k + z}."]
           if lang == "en" else [f"할머니의 지금 나이는 {a} × {k} = {a * k}살입니다.",
                                 f"{z}년 뒤에는 {a * k} + {z} = {a * k + z}살이 됩니다."])
  return MathItem("parent_age", lang, (a, k, z), q, tuple(steps), fmt(a * k + z), f"{a}*{k}+{z}")


def bracket_equation(r, lang):
  a, x, b = r.randint(2, 9), r.randint(-5, 20), r.randint(1, 12)
  c = a * (x - b)
  q = (f"Find x if {a}(x - {b}) = {c}." if lang == "en" else
       f"{a}(x - {b}) = {josa(str(c), '을/를')} 만족하는 x의 값을 구하세요.")
  steps = ([f"Divide both sides by {a}: x - {b} = {c} ÷ {a} = {x - b}.", f"Add {b} to both sides: x = {x - b} + {b} = {x}."]
           if lang == "en" else [f"양변을 {josa(str(a), '으로/로')} 나누면 x - {b} = {c} ÷ {a} = {x - b}입니다.",
                                 f"양변에 {josa(str(b), '을/를')} 더하면 x = {x - b} + {b} = {x}입니다."])
  return MathItem("bracket_equation", lang, (a, b, c), q, tuple(steps), fmt(x), f"{c}/{a}+{b}")


def elapsed(r, lang):
  h1, m1 = r.randint(6, 13), r.choice([5, 10, 20, 25, 35, 40, 50])
  d = r.randint(35, 300)
  s, e = h1 * 60 + m1, h1 * 60 + m1 + d
  h2, m2 = divmod(e, 60)
  if h2 > 22:
    return None
  en_t = lambda h, m: f"{h}:{m:02d}"  # noqa: E731
  ko_t = lambda h, m: f"{h}시 {m}분" if m else f"{h}시"  # noqa: E731
  q = (f"A hiking trip started at {en_t(h1, m1)} and ended at {en_t(h2, m2)} on the same day. How many minutes did "
       f"it last?" if lang == "en" else
       f"등산이 같은 날 {ko_t(h1, m1)}에 시작해서 {ko_t(h2, m2)}에 끝났습니다. 등산은 모두 몇 분 동안 했을까요?")
  steps = ([f"Start: {h1} × 60 + {m1} = {s} minutes after midnight.", f"End: {h2} × 60 + {m2} = {e} minutes after midnight.",
            f"Duration: {e} - {s} = {d} minutes."] if lang == "en" else
           [f"시작 시각은 자정부터 {h1} × 60 + {m1} = {s}분입니다.", f"끝난 시각은 자정부터 {h2} × 60 + {m2} = {e}분입니다.",
            f"걸린 시간은 {e} - {s} = {d}분입니다."])
  return MathItem("elapsed", lang, (h1, m1, h2, m2), q, tuple(steps), fmt(d), f"({h2}*60+{m2})-({h1}*60+{m1})")


def ratio_part(r, lang):
  a, b = r.sample(range(1, 8), 2)
  if math.gcd(a, b) != 1:
    return None
  one = r.randint(3, 15)
  n = (a + b) * one
  q = (f"A jar holds {n} red and blue beads in the ratio {a}:{b} (red to blue). How many blue beads are there?"
       if lang == "en" else f"병에 빨간 구슬과 파란 구슬이 {a}:{b}의 비율로 모두 {n}개 들어 있습니다. 파란 구슬은 몇 개일까요?")
  steps = ([f"The ratio has {a} + {b} = {a + b} parts.", f"One part is {n} ÷ {a + b} = {one} beads.",
            f"Blue beads: {b} × {one} = {b * one}."] if lang == "en" else
           [f"비율의 전체 부분은 {a} + {b} = {a + b}입니다.", f"한 부분은 {n} ÷ {a + b} = {one}개입니다.",
            f"파란 구슬은 {b} × {one} = {b * one}개입니다."])
  return MathItem("ratio_part", lang, (a, b, n), q, tuple(steps), fmt(b * one), f"{n}*{b}/({a}+{b})")


def fill_tank(r, lang):
  rate = r.choice([4, 5, 6, 8, 12, 15, 25])
  t = r.randint(6, 40)
  have = r.choice([10, 20, 30, 45, 50, 60])
  cap = have + rate * t
  q = (f"A water tank holds {cap} liters and already contains {have} liters. A pump adds {rate} liters per minute. "
       f"How many minutes until the tank is full?" if lang == "en" else
       f"{cap}L들이 물탱크에 물이 {have}L 들어 있습니다. 펌프로 1분에 {rate}L씩 물을 넣으면 몇 분 뒤에 가득 찰까요?")
  steps = ([f"Water still needed: {cap} - {have} = {cap - have} liters.", f"Time: {cap - have} ÷ {rate} = {t} minutes."]
           if lang == "en" else [f"더 필요한 물은 {cap} - {have} = {cap - have}L입니다.",
                                 f"걸리는 시간은 {cap - have} ÷ {rate} = {t}분입니다."])
  return MathItem("fill_tank", lang, (cap, have, rate), q, tuple(steps), fmt(t), f"({cap}-{have})/{rate}")


def spend_fractions(r, lang):
  a, b = r.choice([(2, 3), (3, 4), (4, 3), (4, 5), (5, 2), (3, 2), (2, 5)])
  m = a * b * r.choice([1000, 1500, 2000, 2500, 3000])
  s1 = m // a
  r1 = m - s1
  s2 = r1 // b
  left = r1 - s2
  (ne,), (nk,) = _pick_names(r, 1)
  q = (f"{ne} had {disp(m)} won. {ne} spent 1/{a} of it on a book and then 1/{b} of what was left on snacks. How many "
       f"won does {ne} have now?" if lang == "en" else
       f"{josa(nk, '은/는')} {disp(m)}원이 있었습니다. 그중 {a}분의 1로 책을 사고, 남은 돈의 {b}분의 1로 간식을 샀습니다. "
       f"지금 남은 돈은 몇 원일까요?")
  steps = ([f"The book cost {disp(m)} ÷ {a} = {disp(s1)} won.", f"Left after the book: {disp(m)} - {disp(s1)} = {disp(r1)} won.",
            f"The snacks cost {disp(r1)} ÷ {b} = {disp(s2)} won.", f"Left now: {disp(r1)} - {disp(s2)} = {disp(left)} won."]
           if lang == "en" else
           [f"책값은 {disp(m)} ÷ {a} = {disp(s1)}원입니다.", f"책을 사고 남은 돈은 {disp(m)} - {disp(s1)} = {disp(r1)}원입니다.",
            f"간식값은 {disp(r1)} ÷ {b} = {disp(s2)}원입니다.", f"지금 남은 돈은 {disp(r1)} - {disp(s2)} = {disp(left)}원입니다."])
  return MathItem("spend_fractions", lang, (m, a, b), q, tuple(steps), fmt(left), f"{m}*(1-1/{a})*(1-1/{b})")


def fence_square(r, lang):
  k = r.randint(4, 40)
  area = k * k
  q = (f"A square vegetable patch has an area of {area} square meters. How many meters of fence go all the way "
       f"around it?" if lang == "en" else
       f"넓이가 {area}제곱미터인 정사각형 텃밭이 있습니다. 텃밭 둘레에 울타리를 치려면 몇 m가 필요할까요?")
  steps = ([f"The side is {k} m, because {k} × {k} = {area}.", f"The fence is 4 × {k} = {4 * k} meters."]
           if lang == "en" else [f"{k} × {k} = {area}이므로 한 변은 {k}m입니다.", f"울타리의 길이는 4 × {k} = {4 * k}m입니다."])
  return MathItem("fence_square", lang, (area,), q, tuple(steps), fmt(4 * k), f"4*sqrt({area})")


def workshop(r, lang):
  w, c, d = r.randint(2, 9), r.randint(3, 12), r.randint(2, 6)
  thing, thing_ko = r.choice([("chairs", "의자"), ("kites", "연"), ("lamps", "전등"), ("birdhouses", "새집")])
  q = (f"In a workshop, each of {w} workers makes {c} {thing} a day. How many {thing} do they make in {d} days?"
       if lang == "en" else f"공방에서 일하는 {w}명이 각자 하루에 {thing_ko}을 {c}개씩 만듭니다. {d}일 동안 모두 몇 개를 만들까요?"
       .replace(f"{thing_ko}을", josa(thing_ko, "을/를")))
  steps = ([f"In one day they make {w} × {c} = {w * c} {thing}.", f"In {d} days: {w * c} × {d} = {w * c * d} {thing}."]
           if lang == "en" else [f"하루에 {w} × {c} = {w * c}개를 만듭니다.", f"{d}일 동안에는 {w * c} × {d} = {w * c * d}개를 만듭니다."])
  return MathItem("workshop", lang, (w, c, d), q, tuple(steps), fmt(w * c * d), f"{w}*{c}*{d}")


def unit_price(r, lang):
  _, pl, ko, unit = r.choice(ITEMS)
  a, b = r.sample([2, 3, 4, 5, 6, 8, 10], 2)
  each = r.choice([150, 250, 400, 600, 750, 900, 1200])
  pa = a * each
  q = (f"{a} {pl} cost {disp(pa)} won. At the same price each, how many won do {b} {pl} cost?" if lang == "en" else
       f"{ko} {a}{unit}의 값이 {disp(pa)}원입니다. 같은 값으로 {b}{unit}를 사면 몇 원일까요?".replace(
           f"{b}{unit}를", f"{b}{josa(unit, '을/를')}"))
  steps = ([f"One costs {disp(pa)} ÷ {a} = {disp(each)} won.", f"{b} cost {b} × {disp(each)} = {disp(b * each)} won."]
           if lang == "en" else [f"한 {unit}의 값은 {disp(pa)} ÷ {a} = {disp(each)}원입니다.",
                                 f"{b}{unit}의 값은 {b} × {disp(each)} = {disp(b * each)}원입니다."])
  return MathItem("unit_price", lang, (a, pa, b), q, tuple(steps), fmt(b * each), f"{pa}/{a}*{b}")


def ribbon(r, lang):
  piece = Fraction(r.choice([25, 40, 50, 75, 125]), 100)
  n = r.randint(4, 24)
  length = piece * n
  q = (f"A ribbon {fmt(length)} m long is cut into pieces of {fmt(piece)} m each. How many pieces are there?"
       if lang == "en" else f"길이가 {fmt(length)}m인 리본을 {fmt(piece)}m씩 잘랐습니다. 리본 조각은 몇 개일까요?")
  steps = ([f"Divide the length by the piece size: {fmt(length)} ÷ {fmt(piece)} = {n}."] if lang == "en" else
           [f"전체 길이를 한 조각의 길이로 나누면 {fmt(length)} ÷ {fmt(piece)} = {n}입니다."])
  return MathItem("ribbon", lang, (fmt(length), fmt(piece)), q, tuple(steps), fmt(n), f"{fmt(length)}/{fmt(piece)}")


def temperature(r, lang):
  t, a, b = -r.randint(2, 12), r.randint(5, 18), r.randint(2, 9)
  city, city_ko = r.choice([("Chuncheon", "춘천"), ("Cheorwon", "철원"), ("Pyeongchang", "평창"), ("Daegwallyeong", "대관령")])
  q = (f"In {city} it was {t} degrees Celsius at 6 a.m. By 2 p.m. it had warmed by {a} degrees, and by 9 p.m. it had "
       f"cooled by {b} degrees. What was the temperature at 9 p.m.?" if lang == "en" else
       f"{city_ko}의 오전 6시 기온은 {t}도였습니다. 오후 2시까지 {a}도 올랐다가 밤 9시까지 {b}도 내려갔습니다. 밤 9시의 기온은 몇 도일까요?")
  steps = ([f"At 2 p.m.: {t} + {a} = {t + a} degrees.", f"At 9 p.m.: {t + a} - {b} = {t + a - b} degrees."]
           if lang == "en" else [f"오후 2시 기온은 {t} + {a} = {t + a}도입니다.", f"밤 9시 기온은 {t + a} - {b} = {t + a - b}도입니다."])
  return MathItem("temperature", lang, (t, a, b), q, tuple(steps), fmt(t + a - b), f"{t}+{a}-{b}")


FAMILIES = [two_items, change, leftover, trip_time, pond_area, percent_not, price_rise, mean_score, parent_age,
            bracket_equation, elapsed, ratio_part, fill_tank, spend_fractions, fence_square, workshop, unit_price,
            ribbon, temperature]


def draw_item(r: random.Random, lang: str) -> MathItem | None:
  """One problem from a random family (None when the family's draw was rejected)."""
  return r.choice(FAMILIES)(r, lang)


def wrong_value(r: random.Random, item: MathItem):
  """A plausible wrong final answer: off by one, by ten, or doubled/halved."""
  gold = Fraction(item.answer.replace(",", "")) if "/" not in item.answer else Fraction(item.answer)
  options = [gold + 1, gold - 1, gold + 10, gold - 10, gold * 2]
  if gold.denominator == 1 and gold % 2 == 0:
    options.append(gold / 2)
  options = [o for o in options if o != gold and (o >= 0 or gold < 0)]
  return r.choice(options)


def with_wrong_answer(r: random.Random, item: MathItem) -> tuple[tuple[str, ...], str]:
  """Steps whose last result is replaced by a wrong value (a slip in the final step), and that value."""
  wrong = wrong_value(r, item)
  last = item.steps[-1]
  right_text = disp(Fraction(item.answer) if "/" in item.answer else Fraction(item.answer))
  pos = last.rfind(right_text)
  if pos < 0:
    raise ValueError(f"{item.key}: the last step {last!r} does not end with the answer {right_text!r}")
  return item.steps[:-1] + (last[:pos] + disp(wrong) + last[pos + len(right_text):],), fmt(wrong)
