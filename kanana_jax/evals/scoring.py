"""Score model responses on an eval suite: accuracy, ECE (10 bins) and per-suite metrics.

`score_suite("math", items, responses)` takes one response per item (for `tools`, the list of
assistant turns of the episode, or one string when the model answered in a single turn).
Confidences come from the caller (e.g. `confidence_from_logprob` of the answer tokens) or,
when not given, from each response's 'Confidence: NN%' line; items without one are left out
of the ECE and counted in `n_with_confidence`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence, Union

from kanana_jax.evals.calibration import auroc, brier_score, expected_calibration_error, parse_stated_confidence
from kanana_jax.evals.calibration import strip_confidence
from kanana_jax.rewards.code_sandbox import SandboxLimits, extract_code, run_many
from kanana_jax.rewards.ifeval import evaluate_instructions
from kanana_jax.rewards.math import answers_match, extract_answer
from kanana_jax.rewards.tools import replay_and_check

Response = Union[str, Sequence[str]]


@dataclasses.dataclass(frozen=True)
class ItemScore:
    """One item's verdict, the confidence used for calibration (None if absent) and what happened."""

    id: str
    correct: bool
    confidence: float | None
    details: str = ""


@dataclasses.dataclass(frozen=True)
class SuiteScore:
    """Suite accuracy, calibration over items with a confidence (ECE, Brier, AUROC of confidence vs correctness:
    None without confidences, AUROC also None when every item is right or every one wrong), extra metrics and the
    item verdicts."""

    suite: str
    n: int
    accuracy: float
    ece: float | None
    brier: float | None
    n_with_confidence: int
    metrics: dict[str, float]
    items: tuple[ItemScore, ...]
    auroc: float | None = None

    def summary(self) -> dict[str, Any]:
        return {"suite": self.suite, "n": self.n, "accuracy": self.accuracy, "ece": self.ece, "brier": self.brier,
                "auroc": self.auroc, "n_with_confidence": self.n_with_confidence, **self.metrics}


def _last_text(response: Response) -> str:
    return response if isinstance(response, str) else (response[-1] if response else "")


def _score_math(items, responses) -> tuple[list[tuple[bool, str]], dict[str, float]]:
    out = []
    for item, resp in zip(items, responses):
        pred = extract_answer(_last_text(resp))
        ok = answers_match(pred, item["answer"])
        out.append((ok, f"extracted {pred!r}, gold {item['answer']!r}"))
    return out, {}


def _score_code(items, responses, limits: SandboxLimits, max_workers: int | None):
    jobs, owner = [], []
    for i, (item, resp) in enumerate(zip(items, responses)):
        program = extract_code(_last_text(resp), item.get("entry_point"))
        if item.get("io"):
            for case in item["io"]:
                jobs.append({"program": program, "stdin": case["stdin"], "expected_stdout": case["stdout"],
                             "limits": limits})
                owner.append(i)
        else:
            jobs.append({"program": program, "tests": item["tests"], "limits": limits})
            owner.append(i)
    results = run_many(jobs, max_workers) if jobs else []
    per_item: list[list] = [[] for _ in items]
    for i, res in zip(owner, results):
        per_item[i].append(res)
    reasons = collections.Counter()
    out = []
    for res_list in per_item:
        first_bad = next((r for r in res_list if not r.passed), None)
        reasons[first_bad.reason if first_bad else "passed"] += 1
        detail = "passed" if first_bad is None else f"{first_bad.reason}: {first_bad.details[-300:]}"
        out.append((first_bad is None, detail))
    n = max(len(items), 1)
    return out, {f"reason_{k}": v / n for k, v in sorted(reasons.items())}


