"""Math word problems with worked solutions, in English and Korean, computed exactly."""
import math
import random

NAMES_EN = [("Mina", "she"), ("Tom", "he"), ("Sara", "she"), ("Jisoo", "she"), ("Daniel", "he"),
            ("Emma", "she"), ("Leo", "he"), ("Hana", "she"), ("Noah", "he"), ("Olivia", "she"),
            ("Minjun", "he"), ("Grace", "she"), ("Ethan", "he"), ("Yuna", "she"), ("Lucas", "he")]
NAMES_KO = ["민수", "지은", "서연", "하준", "도윤", "수아", "지호", "예린", "민준", "서준", "하은", "유나",
            "태민", "소희", "준영"]
# (singular, plural, 한국어, 단위)
ITEMS = [("apple", "apples", "사과", "개"), ("pencil", "pencils", "연필", "자루"),
         ("notebook", "notebooks", "공책", "권"), ("cookie", "cookies", "쿠키", "개"),
         ("sticker", "stickers", "스티커", "장"), ("orange", "oranges", "귤", "개"),
         ("marble", "marbles", "구슬", "개"), ("book", "books", "책", "권"), ("egg", "eggs", "달걀", "개"),
         ("flower", "flowers", "꽃", "송이"), ("candy", "candies", "사탕", "개"),
         ("card", "cards", "카드", "장")]
_DIGIT_BATCHIM = {"0": True, "1": True, "2": False, "3": True, "4": False, "5": False, "6": True,
                  "7": True, "8": True, "9": False}


def has_batchim(word: str) -> bool:
  """Whether the last syllable of a Korean word (or digit) ends in a consonant."""
  c = word.rstrip()[-1]
  if "가" <= c <= "힣":
    return (ord(c) - 0xAC00) % 28 != 0
  return _DIGIT_BATCHIM.get(c, False)


def josa(word: str, pair: str) -> str:
  """word + the right particle of pair '이/가', '은/는', '을/를', '과/와', '으로/로', '이와/와'."""
  with_c, without_c = pair.split("/")
  if pair == "으로/로":
    c = word.rstrip()[-1]
    rieul = ("가" <= c <= "힣" and (ord(c) - 0xAC00) % 28 == 8) or c in "178"
    return word + ("로" if rieul or not has_batchim(word) else "으로")
  return word + (with_c if has_batchim(word) else without_c)


def _won(n: int) -> str:
  return f"{n:,}"


def p_buy(r, en):
  name, _ = r.choice(NAMES_EN)
  s, pl, ko, unit = r.choice(ITEMS)
  a, price = r.randint(2, 12), r.choice([100, 200, 250, 300, 500, 700, 800, 1000, 1200, 1500])
  total = a * price
  if en:
    return (f"{name} buys {a} {pl} at {_won(price)} won each. How much does {name} pay in total?",
            f"Each {s} costs {_won(price)} won, so {a} of them cost {a} x {_won(price)} = {_won(total)} won.",
            f"{_won(total)} won")
  name = r.choice(NAMES_KO)
  return (f"{josa(name, '이/가')} 한 {unit}에 {_won(price)}원인 {josa(ko, '을/를')} {a}{unit} 샀습니다. "
          f"모두 얼마를 내야 할까요?",
          f"{ko} 한 {unit}의 값이 {_won(price)}원이므로 {a}{unit}의 값은 {a} x {_won(price)} = {_won(total)}원입니다.",
          f"{_won(total)}원")


def p_give(r, en):
  s, pl, ko, unit = r.choice(ITEMS)
  a = r.randint(10, 60)
  b = r.randint(2, a - 3)
  c = r.randint(1, 15)
  left = a - b + c
  if en:
    (name, he), (friend, _) = r.sample(NAMES_EN, 2)
    return (f"{name} has {a} {pl}. {he.capitalize()} gives {b} of them to {friend} and then buys {c} more. "
            f"How many {pl} does {name} have now?",
            f"After giving some away, {name} has {a} - {b} = {a - b}. After buying more, {he} has "
            f"{a - b} + {c} = {left}.", f"{left} {pl}")
  name, friend = r.sample(NAMES_KO, 2)
  return (f"{josa(name, '은/는')} {josa(ko, '을/를')} {a}{unit} 가지고 있었습니다. 그중 {b}{josa(unit, '을/를')} "
          f"{friend}에게 주고, {c}{josa(unit, '을/를')} 더 샀습니다. 지금 {josa(name, '이/가')} 가진 "
          f"{josa(ko, '은/는')} 몇 {unit}일까요?",
          f"친구에게 주고 남은 것은 {a} - {b} = {a - b}{unit}이고, 더 산 뒤에는 {a - b} + {c} = {left}{unit}입니다.",
          f"{left}{unit}")


