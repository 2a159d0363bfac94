"""DPO (or IPO) on preference pairs from an SFT run; the frozen reference is the starting params.

    kanana-jax run experiments/dpo.py:size=tiny,init_from=runs/sft_tiny --workdir runs/dpo_tiny

Arguments (`key=value,...`): size=tiny|small|kanana2_30b_a3b|kanana2_155b_a17b, init_from (a run's workdir[:STEP]
or hf:DIR), loss=dpo|ipo, beta, label_smoothing, pairs ('embedded': kanana_jax/data/preference, or a JSONL file
of {prompt, chosen, rejected}), steps, batch (pairs), seq_len, lr, seed, optimizer=adamw|muon, slice (full sizes).
Any other key: `--set dotted.key=value`.
"""
from experiments import common


def _args(arg):
    return common.parse_arg(arg, size="tiny", init_from="", loss="dpo", beta=0.1, label_smoothing=0.0,
                            pairs="embedded", steps=60, batch=8, seq_len=1024, lr=2e-4, seed=0, optimizer="adamw",
                            slice="")


def get_config(arg: str | None = None):
    args = _args(arg)
    c = common.base_config(args.size)
    c.train.stage = "dpo"
    c.train.init_from = args.init_from
    c.train.steps, c.train.seed = args.steps, args.seed
    c.train.eval_every = max(args.steps // 3, 1)
    c.train.checkpoint_every = max(args.steps // 3, 1)
    c.train.eval_batches = 2
    c.dpo.update(pairs=args.pairs, beta=args.beta, label_smoothing=args.label_smoothing, loss=args.loss)
    c.data.global_batch_size, c.data.seq_len = args.batch, args.seq_len
    c.optimizer.name = args.optimizer
    c.optimizer.learning_rate = args.lr
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = min(5, args.steps // 2)
    c.optimizer.weight_decay = 0.0
    if common.pod_layout(c, args.size, args.slice):
        c.data.global_batch_size //= 2   # a pair is two sequences: the same tokens per step as pre-training
        c.train.eval_every = c.train.checkpoint_every = min(1000, args.steps)
    return c


def topology(arg: str | None = None) -> str:
    args = _args(arg)
    return common.pod_topology(args.size, args.slice)


def sweep(arg: str | None = None):
    """DPO vs IPO x beta."""
    from experiments.sweep_dsl import param, product
    return product(param("dpo.loss", ["dpo", "ipo"]), param("dpo.beta", [0.05, 0.1, 0.5]))
