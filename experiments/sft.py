"""Supervised fine-tuning in buckets (Kanana-2: Chat, Math, Code, Tool calling, plus instruction following) mixed
by a recipe, trained on assistant tokens only, from a mid-training run.

    kanana-jax run experiments/sft.py:size=tiny,init_from=runs/midtrain_tiny --workdir runs/sft_tiny
    kanana-jax eval runs/sft_tiny --suite math,code,ifeval,tools --limit 16

Arguments (`key=value,...`): size=tiny|small|kanana2_30b_a3b|kanana2_155b_a17b, init_from (a run's workdir[:STEP]
or hf:DIR; '' = fresh init), the recipe as token shares chat, math, code, tool, ifeval (0 leaves a bucket out;
tool defaults to 0 for tiny: its conversations need seq_len >= ~2200 byte tokens),
steps, batch, seq_len (default 1024 for tiny, 4096 otherwise; full sizes take the pod layout's), lr, warmup, seed,
optimizer=adamw|muon, slice (full sizes). Buckets are the embedded ones (kanana_jax/data/sft, 'sft:<bucket>');
for your own data set `--set sft.buckets='[["mine", "chat:/data/sft.jsonl", 1.0]]'`. Any other key:
`--set dotted.key=value`.
"""
from experiments import common

BUCKETS = ("chat", "math", "code", "tool", "ifeval")
RECIPE = {"chat": 0.25, "math": 0.25, "code": 0.2, "tool": 0.15, "ifeval": 0.15}


def _args(arg):
    args = common.parse_arg(arg, size="tiny", init_from="", steps=150, batch=8, seq_len=0, lr=1e-3, warmup=10,
                            seed=0, optimizer="adamw", slice="", **{**RECIPE, "tool": -1.0})
    tiny = args.size == "tiny"
    # With the byte tokenizer a tool-calling conversation's first assistant turn ends ~1.8-2.1K tokens in (the
    # system message lists the tool specs): the tiny default (1024 tokens, CPU-sized) leaves that bucket out.
    args.seq_len = args.seq_len or (1024 if tiny else 4096)
    args.tool = (0.0 if tiny else RECIPE["tool"]) if args.tool < 0 else args.tool
    if not any(args[b] > 0 for b in BUCKETS) or any(args[b] < 0 for b in BUCKETS):
        raise common.config_lib.ConfigError(f"config arguments {', '.join(BUCKETS)}: weights must be >= 0 and "
                                            "at least one > 0")
    return args


def buckets(weights: dict) -> tuple:
    """The sft.buckets recipe: the embedded buckets with a weight > 0."""
    return tuple((b, f"sft:{b}", float(weights[b])) for b in BUCKETS if weights.get(b, 0) > 0)


def get_config(arg: str | None = None):
    args = _args(arg)
    c = common.base_config(args.size)
    c.train.stage = "sft"
    c.train.init_from = args.init_from
    c.train.steps, c.train.seed = args.steps, args.seed
    c.train.eval_every = max(args.steps // 3, 1)
    c.train.checkpoint_every = max(args.steps // 3, 1)
    c.train.eval_batches = 2
    c.sft.buckets = buckets(args)
    c.data.global_batch_size, c.data.seq_len = args.batch, args.seq_len
    c.data.mixture_weights_in = "tokens"
    c.optimizer.name = args.optimizer
    c.optimizer.learning_rate = args.lr
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = min(args.warmup, args.steps // 2)
    c.optimizer.min_lr_ratio = 0.1
    if common.pod_layout(c, args.size, args.slice):   # full size: pod mesh, batch and sequence of experiments/pod.py
        c.train.eval_every = c.train.checkpoint_every = min(1000, args.steps)
    return c


def topology(arg: str | None = None) -> str:
    args = _args(arg)
    return common.pod_topology(args.size, args.slice)


def sweep(arg: str | None = None):
    """Three recipes x two learning rates: balanced, reasoning-heavy, chat-heavy."""
    from experiments.sweep_dsl import chain, fixed, param, product
    recipes = [RECIPE, {"chat": 0.1, "math": 0.35, "code": 0.35, "tool": 0.1, "ifeval": 0.1},
               {"chat": 0.5, "math": 0.1, "code": 0.1, "tool": 0.15, "ifeval": 0.15}]
    return product(chain(*[fixed({"sft.buckets": buckets(r)}) for r in recipes]),
                   param("optimizer.learning_rate", [1e-3, 3e-4]))
