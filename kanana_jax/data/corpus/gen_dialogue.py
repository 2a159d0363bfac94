"""Short everyday dialogues in English and Korean, with the numbers in them computed exactly."""
import random

import facts
from gen_math import NAMES_EN, NAMES_KO, josa

BAKERY = [("croissant", "크루아상", 3200), ("bagel", "베이글", 2800), ("muffin", "머핀", 3000),
          ("loaf of bread", "식빵", 4500), ("cream bun", "크림빵", 2000), ("red bean bun", "단팥빵", 1800),
          ("slice of cake", "조각 케이크", 5500), ("cookie", "쿠키", 1500)]
PLACES = [("library", "도서관"), ("subway station", "지하철역"), ("post office", "우체국"),
          ("hospital", "병원"), ("museum", "박물관"), ("bank", "은행"), ("park", "공원"),
          ("bus stop", "버스 정류장"), ("bookstore", "서점"), ("pharmacy", "약국")]
LANDMARKS = [("the convenience store", "편의점"), ("the bakery", "빵집"), ("the traffic light", "신호등"),
             ("the flower shop", "꽃집"), ("the school gate", "학교 정문"), ("the coffee shop", "카페")]
WEATHER = [("sunny", "맑", "Don't forget sunscreen.", "자외선 차단제를 꼭 바르세요."),
           ("rainy", "비가 오", "Take an umbrella with you.", "우산을 꼭 챙기세요."),
           ("cloudy", "흐리", "It might rain later, so a light jacket is a good idea.",
            "나중에 비가 올 수도 있으니 얇은 겉옷을 챙기면 좋겠어요."),
           ("snowy", "눈이 오", "Wear warm boots; the roads will be slippery.",
            "길이 미끄러우니 따뜻한 신발을 신으세요."),
           ("windy", "바람이 많이 불", "Hold on to your hat!", "모자가 날아가지 않게 조심하세요.")]
DAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DAYS_KO = ["월요일", "화요일", "수요일", "목요일", "금요일", "토요일", "일요일"]
BOOKS = [("The Little Prince", "어린 왕자"), ("Charlotte's Web", "샬롯의 거미줄"),
         ("A Brief History of Time", "시간의 역사"), ("The Old Man and the Sea", "노인과 바다"),
         ("Pride and Prejudice", "오만과 편견"), ("Robinson Crusoe", "로빈슨 크루소")]


def _a(noun: str) -> str:
  return ("an " if noun[0] in "aeiou" else "a ") + noun


def _pair_en(r):
  return [n for n, _ in r.sample(NAMES_EN, 2)]


def d_bakery(r, en):
  item_en, item_ko, price = r.choice(BAKERY)
  q = r.randint(1, 4)
  total = q * price
  paid = next(x for x in (5000, 10000, 20000, 50000) if x >= total)
  if en:
    return "\n".join([
        "Clerk: " + r.choice(["Hello! What can I get for you?", "Good morning! What would you like?",
                              "Hi there, what can I get you today?"]),
        f"Customer: I'd like {q} {item_en}{'s' if q > 1 and not item_en.startswith(('loaf', 'slice')) else ''}, please."
        .replace("loaf of breads", "loaves of bread").replace("slice of cakes", "slices of cake"),
        f"Clerk: Sure. That's {q} times {price:,} won, so {total:,} won in total.",
        f"Customer: Here is {paid:,} won.",
        f"Clerk: Thank you. Your change is {paid - total:,} won." if paid > total else
        "Clerk: Thank you, that's exactly right.",
        "Customer: " + r.choice(["Thanks, have a nice day!", "Thank you. Bye!", "Great, thanks a lot."])])
  return "\n".join([
      "점원: " + r.choice(["어서 오세요! 무엇을 드릴까요?", "안녕하세요, 뭐 찾으시는 거 있으세요?", "어서 오세요, 주문하시겠어요?"]),
      f"손님: {item_ko} {q}개 주세요.",
      f"점원: 네, {item_ko} 한 개에 {price:,}원이라서 모두 {total:,}원입니다.",
      f"손님: 여기 {paid:,}원 있어요.",
      f"점원: 감사합니다. 거스름돈 {paid - total:,}원 받으세요." if paid > total else "점원: 딱 맞게 주셨네요. 감사합니다.",
      "손님: " + r.choice(["수고하세요!", "감사합니다. 안녕히 계세요.", "잘 먹을게요!"])])


