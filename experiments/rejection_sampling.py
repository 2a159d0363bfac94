"""Rejection sampling with real execution (Kanana-2's iterative SFT on the model's own verified trajectories): R
rounds of sample K -> execute / verify -> keep the passing ones -> one SFT round, each from the newest policy.

    kanana-jax run experiments/rejection_sampling.py:size=tiny,init_from=runs/sft_tiny --workdir runs/rs_tiny

Arguments (`key=value,...`): size=tiny|small|kanana2_30b_a3b|kanana2_155b_a17b, init_from (the round-0 policy: a
run's workdir[:STEP] or hf:DIR; '' = fresh init), rounds, k (samples per prompt), prompts (a prompt spec:
prompts:NAME[,NAME] of kanana_jax/data/prompts, sft:BUCKET, or a JSONL file; default prompts:arith for tiny,
prompts:math,code,tool,ifeval otherwise), prompts_per_round, chunk (prompts per sampling chunk: the unit of
resume), temperature, top_p, max_new_tokens (0: 32 tiny, 1024 otherwise), selection=all|shortest|best_k,
best_k, max_per_prompt (0 = no cap), mix_sft (share of the original SFT recipe of experiments/sft.py in each
round's SFT; default 0 for tiny, 0.2 otherwise), heldout (eval-split prompts scored after each round: held-out
pass@1 / pass@k), eval_suites (comma-separated: math,code,ifeval,tools; '' = none), eval_limit, steps (SFT steps
per round), batch, seq_len (default 128 tiny, 4096 otherwise; full sizes take the pod layout's), lr, seed,
slice (full sizes). Outputs: WORKDIR/rounds.jsonl (a row per round) and WORKDIR/round_<r>/ (samples.jsonl,
kept_train.jsonl, sft/, metrics.json); kanana_jax/train/stages/rejection_sampling.py says what each holds. For
the tiny learnable demo (warm-start SFT on arith, then 3 rounds): `python -m experiments.rejection_sampling_arith`.
Any other key: `--set dotted.key=value`.
"""
from experiments import common
from experiments import sft as sft_config


def _args(arg):
    return common.parse_arg(arg, size="tiny", init_from="", rounds=3, k=4, prompts="", prompts_per_round=64,
                            chunk=16, temperature=1.0, top_p=1.0, max_new_tokens=0, selection="all", best_k=1,
                            max_per_prompt=0, mix_sft=-1.0, heldout=-1, eval_suites="", eval_limit=16, steps=50,
                            batch=8, seq_len=0, lr=3e-4, seed=0, slice="")


def get_config(arg: str | None = None):
    args = _args(arg)
    tiny = args.size == "tiny"
    c = common.base_config(args.size)
    c.train.stage = "rejection_sampling"
    c.train.init_from = args.init_from
    c.train.steps, c.train.seed = args.steps, args.seed
    c.train.eval_every = c.train.checkpoint_every = args.steps
    c.train.eval_batches = 2
    c.train.log_every = max(1, min(10, args.steps // 5))
    mix = (0.0 if tiny else 0.2) if args.mix_sft < 0 else args.mix_sft
    if mix > 0:   # the original recipe, mixed in (tiny leaves tool out: its conversations need ~2K byte tokens)
        c.sft.buckets = sft_config.buckets({**sft_config.RECIPE, "tool": 0.0 if tiny else sft_config.RECIPE["tool"]})
    c.rejection_sampling.update(
        rounds=args.rounds, samples_per_prompt=args.k, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens or (32 if tiny else 1024),
        prompts=args.prompts or ("prompts:arith" if tiny else "prompts:math,code,tool,ifeval"),
        prompts_per_round=args.prompts_per_round, chunk_prompts=args.chunk, sample_batch=args.chunk * args.k,
        selection=args.selection, best_k=args.best_k, max_per_prompt=args.max_per_prompt, mix_sft=mix,
        heldout_prompts=(32 if tiny else 64) if args.heldout < 0 else args.heldout,
        eval_suites=args.eval_suites, eval_limit=args.eval_limit)
    c.data.global_batch_size, c.data.seq_len = args.batch, args.seq_len or (128 if tiny else 4096)
    c.data.mixture_weights_in = "tokens"
    c.data.chat_too_long = "drop"
    c.optimizer.learning_rate = args.lr
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = min(5, args.steps // 2)
    c.optimizer.min_lr_ratio = 0.1
    if common.pod_layout(c, args.size, args.slice):   # full size: pod mesh, batch and sequence of experiments/pod.py
        c.train.eval_every = c.train.checkpoint_every = min(1000, args.steps)
        c.rejection_sampling.sample_batch = max(c.rejection_sampling.sample_batch, c.data.global_batch_size)
    return c


def topology(arg: str | None = None) -> str:
    args = _args(arg)
    return common.pod_topology(args.size, args.slice)


def sweep(arg: str | None = None):
    """Selection (all / shortest / best-of-1) x samples per prompt."""
    from experiments.sweep_dsl import chain, fixed, param, product
    selections = chain(fixed({"rejection_sampling.selection": "all"}),
                       fixed({"rejection_sampling.selection": "shortest"}),
                       fixed({"rejection_sampling.selection": "best_k", "rejection_sampling.best_k": 1}))
    return product(selections, param("rejection_sampling.samples_per_prompt", [4, 8]))
