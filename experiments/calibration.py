"""Calibration tuning (Kanana-2's last post-training stage): the model answers, then states 'Confidence: NN%', and
is tuned so that the number matches its accuracy; accuracy / ECE / Brier / AUROC before and after.

    kanana-jax run experiments/calibration.py:size=tiny,method=rl,init_from=runs/sft_tiny --workdir runs/calib_rl
    kanana-jax run experiments/calibration.py:size=tiny,method=sft,init_from=runs/sft_tiny --workdir runs/calib_sft
    kanana-jax sweep experiments/calibration.py:size=tiny,init_from=runs/sft_tiny --workdir runs/calib   # methods x seeds

Arguments (`key=value,...`): size=tiny|small|kanana2_30b_a3b|kanana2_155b_a17b, init_from (required: a run's
workdir[:STEP] or hf:DIR), method=rl|sft, prompts (verifiable prompt spec; default prompts:arith for tiny,
prompts:math,code,ifeval otherwise), family (record field grouping items: default 'difficulty', arith's operand
digits; '' = bucket), reward (method=rl: 'calibration' = RLCR's 1[correct] - (q - 1[correct])^2, 'verifiable' =
correctness only, the baseline), unparseable (what an answer without a parseable confidence pays), steps, batch
(rl: prompts per step; sft: rows per step), group (rl: samples per prompt), k (sft: samples per train prompt),
temperature (sft sampling; 0 = greedy, as the eval decodes), sample_prompts (sft: 0 = the whole train split),
eval_prompts (0 = the whole eval split), eval_suites (also score these `kanana-jax eval` suites before/after),
seq_len (default 256 for tiny: the byte tokenizer spends ~150 tokens on a prompt with the confidence request;
4096 otherwise; full sizes take the pod layout's), max_new_tokens, lr, kl, seed, optimizer, slice (full sizes).
Outputs: WORKDIR/calibration_eval.json (before / after / delta), WORKDIR/reliability.png, and the RL or SFT run in
WORKDIR/rl | WORKDIR/sft (kanana_jax/train/stages/calibration.py). The tiny overconfident demo with both methods,
seeds and the correctness-only RL check: `python -m experiments.calibration_arith`. Any other key:
`--set calibration.KEY=...` / `--set rl.KEY=...` (kanana_jax/config_posttrain.py).
"""
from experiments import common


def _args(arg):
    args = common.parse_arg(arg, size="tiny", init_from="", method="rl", prompts="", family="difficulty",
                            reward="calibration", unparseable=-1.0, steps=40, batch=8, group=8, k=1,
                            temperature=0.0, sample_prompts=0, eval_prompts=0, eval_suites="", seq_len=0,
                            max_new_tokens=0, lr=1e-3, kl=0.01, seed=0, optimizer="adamw", slice="")
    tiny = args.size == "tiny"
    args.prompts = args.prompts or ("prompts:arith" if tiny else "prompts:math,code,ifeval")
    args.seq_len = args.seq_len or (256 if tiny else 4096)
    args.max_new_tokens = args.max_new_tokens or (32 if tiny else 1024)
    if args.method not in ("rl", "sft"):
        raise common.config_lib.ConfigError(f"config argument method={args.method!r}: allowed rl, sft")
    return args


def get_config(arg: str | None = None):
    args = _args(arg)
    c = common.base_config(args.size)
    c.train.stage = "calibration"
    c.train.init_from = args.init_from
    c.train.steps, c.train.seed = args.steps, args.seed
    c.train.eval_every = 0                      # the driver's before/after eval is the eval
    c.train.checkpoint_every = max(args.steps // 2, 1)
    c.train.log_every = max(1, min(10, args.steps // 10))
    c.calibration.update(method=args.method, prompts=args.prompts, family=args.family, reward=args.reward,
                         samples_per_prompt=args.k, temperature=args.temperature, sample_prompts=args.sample_prompts,
                         max_new_tokens=args.max_new_tokens, eval_prompts=args.eval_prompts,
                         eval_suites=args.eval_suites, sample_batch=64)
    c.rl.update(group_size=args.group, kl_coef=args.kl, max_new_tokens=args.max_new_tokens, eval_prompts=32,
                unparseable_confidence_reward=args.unparseable, rollout_batch=64)
    c.data.global_batch_size, c.data.seq_len = args.batch, args.seq_len
    c.data.chat_too_long = "drop"
    c.optimizer.name = args.optimizer
    c.optimizer.learning_rate = args.lr
    c.optimizer.weight_decay = 0.0
    if args.method == "rl":
        c.optimizer.schedule, c.optimizer.warmup_steps = "constant", 0
    else:
        c.optimizer.schedule, c.optimizer.warmup_steps, c.optimizer.min_lr_ratio = "cosine", min(5, args.steps // 4), 0.1
    if common.pod_layout(c, args.size, args.slice):   # full size: pod mesh, batch and sequence of experiments/pod.py
        if args.method == "rl":
            c.data.global_batch_size = max(c.data.global_batch_size // args.group, 1)   # rows = prompts x group
            c.data.seq_len = args.seq_len
        c.train.checkpoint_every = min(100, args.steps)
        c.calibration.sample_batch = c.rl.rollout_batch = max(64, c.data.global_batch_size)
    return c


def topology(arg: str | None = None) -> str:
    args = _args(arg)
    return common.pod_topology(args.size, args.slice)


def sweep(arg: str | None = None):
    """Both methods (RLCR reward, annotated SFT) and the correctness-only RL baseline, three seeds each."""
    from experiments.sweep_dsl import chain, fixed, param, product
    methods = chain(fixed({"calibration.method": "rl", "calibration.reward": "calibration"}),
                    fixed({"calibration.method": "sft"}),
                    fixed({"calibration.method": "rl", "calibration.reward": "verifiable"}))
    return product(methods, param("train.seed", [0, 1, 2]))