def p_share(r, en):
  s, pl, ko, unit = r.choice(ITEMS)
  k, q = r.randint(2, 9), r.randint(2, 12)
  total = k * q
  if en:
    name, _ = r.choice(NAMES_EN)
    return (f"{name} shares {total} {pl} equally among {k} friends. How many {pl} does each friend get?",
            f"Dividing {total} by {k} gives {total} / {k} = {q}.", f"{q} {pl if q > 1 else s}")
  name = r.choice(NAMES_KO)
  return (f"{josa(name, '이/가')} {ko} {total}{josa(unit, '을/를')} 친구 {k}명에게 똑같이 나누어 주려고 "
          f"합니다. 한 명에게 몇 {unit}씩 줄 수 있을까요?",
          f"{total}{josa(unit, '을/를')} {k}명으로 나누면 {total} ÷ {k} = {q}입니다.", f"{q}{unit}씩")


def p_teams(r, en):
  k = r.randint(3, 7)
  n = r.randint(2 * k + 1, 9 * k)
  teams, rest = divmod(n, k)
  if en:
    return (f"There are {n} students in a gym class. The teacher makes teams of {k}. How many full teams "
            f"are there, and how many students are left over?",
            f"{n} divided by {k} is {teams} with a remainder of {rest}, because {teams} x {k} = {teams * k} "
            f"and {n} - {teams * k} = {rest}.", f"{teams} teams, {rest} left over")
  return (f"체육 시간에 학생 {n}명이 {k}명씩 한 팀을 만들려고 합니다. 팀은 몇 개 만들 수 있고, 남는 학생은 몇 명일까요?",
          f"{n} ÷ {k}의 몫은 {teams}, 나머지는 {rest}입니다. {teams} x {k} = {teams * k}이고 {n} - {teams * k} = "
          f"{rest}이기 때문입니다.", f"{teams}팀, 남는 학생 {rest}명")


def p_speed(r, en):
  v, t = r.choice([40, 50, 60, 70, 80, 90, 100, 120, 150, 300]), r.randint(2, 6)
  d = v * t
  if en:
    vehicle = r.choice(["A train", "A bus", "A car", "A truck"])
    return (f"{vehicle} travels at {v} kilometers per hour for {t} hours. How far does it go?",
            f"Distance = speed x time = {v} x {t} = {d} kilometers.", f"{d} km")
  vehicle = r.choice(["기차", "버스", "자동차", "트럭"])
  return (f"{josa(vehicle, '이/가')} 시속 {v}킬로미터로 {t}시간 동안 달렸습니다. 모두 몇 킬로미터를 갔을까요?",
          f"거리 = 속력 x 시간 = {v} x {t} = {d}킬로미터입니다.", f"{d}km")


def p_rect(r, en):
  w, h = r.randint(3, 25), r.randint(3, 25)
  if en:
    place = r.choice(["garden", "room", "playground", "rug", "poster"])
    return (f"A rectangular {place} is {w} meters long and {h} meters wide. What are its area and its "
            f"perimeter?",
            f"Area = {w} x {h} = {w * h} square meters. Perimeter = 2 x ({w} + {h}) = {2 * (w + h)} meters.",
            f"area {w * h} m², perimeter {2 * (w + h)} m")
  place = r.choice(["꽃밭", "방", "운동장", "텃밭", "주차장"])
  return (f"가로가 {w}미터, 세로가 {h}미터인 직사각형 모양의 {josa(place, '이/가')} 있습니다. 넓이와 둘레는 각각 얼마일까요?",
          f"넓이는 {w} x {h} = {w * h}제곱미터이고, 둘레는 2 x ({w} + {h}) = {2 * (w + h)}미터입니다.",
          f"넓이 {w * h}m², 둘레 {2 * (w + h)}m")


