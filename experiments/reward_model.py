"""Train a reward model (a scalar head on the decoder, Bradley-Terry on preference pairs) for the RL Chat track.

    kanana-jax run experiments/reward_model.py:size=tiny,init_from=runs/sft_tiny --workdir runs/rm_tiny

Arguments (`key=value,...`): size=tiny|small|kanana2_30b_a3b|kanana2_155b_a17b, init_from (a language-model run's
workdir[:STEP] or hf:DIR: loaded into the backbone; the LM head is not used), pairs ('embedded' or a JSONL file),
score_l2 (weight of mean score^2), steps, batch (pairs), seq_len, lr, seed, optimizer=adamw|muon, slice. The run
directory then scores conversations: `kanana_jax.rewards.reward_model.RewardModelScorer(workdir)`.
"""
from experiments import common


def _args(arg):
    return common.parse_arg(arg, size="tiny", init_from="", pairs="embedded", score_l2=0.0, steps=80, batch=8,
                            seq_len=1024, lr=5e-4, seed=0, optimizer="adamw", slice="")


def get_config(arg: str | None = None):
    args = _args(arg)
    c = common.base_config(args.size)
    c.train.stage = "reward_model"
    c.train.init_from = args.init_from
    c.train.steps, c.train.seed = args.steps, args.seed
    c.train.eval_every = max(args.steps // 4, 1)
    c.train.checkpoint_every = max(args.steps // 4, 1)
    c.train.eval_batches = 2
    c.reward_model.update(pairs=args.pairs, score_l2_coef=args.score_l2)
    c.data.global_batch_size, c.data.seq_len = args.batch, args.seq_len
    c.optimizer.name = args.optimizer
    c.optimizer.learning_rate = args.lr
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = min(5, args.steps // 2)
    if common.pod_layout(c, args.size, args.slice):
        c.data.global_batch_size //= 2
        c.train.eval_every = c.train.checkpoint_every = min(1000, args.steps)
    return c


def topology(arg: str | None = None) -> str:
    args = _args(arg)
    return common.pod_topology(args.size, args.slice)


def sweep(arg: str | None = None):
    """Learning rate x score regularization."""
    from experiments.sweep_dsl import param, product
    return product(param("optimizer.learning_rate", [2e-4, 5e-4, 1e-3]), param("reward_model.score_l2_coef",
                                                                                  [0.0, 0.01]))
