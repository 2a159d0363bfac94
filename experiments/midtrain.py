"""Mid-train a Kanana-2 model on chain-of-thought reasoning with replay of pre-training data (Kanana-2: 200B
reasoning + 50B replay tokens, a 20% replay share).

    kanana-jax run experiments/pretrain.py:size=tiny --workdir runs/pretrain_tiny
    kanana-jax run experiments/midtrain.py:size=tiny,init_from=runs/pretrain_tiny --workdir runs/midtrain_tiny

Arguments (`key=value,...`): size=tiny|small|kanana2_30b_a3b|kanana2_155b_a17b, init_from (a run's workdir
[:STEP] or hf:DIR; '' starts from a fresh init), replay (share of the TOKENS drawn from the pre-training corpus,
0 <= replay < 1; the rest is the embedded math and code chain-of-thought corpus), steps, batch, seq_len, lr,
warmup, seed, optimizer=adamw|muon, slice (full sizes: the TPU slice, default the pod layout's named one).
Held-out evaluation: 'eval_loss/wiki_en' and 'eval_loss/wiki_ko' (pre-training domains: forgetting) and
'eval_loss/reasoning' (what is learned). Schedule: linear re-warm to `lr`, cosine decay to 0.1 lr, as continual
pre-training papers do. Any other key: `--set dotted.key=value`.
"""
from experiments import common

REASONING = "embedded:math_cot,code_cot"      # kanana_jax/data/corpus/reasoning
REPLAY = "embedded"                           # every pre-training domain of the embedded corpus
EVAL_SOURCES = (("wiki_en", "embedded:wiki_en"), ("wiki_ko", "embedded:wiki_ko"), ("reasoning", REASONING))


def _args(arg):
    args = common.parse_arg(arg, size="tiny", init_from="", replay=0.2, steps=200, batch=16, seq_len=128,
                            lr=1e-3, warmup=20, seed=0, optimizer="adamw", slice="")
    if not 0.0 <= args.replay < 1.0:
        raise common.config_lib.ConfigError(f"config argument 'replay': {args.replay} is outside [0, 1)")
    return args


def mixture(replay: float) -> tuple:
    """Token-share mixture: reasoning (1 - replay) and pre-training replay (replay; left out at 0)."""
    entries = [("reasoning", REASONING, round(1.0 - replay, 6))]
    if replay > 0:
        entries.append(("replay", REPLAY, float(replay)))
    return tuple(entries)


def get_config(arg: str | None = None):
    args = _args(arg)
    c = common.base_config(args.size)
    c.train.stage = "midtrain"
    c.train.init_from = args.init_from
    c.train.steps, c.train.seed = args.steps, args.seed
    c.train.eval_every = max(args.steps // 4, 1)
    c.train.checkpoint_every = max(args.steps // 4, 1)
    c.data.global_batch_size, c.data.seq_len = args.batch, args.seq_len
    c.data.mixture = mixture(args.replay)
    c.data.mixture_weights_in = "tokens"
    c.data.eval_sources = EVAL_SOURCES
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
    """Replay share x learning rate (8 points); `kanana-jax sweep experiments/midtrain.py:size=tiny,init_from=W
    --workdir DIR`. Each point sets the whole token mixture of its replay share."""
    from experiments.sweep_dsl import chain, fixed, param, product
    replays = chain(*[fixed({"data.mixture": mixture(r)}) for r in (0.0, 0.05, 0.2, 0.5)])
    return product(replays, param("optimizer.learning_rate", [1e-3, 3e-3]))