def p_clock(r, en):
  h, m = r.randint(9, 20), r.choice([0, 10, 15, 20, 30, 40, 45, 50])
  d = r.choice([45, 70, 85, 90, 100, 115, 120, 135, 150])
  end = h * 60 + m + d
  eh, em = divmod(end, 60)
  dh, dm = divmod(d, 60)
  span_en = f"{dh} hour{'s' if dh > 1 else ''}" + (f" and {dm} minutes" if dm else "")
  span_ko = f"{dh}시간" + (f" {dm}분" if dm else "")
  start_ko, end_ko = f"{h}시" + (f" {m}분" if m else ""), f"{eh}시" + (f" {em}분" if em else "")
  if en:
    return (f"A movie starts at {h}:{m:02d} and lasts {d} minutes. At what time does it end?",
            f"{d} minutes is {span_en}. {h}:{m:02d} plus {span_en} is {eh}:{em:02d}.", f"{eh}:{em:02d}")
  return (f"영화가 {start_ko}에 시작하여 {d}분 동안 상영됩니다. 영화는 몇 시 몇 분에 끝날까요?",
          f"{d}분은 {span_ko}입니다. {start_ko}에 {span_ko}을 더하면 {end_ko}입니다.", end_ko)


def p_average(r, en):
  n = r.randint(3, 5)
  mean = r.randint(60, 95)
  scores = [mean + r.randint(-8, 8) for _ in range(n - 1)]
  scores.append(mean * n - sum(scores))
  total = sum(scores)
  listed = ", ".join(map(str, scores))
  if en:
    name, _ = r.choice(NAMES_EN)
    return (f"{name} scored {listed} on {n} tests. What is the average score?",
            f"The total is {' + '.join(map(str, scores))} = {total}, and {total} / {n} = {mean}.", f"{mean}")
  name = r.choice(NAMES_KO)
  return (f"{josa(name, '이/가')} 시험 {n}번에서 받은 점수는 {listed}점입니다. 평균 점수는 몇 점일까요?",
          f"점수의 합은 {' + '.join(map(str, scores))} = {total}이고, {total} ÷ {n} = {mean}입니다.", f"{mean}점")


def p_discount(r, en):
  price = r.choice([5000, 8000, 12000, 15000, 20000, 24000, 30000, 45000, 60000])
  pct = r.choice([10, 20, 25, 30, 40, 50])
  off = price * pct // 100
  if en:
    thing = r.choice(["jacket", "pair of shoes", "backpack", "lamp", "board game", "watch"])
    return (f"A {thing} costs {_won(price)} won. The shop gives a {pct} percent discount. What is the "
            f"price after the discount?",
            f"The discount is {pct}% of {_won(price)} = {_won(off)} won, so the price is "
            f"{_won(price)} - {_won(off)} = {_won(price - off)} won.", f"{_won(price - off)} won")
  thing = r.choice(["외투", "운동화", "가방", "전등", "보드게임", "손목시계"])
  return (f"{_won(price)}원인 {josa(thing, '을/를')} {pct}퍼센트 할인하여 판다고 합니다. 할인된 가격은 얼마일까요?",
          f"할인 금액은 {_won(price)}원의 {pct}%인 {_won(off)}원이므로 가격은 {_won(price)} - {_won(off)} = "
          f"{_won(price - off)}원입니다.", f"{_won(price - off)}원")


def p_age(r, en):
  a, d, z = r.randint(5, 40), r.randint(2, 30), r.randint(2, 10)
  if en:
    (x, _), (y, _) = r.sample(NAMES_EN, 2)
    return (f"{x} is {a} years old. {y} is {d} years older than {x}. How old will {y} be in {z} years?",
            f"{y} is {a} + {d} = {a + d} now, so in {z} years {y} will be {a + d} + {z} = {a + d + z}.",
            f"{a + d + z} years old")
  x, y = r.sample(NAMES_KO, 2)
  return (f"{josa(x, '은/는')} {a}살입니다. {josa(y, '은/는')} {x}보다 {d}살 많습니다. {z}년 뒤에 {josa(y, '은/는')} 몇 살이 될까요?",
          f"{y}의 지금 나이는 {a} + {d} = {a + d}살이므로 {z}년 뒤에는 {a + d} + {z} = {a + d + z}살입니다.",
          f"{a + d + z}살")


