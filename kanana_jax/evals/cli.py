"""`kanana-jax eval CHECKPOINT --suite math,code,ifeval,tools`: accuracy and ECE per embedded suite."""
from __future__ import annotations

import json
import os

from kanana_jax.cli import command


def add_arguments(p):
    p.add_argument("checkpoint", help="run directory (latest step), WORKDIR/checkpoints/<step> or .../<step>/state")
    p.add_argument("--suite", default="math,code,ifeval,tools", help="comma-separated suites (default: all four)")
    p.add_argument("--limit", type=int, default=None, help="first N items of each suite")
    p.add_argument("--lang", choices=("en", "ko"), default=None, help="only items in this language")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling key")
    p.add_argument("--batch-size", type=int, default=16, help="conversations generated together")
    p.add_argument("--max-turns", type=int, default=4, help="assistant turns per tool episode")
    p.add_argument("--confidence", choices=("auto", "stated", "logprob"), default="auto",
                   help="ECE from the stated 'Confidence: NN%%', the answer log-prob, or stated-else-logprob")
    p.add_argument("--no-ask-confidence", action="store_true",
                   help="do not append the 'state your confidence' request to prompts")
    p.add_argument("--output", default=None, help="report JSON path (default: WORKDIR/eval/step_<step>.json)")


@command("eval", "evaluate a checkpoint on the embedded suites (accuracy and ECE per suite)")
def eval_command(args):
    from kanana_jax.evals import runner
    from kanana_jax.evals.suites import parse_suite_list
    from kanana_jax.generate.sampler import SamplingParams
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be >= 1, got {args.limit}")
    try:
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:
        raise SystemExit(f"kanana-jax eval: bad sampling flag: {e}") from None
    try:
        suite_names = parse_suite_list(args.suite)
    except ValueError as e:
        raise SystemExit(f"kanana-jax eval: {e}") from None
    report = runner.run_eval(args.checkpoint, suite_names, limit=args.limit, lang=args.lang,
                             sampling=sampling, seed=args.seed, batch_size=args.batch_size,
                             confidence=args.confidence, max_turns=args.max_turns,
                             ask_confidence=not args.no_ask_confidence)
    out = args.output or os.path.join(report["workdir"], "eval", f"step_{report['step']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
    print(report["table"])
    print(f"report: {out}")


eval_command.add_arguments = add_arguments