def d_directions(r, en):
  (pe, pk), (le, lk) = r.choice(PLACES), r.choice(LANDMARKS)
  blocks, turn, minutes = r.randint(1, 4), r.choice([("left", "왼쪽"), ("right", "오른쪽")]), r.randint(3, 15)
  if en:
    a, b = _pair_en(r)
    return "\n".join([
        f"{a}: Excuse me, how do I get to the {pe}?",
        f"{b}: Go straight for {blocks} block{'s' if blocks > 1 else ''} and turn {turn[0]} at {le}.",
        f"{a}: Is it far from here?",
        f"{b}: Not really. It's about a {minutes}-minute walk. You'll see it on your {turn[0]}.",
        f"{a}: Thank you so much!", f"{b}: You're welcome."])
  a, b = r.sample(NAMES_KO, 2)
  return "\n".join([
      f"{a}: 실례합니다. {pk}에 어떻게 가나요?",
      f"{b}: 이 길로 {blocks}블록 곧장 가다가 {lk}에서 {turn[1]}으로 도세요.",
      f"{a}: 여기서 먼가요?",
      f"{b}: 아니요, 걸어서 {minutes}분쯤 걸려요. {turn[1]}에 {josa(pk, '이/가')} 보일 거예요.",
      f"{a}: 정말 고맙습니다!", f"{b}: 천만에요."])


def d_weather(r, en):
  w_en, w_ko, tip_en, tip_ko = r.choice(WEATHER)
  lo = r.randint(-8, 20) if w_en != "snowy" else r.randint(-10, -1)
  hi = lo + r.randint(3, 10)
  if en:
    a, b = _pair_en(r)
    return "\n".join([
        f"{a}: What's the weather like today?",
        f"{b}: The forecast says it will be {w_en}, with a low of {lo} degrees and a high of {hi} degrees.",
        f"{a}: So the temperature will change by {hi - lo} degrees during the day.",
        f"{b}: That's right. {tip_en}"])
  a, b = r.sample(NAMES_KO, 2)
  return "\n".join([
      f"{a}: 오늘 날씨 어때요?",
      f"{b}: 일기 예보에서 오늘은 {w_ko}고, 최저 기온은 {lo}도, 최고 기온은 {hi}도래요.",
      f"{a}: 그럼 하루 동안 기온이 {hi - lo}도나 달라지네요.",
      f"{b}: 맞아요. {tip_ko}"])


def d_reservation(r, en):
  people, hour, day = r.randint(2, 8), r.randint(5, 8), r.randrange(7)
  if en:
    name, _ = r.choice(NAMES_EN)
    return "\n".join([
        "Staff: " + r.choice(["Good afternoon, Hanbit Restaurant. How can I help you?",
                              "Hello, this is Hanbit Restaurant.", "Thank you for calling Hanbit Restaurant."]),
        f"Caller: Hi, I'd like to book a table for {people} on {DAYS_EN[day]} at {hour} p.m.",
        f"Staff: Let me check. Yes, we have a table for {people} at {hour} o'clock. May I have your name?",
        f"Caller: It's {name}.",
        f"Staff: Thank you, {name}. Your table for {people} is booked for {DAYS_EN[day]} at {hour} p.m.",
        "Caller: " + r.choice(["Great, see you then.", "Thanks! Looking forward to it.", "Perfect, thank you."])])
  name = r.choice(NAMES_KO)
  return "\n".join([
      "직원: " + r.choice(["안녕하세요, 한빛 식당입니다. 무엇을 도와드릴까요?", "네, 한빛 식당입니다.",
                           "전화 주셔서 감사합니다. 한빛 식당입니다."]),
      f"손님: {DAYS_KO[day]} 저녁 {hour}시에 {people}명 자리를 예약하고 싶어요.",
      f"직원: 확인해 보겠습니다. 네, {hour}시에 {people}명 자리가 있습니다. 예약자 성함이 어떻게 되세요?",
      f"손님: {name}입니다.",
      f"직원: {name} 님, {DAYS_KO[day]} 저녁 {hour}시에 {people}명으로 예약되었습니다.",
      "손님: " + r.choice(["감사합니다. 그때 뵐게요.", "네, 고맙습니다.", "알겠습니다. 수고하세요."])])