def p_change(r, en):
  (s1, p1, k1, u1), (s2, p2, k2, u2) = r.sample(ITEMS, 2)
  a, b = r.randint(1, 5), r.randint(1, 5)
  c1, c2 = r.choice([300, 500, 800, 1000, 1200]), r.choice([200, 400, 600, 1500, 2000])
  cost = a * c1 + b * c2
  paid = next(x for x in (5000, 10000, 20000, 50000) if x >= cost)
  if en:
    name, _ = r.choice(NAMES_EN)
    return (f"{name} buys {a} {p1 if a > 1 else s1} at {_won(c1)} won each and {b} {p2 if b > 1 else s2} at "
            f"{_won(c2)} won each, and pays with a {_won(paid)} won bill. How much change does {name} get?",
            f"The cost is {a} x {_won(c1)} + {b} x {_won(c2)} = {_won(a * c1)} + {_won(b * c2)} = {_won(cost)} "
            f"won. The change is {_won(paid)} - {_won(cost)} = {_won(paid - cost)} won.",
            f"{_won(paid - cost)} won")
  name = r.choice(NAMES_KO)
  return (f"{josa(name, '이/가')} 한 {u1}에 {_won(c1)}원인 {k1} {a}{josa(u1, '과/와')} 한 {u2}에 "
          f"{_won(c2)}원인 {k2} {b}{josa(u2, '을/를')} 사고 {_won(paid)}원을 냈습니다. 거스름돈은 얼마일까요?",
          f"물건값은 {a} x {_won(c1)} + {b} x {_won(c2)} = {_won(a * c1)} + {_won(b * c2)} = {_won(cost)}원입니다. "
          f"거스름돈은 {_won(paid)} - {_won(cost)} = {_won(paid - cost)}원입니다.", f"{_won(paid - cost)}원")


def p_pages(r, en):
  n, per = r.randint(80, 400), r.choice([12, 15, 20, 25, 30, 40])
  days = math.ceil(n / per)
  if en:
    name, he = r.choice(NAMES_EN)
    return (f"{name} reads {per} pages a day. The book has {n} pages. How many days does {he} need to "
            f"finish it?",
            f"{n} / {per} = {n / per:.2f}. {he.capitalize()} needs a whole day for the last pages too, so "
            f"the answer is rounded up to {days}." if n % per else
            f"{n} / {per} = {days}, so {he} finishes in exactly {days} days.", f"{days} days")
  name = r.choice(NAMES_KO)
  return (f"{josa(name, '은/는')} 하루에 {per}쪽씩 책을 읽습니다. 책이 {n}쪽이라면 다 읽는 데 며칠이 걸릴까요?",
          f"{n} ÷ {per} = {n / per:.2f}입니다. 남은 쪽을 읽는 데에도 하루가 필요하므로 올림하여 {days}일입니다."
          if n % per else f"{n} ÷ {per} = {days}이므로 꼭 {days}일이 걸립니다.", f"{days}일")


def p_equation(r, en):
  a, x, b = r.randint(2, 9), r.randint(1, 15), r.randint(1, 30)
  c = a * x + b
  if en:
    return (f"Solve for x: {a}x + {b} = {c}.",
            f"Subtract {b} from both sides: {a}x = {c - b}. Divide both sides by {a}: x = {x}.", f"x = {x}")
  return (f"다음 식을 만족하는 x의 값을 구하세요: {a}x + {b} = {c}",
          f"양변에서 {josa(str(b), '을/를')} 빼면 {a}x = {c - b}입니다. 양변을 {josa(str(a), '으로/로')} "
          f"나누면 x = {x}입니다.", f"x = {x}")


