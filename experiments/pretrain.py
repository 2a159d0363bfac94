"""Pre-train a Kanana-2 model (next-token loss + router aux losses) on the embedded Korean/English corpus.

    kanana-jax run experiments/pretrain.py:size=tiny --workdir runs/pretrain_tiny

Arguments (`key=value,...`): size=tiny|small|kanana2_30b_a3b|kanana2_155b_a17b, steps, batch, seq_len, lr,
optimizer=adamw|muon. Any other key: `--set dotted.key=value`.
"""
from experiments import common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, size="tiny", steps=200, batch=16, seq_len=128, lr=3e-3, optimizer="adamw")
    c = common.base_config(args.size)
    c.train.stage = "pretrain"
    c.train.steps = args.steps
    c.train.eval_every = max(args.steps // 2, 1)
    c.train.checkpoint_every = max(args.steps // 10, 1)  # a kill loses at most a tenth (Ctrl-C loses nothing)
    c.data.global_batch_size = args.batch
    c.data.seq_len = args.seq_len
    c.optimizer.name = args.optimizer
    c.optimizer.learning_rate = args.lr
    c.optimizer.warmup_steps = min(20, args.steps // 10)
    return c


def sweep():
    """Learning-rate sweep (3 points); run it with `kanana-jax sweep experiments/pretrain.py --workdir DIR`."""
    from experiments.sweep_dsl import param
    return param("optimizer.learning_rate", [1e-3, 3e-3, 1e-2])