def d_quiz(r, en):
  """A teacher asks three fact questions drawn from the fact tables."""
  lines = ["Teacher: Let's review. I'll ask three questions."] if en else ["선생님: 복습을 해 봅시다. 문제를 세 개 낼게요."]
  student = r.choice(NAMES_EN)[0] if en else r.choice(NAMES_KO)
  for _ in range(3):
    kind = r.randrange(4)
    if kind == 0:
      c = r.choice(facts.COUNTRIES)
      q, a = ((f"What is the capital of {c[0]}?", f"The capital of {c[0]} is {c[2]}.") if en else
              (f"{c[1]}의 수도는 어디인가요?", f"{c[1]}의 수도는 {c[3]}입니다."))
    elif kind == 1:
      e = r.choice(facts.ELEMENTS)
      q, a = ((f"What is the chemical symbol for {e[1]}?", f"It is {e[0]}, and its atomic number is {e[3]}.")
              if en else (f"{e[2]}의 원소 기호는 무엇인가요?", f"{e[0]}이고, 원자 번호는 {e[3]}번입니다."))
    elif kind == 2:
      p = r.choice(facts.PLANETS)
      ordinal = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth", 7: "seventh",
                 8: "eighth"}[p[2]]
      q, a = ((f"Which planet is {ordinal} from the Sun?", f"{p[0]} is {ordinal} from the Sun.") if en else
              (f"태양에서 {p[2]}번째로 가까운 행성은 무엇인가요?", f"{josa(p[1], '이/가')} {p[2]}번째 행성입니다."))
    else:
      x = r.choice(facts.ANIMALS)
      q, a = ((f"Is {_a(x[0])} a mammal, a bird, a reptile, an amphibian, a fish or something else?",
               f"{_a(x[0]).capitalize()} is {_a(x[2])}.") if en else
              (f"{josa(x[1], '은/는')} 어떤 동물 무리에 속하나요?", f"{josa(x[1], '은/는')} {x[3]}입니다."))
    lines += ([f"Teacher: {q}", f"{student}: {a}", "Teacher: Correct!"] if en else
              [f"선생님: {q}", f"{student}: {a}", "선생님: 정답이에요!"])
  return "\n".join(lines)


def d_library(r, en):
  (b_en, b_ko), day = r.choice(BOOKS), r.randrange(7)
  loan = r.choice([7, 10, 14, 21])
  due = (day + loan) % 7
  if en:
    name, _ = r.choice(NAMES_EN)
    return "\n".join([
        f"{name}: Hello, I'd like to borrow \"{b_en}\".",
        "Librarian: Sure. May I see your library card?",
        f"{name}: Here it is.",
        f"Librarian: Thank you. You can keep the book for {loan} days. Today is {DAYS_EN[day]}, so it is "
        f"due back on a {DAYS_EN[due]}.",
        f"{name}: What happens if I need it longer?",
        "Librarian: You can renew it once online, as long as no one else has reserved it."])
  name = r.choice(NAMES_KO)
  return "\n".join([
      f"{name}: 안녕하세요, '{b_ko}'{josa(b_ko, '을/를')[len(b_ko):]} 빌리고 싶어요.",
      "사서: 네, 도서관 회원증을 보여 주시겠어요?",
      f"{name}: 여기 있어요.",
      f"사서: 감사합니다. 이 책은 {loan}일 동안 빌릴 수 있어요. 오늘이 {DAYS_KO[day]}이니까 반납일은 {DAYS_KO[due]}이에요.",
      f"{name}: 더 오래 봐야 하면 어떻게 하나요?",
      "사서: 다른 사람이 예약하지 않았다면 인터넷으로 한 번 연장할 수 있어요."])