def p_convert(r, en):
  kind = r.randrange(3)
  if kind == 0:
    km = r.randint(2, 40) / 2
    q_en, q_ko = f"How many meters are in {km:g} kilometers?", f"{km:g}킬로미터는 몇 미터일까요?"
    s_en = f"One kilometer is 1,000 meters, so {km:g} x 1,000 = {int(km * 1000):,} meters."
    s_ko = f"1킬로미터는 1,000미터이므로 {km:g} x 1,000 = {int(km * 1000):,}미터입니다."
    ans = f"{int(km * 1000):,}"
    a_en, a_ko = ans + " m", ans + "m"
  elif kind == 1:
    h, m = r.randint(1, 5), r.choice([0, 15, 20, 30, 45])
    q_en, q_ko = f"How many minutes are in {h} hours and {m} minutes?", f"{h}시간 {m}분은 모두 몇 분일까요?"
    s_en = f"{h} x 60 + {m} = {h * 60 + m} minutes."
    s_ko = f"{h} x 60 + {m} = {h * 60 + m}분입니다."
    a_en, a_ko = f"{h * 60 + m} minutes", f"{h * 60 + m}분"
  else:
    kg, g = r.randint(1, 9), r.choice([100, 250, 400, 500, 750])
    q_en, q_ko = f"How many grams is {kg} kilograms {g} grams?", f"{kg}킬로그램 {g}그램은 몇 그램일까요?"
    s_en = f"{kg} x 1,000 + {g} = {kg * 1000 + g:,} grams."
    s_ko = f"{kg} x 1,000 + {g} = {kg * 1000 + g:,}그램입니다."
    a_en, a_ko = f"{kg * 1000 + g:,} g", f"{kg * 1000 + g:,}g"
  return (q_en, s_en, a_en) if en else (q_ko, s_ko, a_ko)


def p_savings(r, en):
  s = r.choice([2000, 3000, 5000, 7000, 10000])
  goal = s * r.randint(4, 15) + r.choice([0, 0, 1000, 2500])
  weeks = math.ceil(goal / s)
  if en:
    name, he = r.choice(NAMES_EN)
    return (f"{name} saves {_won(s)} won every week to buy something that costs {_won(goal)} won. After how "
            f"many weeks will {he} have enough?",
            f"{_won(goal)} / {_won(s)} = {goal / s:g}; rounding up gives {weeks} weeks "
            f"({weeks} x {_won(s)} = {_won(weeks * s)} won).", f"{weeks} weeks")
  name = r.choice(NAMES_KO)
  return (f"{josa(name, '은/는')} {_won(goal)}원짜리 물건을 사려고 매주 {_won(s)}원씩 모읍니다. 몇 주가 지나면 돈이 충분할까요?",
          f"{_won(goal)} ÷ {_won(s)} = {goal / s:g}이므로 올림하면 {weeks}주입니다. ({weeks} x {_won(s)} = "
          f"{_won(weeks * s)}원)", f"{weeks}주")


PROBLEMS = [p_buy, p_give, p_share, p_teams, p_speed, p_rect, p_clock, p_average, p_discount, p_age,
            p_change, p_pages, p_equation, p_convert, p_savings]


def drill(r, en):
  """A block of arithmetic facts."""
  lines = []
  for _ in range(r.randint(6, 10)):
    op = r.choice("+-x÷")
    a, b = r.randint(2, 99), r.randint(2, 99)
    if op == "+":
      lines.append(f"{a} + {b} = {a + b}")
    elif op == "-":
      a, b = max(a, b), min(a, b)
      lines.append(f"{a} - {b} = {a - b}")
    elif op == "x":
      a, b = r.randint(2, 19), r.randint(2, 12)
      lines.append(f"{a} x {b} = {a * b}")
    else:
      b, q = r.randint(2, 12), r.randint(2, 15)
      lines.append(f"{b * q} ÷ {b} = {q}")
  head = "Arithmetic practice:" if en else "계산 연습:"
  return head + "\n" + "\n".join(lines)


def math_documents(seed: int, count: int) -> list[str]:
  """`count` math documents (word problems with solutions, and drills), half English, half Korean."""
  r = random.Random(seed)
  docs = []
  for i in range(count):
    en = i % 2 == 0
    if r.random() < 0.12:
      docs.append(drill(r, en))
      continue
    parts = []
    for k in range(r.randint(1, 3)):
      q, sol, ans = r.choice(PROBLEMS)(r, en)
      if en:
        parts.append(f"Problem {k + 1}: {q}\nSolution: {sol}\nAnswer: {ans}")
      else:
        parts.append(f"문제 {k + 1}: {q}\n풀이: {sol}\n답: {ans}")
    docs.append("\n\n".join(parts))
  return docs
