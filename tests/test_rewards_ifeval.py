"""IFEval-style constraints: every registered constraint has a passing and a failing example."""

import pytest

from kanana_jax.rewards.ifeval import REGISTRY, evaluate_instructions, ifeval_reward, make_constraint

# id -> (kwargs, passing response, failing response)
CASES = {
    "length:min_words": ({"n": 5}, "one two three four five", "one two three four"),
    "length:max_words": ({"n": 4}, "Short and sweet here.", "This sentence has six words."),
    "length:sentences": ({"n": 2, "relation": "exactly"}, "It rains. We stay in!", "It rains. We stay in. Fine?"),
    "length:paragraphs": ({"n": 2}, "First part.\n***\nSecond part.", "Only one paragraph here."),
    "keywords:include": ({"keywords": ["seoul", "김치"]}, "Seoul is famous for 김치찌개.", "Busan is famous for 김치."),
    "keywords:forbidden": ({"words": ["cat"]}, "A category of dogs.", "My Cat sleeps."),
    "keywords:frequency": ({"keyword": "tea", "n": 2, "relation": "at least"}, "Tea, then more tea.", "Tea is nice."),
    "format:json": ({}, '```json\n{"a": [1, 2]}\n```', "{'a': 1}"),
    "format:bullets": ({"n": 2}, "* one\n- two", "* one\n* two\n* three"),
    "format:numbered_list": ({"n": 3}, "1. a\n2. b\n3. c", "1. a\n3. b\n2. c"),
    "language:response": ({"language": "ko"}, "오늘은 날씨가 좋습니다. AI 연구를 합니다.", "The weather is nice."),
    "ending:phrase": ({"phrase": "Any questions?"}, "Done. Any questions?  \n", "Any questions? Done."),
    "starting:phrase": ({"phrase": "My answer"}, "  My answer is yes.", "Well, My answer is yes."),
    "format:title": ({}, "<<Winter Song>>\nSnow falls.", "<Winter Song>\nSnow falls."),
    "case:lowercase": ({}, "all lower case, 123!", "Not all lower."),
    "case:uppercase": ({}, "ALL CAPS, 123!", "ALL CAPS except this."),
    "punctuation:no_comma": ({}, "No commas here.", "One, two."),
    "content:placeholders": ({"n": 2}, "Dear [name], see you at [place].", "Dear [name], see you soon. []"),
    "format:highlights": ({"n": 2}, "This is *one* and **two**.", "Only *one* here, and ** not this**."),
    "content:postscript": ({"marker": "P.S."}, "Hi.\n\nP.S. See you.", "Hi. The P.S. is missing."),
    "format:quotation": ({}, '"Quoted answer."', 'Unquoted "answer".'),
    "format:sections": ({"n": 2, "splitter": "Section"}, "Section 1\nIntro\n## Section 2\nBody", "Section 1\nOnly one"),
}


def test_registry_has_at_least_15_constraints_and_all_are_tested():
    assert len(REGISTRY) >= 15
    assert set(CASES) == set(REGISTRY)


@pytest.mark.parametrize("cid", sorted(CASES))
def test_constraint_pass_and_fail(cid):
    kwargs, good, bad = CASES[cid]
    c = make_constraint(cid, kwargs)
    assert c.check(good) is True, (cid, good)
    assert c.check(bad) is False, (cid, bad)


@pytest.mark.parametrize("relation,n,expected", [("at least", 3, True), ("at most", 2, False), ("exactly", 3, True),
                                                 ("less than", 4, True), ("more than", 3, False)])
def test_relations(relation, n, expected):
    c = make_constraint("length:sentences", {"n": n, "relation": relation})
    assert c.check("One. Two! Three?") is expected


def test_language_english_and_mixed_korean():
    en = make_constraint("language:response", {"language": "en"})
    assert en.check("Plain English only.") and not en.check("English with 한국어 words 섞임 많이 많이.")
    ko = make_constraint("language:response", {"language": "ko"})
    assert ko.check("딥러닝 모델을 JAX로 학습합니다.")  # a few Latin letters are fine
    assert not ko.check("Mostly English with 한 word.")


def test_paragraphs_by_blank_lines_and_words_korean():
    assert make_constraint("length:paragraphs", {"n": 3}).check("가.\n\n나.\n \n다.")
    assert make_constraint("length:max_words", {"n": 3}).check("한국어 어절 세개")
    assert not make_constraint("length:max_words", {"n": 2}).check("한국어 어절 세개")


def test_keyword_matching_whole_words_for_english_substrings_for_korean():
    inc = make_constraint("keywords:include", {"keywords": ["cat"]})
    assert not inc.check("category") and inc.check("A CAT.")
    assert make_constraint("keywords:include", {"keywords": ["발효"]}).check("발효가 진행됩니다")


def test_evaluate_instructions_strict_and_loose():
    specs = [("case:lowercase", {}), {"id": "format:title", "kwargs": {}}]
    text = "Sure! Here it is:\n<<poem>>\nsoft rain"
    strict = evaluate_instructions(text, specs)
    assert strict.per_constraint == (False, True) and not strict.all_passed and strict.fraction == 0.5
    assert evaluate_instructions(text, specs, loose=True).all_passed  # without the chatty first line
    assert ifeval_reward("<<t>>\nlower", specs) == 1.0
    assert ifeval_reward("<<T>>\nUpper", specs) == 0.0


@pytest.mark.parametrize("cid,kwargs,match", [
    ("nope:missing", {}, "unknown constraint id"),
    ("length:min_words", {}, "missing"),
    ("length:min_words", {"n": 3, "x": 1}, "unknown"),
    ("length:min_words", {"n": "3"}, "must be int"),
    ("length:sentences", {"n": 3, "relation": "about"}, "relation must be one of"),
    ("keywords:include", {"keywords": []}, "non-empty"),
    ("language:response", {"language": "fr"}, "'ko' or 'en'"),
])
def test_bad_kwargs_raise_with_the_name(cid, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_constraint(cid, kwargs)