def d_tech(r, en):
  device_en, device_ko = r.choice([("laptop", "노트북"), ("phone", "휴대 전화"), ("tablet", "태블릿"),
                                   ("desktop computer", "컴퓨터")])
  if en:
    a, b = _pair_en(r)
    return "\n".join([
        f"{a}: My {device_en} has become really slow. Can you help?",
        f"{b}: Let's start simple. When did you last restart it?",
        f"{a}: Hmm, maybe two weeks ago.",
        f"{b}: Restart it first. Then check how much free storage you have; if the disk is almost full, delete "
        "files you no longer need.",
        f"{a}: It's faster now. Anything else?",
        f"{b}: Close apps you are not using, and install updates when they appear."])
  a, b = r.sample(NAMES_KO, 2)
  return "\n".join([
      f"{a}: 내 {josa(device_ko, '이/가')} 너무 느려졌어. 좀 도와줄래?",
      f"{b}: 간단한 것부터 해 보자. 마지막으로 다시 시작한 게 언제야?",
      f"{a}: 음, 2주 전쯤인 것 같아.",
      f"{b}: 먼저 다시 시작해 봐. 그리고 저장 공간이 얼마나 남았는지 확인해서 거의 꽉 찼으면 필요 없는 파일을 지워.",
      f"{a}: 이제 좀 빨라졌어. 또 할 일이 있을까?",
      f"{b}: 쓰지 않는 앱은 닫고, 업데이트가 나오면 설치해."])


def d_schedule(r, en):
  d1, d2 = sorted(r.sample(range(5), 2))
  h = r.randint(9, 16)
  length = r.choice([30, 45, 60, 90])
  end_h, end_m = divmod(h * 60 + length, 60)
  if en:
    a, b = _pair_en(r)
    return "\n".join([
        f"{a}: Can we meet this week to talk about the project?",
        f"{b}: I'm busy on {DAYS_EN[d1]}, but {DAYS_EN[d2]} works for me.",
        f"{a}: How about {DAYS_EN[d2]} at {h}:00? We'll need about {length} minutes.",
        f"{b}: Sounds good. So we'll finish around {end_h}:{end_m:02d}.",
        f"{a}: Perfect, I'll send you an invitation."])
  a, b = r.sample(NAMES_KO, 2)
  end_ko = f"{end_h}시" + (f" {end_m}분" if end_m else "")
  return "\n".join([
      f"{a}: 이번 주에 프로젝트 이야기를 하려고 하는데 만날 수 있어요?",
      f"{b}: {DAYS_KO[d1]}은 바쁘지만 {DAYS_KO[d2]}은 괜찮아요.",
      f"{a}: 그럼 {DAYS_KO[d2]} {h}시 어때요? {length}분 정도 걸릴 것 같아요.",
      f"{b}: 좋아요. 그럼 {end_ko}쯤 끝나겠네요.",
      f"{a}: 좋습니다. 초대 메일을 보낼게요."])


def d_travel(r, en):
  c = r.choice(facts.COUNTRIES[1:])
  days = r.randint(3, 10)
  budget = r.choice([50000, 80000, 100000, 120000])
  if en:
    a, b = _pair_en(r)
    return "\n".join([
        f"{a}: I'm going to {c[0]} next month!",
        f"{b}: Wonderful! Will you visit {c[2]}?",
        f"{a}: Yes, {c[2]} is the capital, so I'll spend {days} days there.",
        f"{b}: Do you know what money they use?",
        f"{a}: The {c[8]}. I plan to spend about {budget:,} won a day, which is {days * budget:,} won for "
        f"the whole stay.",
        f"{b}: And the language?",
        f"{a}: People there speak {c[6]}. I've been learning a few words."])
  a, b = r.sample(NAMES_KO, 2)
  return "\n".join([
      f"{a}: 나 다음 달에 {c[1]}에 가!",
      f"{b}: 멋지다! {c[3]}에도 가 봐?",
      f"{a}: 응, {josa(c[3], '이/가')} 수도라서 거기서 {days}일 동안 지낼 거야.",
      f"{b}: 거기서는 어떤 돈을 써?",
      f"{a}: {josa(c[9], '을/를')} 써. 하루에 {budget:,}원쯤 쓸 생각이니까 모두 {days * budget:,}원이 들겠어.",
      f"{b}: 말은 뭘 써?",
      f"{a}: {josa(c[7], '을/를')} 써. 요즘 인사말을 조금씩 배우고 있어."])


DIALOGUES = [d_bakery, d_directions, d_weather, d_reservation, d_quiz, d_library, d_tech, d_schedule,
             d_travel]


def dialogue_documents(seed: int, count: int) -> list[str]:
  """`count` dialogues, alternating English and Korean."""
  r = random.Random(seed)
  return [DIALOGUES[r.randrange(len(DIALOGUES))](r, i % 2 == 0) for i in range(count)]