def _score_ifeval(items, responses):
    out, n_constraints, n_ok, n_loose = [], 0, 0, 0
    for item, resp in zip(items, responses):
        text = strip_confidence(_last_text(resp))
        strict = evaluate_instructions(text, item["constraints"])
        loose = evaluate_instructions(text, item["constraints"], loose=True)
        n_constraints += len(strict.per_constraint)
        n_ok += sum(strict.per_constraint)
        n_loose += loose.all_passed
        failed = [c["id"] for c, ok in zip(item["constraints"], strict.per_constraint) if not ok]
        out.append((strict.all_passed, f"failed constraints {failed}" if failed else "all constraints hold"))
    return out, {"instruction_accuracy": n_ok / max(n_constraints, 1),
                 "prompt_accuracy_loose": n_loose / max(len(items), 1)}


def _score_tools(items, responses):
    out, answer_hits, state_hits, n_answer, n_state = [], 0, 0, 0, 0
    for item, resp in zip(items, responses):
        turns = [resp] if isinstance(resp, str) else list(resp)
        check, traj = replay_and_check(item, turns)
        if check.answer_ok is not None:
            n_answer += 1
            answer_hits += check.answer_ok
        if check.state_ok is not None:
            n_state += 1
            state_hits += check.state_ok
        out.append((check.passed, check.details or f"{len(traj.calls)} calls, {traj.n_errors} malformed"))
    return out, {"answer_accuracy": answer_hits / max(n_answer, 1), "state_accuracy": state_hits / max(n_state, 1)}


def score_suite(suite: str, items: Sequence[dict], responses: Sequence[Response],
                confidences: Sequence[float | None] | None = None, *, n_bins: int = 10,
                sandbox_limits: SandboxLimits = SandboxLimits(), max_workers: int | None = None) -> SuiteScore:
    """Accuracy and ECE of `responses` (one per item) on a suite's `items`."""
    if len(items) != len(responses):
        raise ValueError(f"{suite}: got {len(responses)} responses for {len(items)} items; pass one per item")
    if confidences is not None and len(confidences) != len(items):
        raise ValueError(f"{suite}: got {len(confidences)} confidences for {len(items)} items")
    if suite == "math":
        verdicts, metrics = _score_math(items, responses)
    elif suite == "code":
        verdicts, metrics = _score_code(items, responses, sandbox_limits, max_workers)
    elif suite == "ifeval":
        verdicts, metrics = _score_ifeval(items, responses)
    elif suite == "tools":
        verdicts, metrics = _score_tools(items, responses)
    else:
        raise ValueError(f"unknown eval suite {suite!r}; choose from ('math', 'code', 'ifeval', 'tools')")
    if confidences is None:
        confidences = [parse_stated_confidence(_last_text(r)) for r in responses]
    scored = tuple(ItemScore(item["id"], ok, conf, details)
                   for item, (ok, details), conf in zip(items, verdicts, confidences))
    by_lang = collections.defaultdict(list)
    for item, s in zip(items, scored):
        if "lang" in item:
            by_lang[item["lang"]].append(s.correct)
    if len(by_lang) > 1:
        metrics.update({f"accuracy_{lang}": sum(v) / len(v) for lang, v in sorted(by_lang.items())})
    with_conf = [s for s in scored if s.confidence is not None]
    conf_values, conf_correct = [s.confidence for s in with_conf], [s.correct for s in with_conf]
    return SuiteScore(
        suite=suite, n=len(scored), accuracy=sum(s.correct for s in scored) / max(len(scored), 1),
        ece=expected_calibration_error(conf_values, conf_correct, n_bins) if with_conf else None,
        brier=brier_score(conf_values, conf_correct) if with_conf else None,
        n_with_confidence=len(with_conf), metrics=metrics, items=scored,
        auroc=auroc(conf_values, conf_correct) if with_conf else None)


def format_report(scores: Sequence[SuiteScore]) -> str:
    """A fixed-width table: suite, items, accuracy, ECE, items with a confidence."""
    rows = [f"{'suite':<8} {'n':>4} {'accuracy':>9} {'ECE':>7} {'conf':>5}"]
    for s in scores:
        ece = f"{s.ece:.3f}" if s.ece is not None else "-"
        rows.append(f"{s.suite:<8} {s.n:>4} {s.accuracy:>9.3f} {ece:>7} {s.n_with_confidence:>5}")
    return "\n".join(rows)
