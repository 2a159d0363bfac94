"""Python code documents whose printed results are computed by running the code at build time."""
import contextlib
import io
import random

WORDS = ["apple", "river", "cloud", "tiger", "piano", "garden", "rocket", "window", "coffee", "forest",
         "hangul", "seoul", "python", "matrix", "planet", "summer", "pencil", "bridge"]
SENTENCES = ["the quick brown fox jumps over the lazy dog", "practice makes perfect",
             "data flows through the pipeline", "every cloud has a silver lining",
             "small steps lead to big changes", "keep your code simple and clear"]


def _run(code: str) -> str:
  """Executes `code` and returns what it printed."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(code, {})  # pylint: disable=exec-used
  return out.getvalue()


def _expr(r) -> str:
  """A random Python expression whose value is worth showing."""
  nums = [r.randint(-20, 99) for _ in range(r.randint(3, 7))]
  w = r.choice(WORDS)
  s = r.choice(SENTENCES)
  a, b = r.randint(2, 60), r.randint(2, 9)
  choices = [
      f"sum({nums})", f"max({nums})", f"min({nums})", f"sorted({nums})", f"sorted({nums}, reverse=True)",
      f"len({nums})", f"{nums}[::-1]", f"{nums}[1:4]", f"[x * 2 for x in {nums}]",
      f"[x for x in {nums} if x % 2 == 0]", f"{a} // {b}", f"{a} % {b}", f"divmod({a}, {b})",
      f"{b} ** {r.randint(2, 5)}", f"round({a} / {b}, 3)", f"abs({-a})", f"{w!r}.upper()",
      f"{w!r}.capitalize()", f"{w!r}[::-1]", f"len({w!r})", f"{w!r}.count({w[0]!r})", f"{s!r}.split()",
      f"' '.join(word.capitalize() for word in {s!r}.split())", f"{s!r}.replace(' ', '_')",
      f"list(range({b}, {a}, {b}))", f"[n * n for n in range({b + 2})]", f"sorted(set({w!r}))", f"{w!r} in {s!r}", f"{s!r}.find({s.split()[1]!r})",
      f"dict(zip({WORDS[:3]}, {nums[:3]}))", f"list(enumerate({w!r}[:3]))", f"bin({a})", f"hex({a * 7})",
      f"int('{a}') + {b}", f"str({a}) + str({b})", f"{w!r} * 2", f"any(x > 50 for x in {nums})",
      f"all(x > -30 for x in {nums})", f"sum(x for x in range({a}) if x % {b} == 0)",
  ]
  return r.choice(choices)


def repl_document(r) -> str:
  """An interactive Python session showing several expressions and their values."""
  lines = ["# Trying things out in the Python interpreter"]
  for _ in range(r.randint(4, 8)):
    e = _expr(r)
    lines.append(f">>> {e}")
    lines.append(repr(eval(e)))  # pylint: disable=eval-used
  return "\n".join(lines)


def conversion_document(r) -> str:
  """A small conversion function with a comment, a docstring and example calls."""
  kind = r.randrange(4)
  if kind == 0:
    code = ('def celsius_to_fahrenheit(celsius):\n    """Convert a temperature from Celsius to Fahrenheit."""\n'
            "    # F = C * 9 / 5 + 32\n    return celsius * 9 / 5 + 32\n\n\n")
    calls = [f"print(celsius_to_fahrenheit({c}))" for c in r.sample([-40, -10, 0, 15, 20, 25, 37, 100], 3)]
  elif kind == 1:
    rate = r.choice([5, 8, 10, 15])
    code = (f"TAX_RATE = {rate} / 100  # {rate} percent\n\n\n"
            "def price_with_tax(price):\n    \"\"\"Return the price including tax, rounded to whole won.\"\"\"\n"
            "    return round(price * (1 + TAX_RATE))\n\n\n")
    calls = [f"print(price_with_tax({p}))" for p in r.sample([1000, 2500, 4000, 9900, 12000, 30000], 3)]
  elif kind == 2:
    code = ('def minutes_to_hours(minutes):\n    """Split a number of minutes into (hours, minutes)."""\n'
            "    return divmod(minutes, 60)\n\n\n")
    calls = [f"print(minutes_to_hours({m}))" for m in r.sample([45, 60, 75, 130, 200, 365, 1440], 3)]
  else:
    code = ('def bmi(weight_kg, height_m):\n    """Body mass index: weight divided by height squared."""\n'
            "    return round(weight_kg / height_m ** 2, 1)\n\n\n")
    calls = [f"print(bmi({w}, {h}))" for w, h in
             [(r.randint(45, 90), r.choice([1.55, 1.6, 1.68, 1.72, 1.8, 1.85])) for _ in range(3)]]
  out = _run(code + "\n".join(calls)).splitlines()
  return code + "\n".join(f"{c}  # {o}" for c, o in zip(calls, out))


def loop_document(r) -> str:
  """A loop with a Korean or English comment and its printed output."""
  n = r.randint(3, 7)
  kind = r.randrange(4)
  if kind == 0:
    code = f"# 1부터 {n}까지의 수와 그 제곱을 출력한다\nfor i in range(1, {n + 1}):\n    print(i, i * i)\n"
  elif kind == 1:
    m = r.randint(2, 9)
    code = f"# Print the {m} times table up to {m} x {n}\nfor i in range(1, {n + 1}):\n    print(f\"{m} x {{i}} = {{{m} * i}}\")\n"
  elif kind == 2:
    w = r.sample(WORDS, n)
    code = f"# 단어와 그 길이를 출력한다\nwords = {w}\nfor word in words:\n    print(word, len(word))\n"
  else:
    start = r.randint(10, 100)
    code = (f"# Halve a number until it drops below 1, counting the steps\nx = {start}\nsteps = 0\n"
            "while x >= 1:\n    x = x / 2\n    steps += 1\nprint(steps)\n")
  return code + "# Output:\n" + "\n".join("# " + line for line in _run(code).splitlines())


def class_document(r) -> str:
  """A small class and a short script using it, with its output."""
  if r.random() < 0.5:
    deposits = [r.choice([1000, 5000, 10000, 20000]) for _ in range(r.randint(2, 4))]
    withdraw = r.choice([2000, 3000, 7000])
    code = ("class BankAccount:\n    \"\"\"A bank account that refuses to go below zero.\"\"\"\n\n"
            "    def __init__(self, owner):\n        self.owner = owner\n        self.balance = 0\n\n"
            "    def deposit(self, amount):\n        self.balance += amount\n\n"
            "    def withdraw(self, amount):\n        if amount > self.balance:\n"
            "            raise ValueError(\"not enough money in the account\")\n        self.balance -= amount\n\n\n"
            f"account = BankAccount({r.choice(WORDS).capitalize()!r})\n"
            + "".join(f"account.deposit({d})\n" for d in deposits) + f"account.withdraw({withdraw})\n"
            "print(account.balance)\n")
  else:
    items = r.sample(WORDS, r.randint(3, 5))
    code = ("class Counter:\n    \"\"\"Counts how many times each item was added.\"\"\"\n\n"
            "    def __init__(self):\n        self.counts = {}\n\n"
            "    def add(self, item):\n        self.counts[item] = self.counts.get(item, 0) + 1\n\n"
            "    def most_common(self):\n        return max(self.counts, key=self.counts.get)\n\n\n"
            "c = Counter()\n" + "".join(f"c.add({w!r})\n" for w in items + items[:2] + items[:1])
            + "print(c.most_common(), c.counts[c.most_common()])\n")
  return code + "# Output:\n" + "\n".join("# " + line for line in _run(code).splitlines())


def code_documents(snippets: list[str], seed: int, count: int) -> list[str]:
  """The hand-written snippets followed by `count` generated code documents."""
  r = random.Random(seed)
  makers = [repl_document, repl_document, conversion_document, loop_document, class_document]
  return list(snippets) + [r.choice(makers)(r) for _ in range(count)]
