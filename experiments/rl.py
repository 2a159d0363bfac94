"""RL with GRPO or PPO, a Logic track (verifiable rewards) and, given a reward model, a Chat track, optimized side
by side; the reward switch for clean-base ablations (spurious rewards).

    kanana-jax run experiments/rl.py:size=tiny,init_from=runs/sft_tiny --workdir runs/rl_tiny
    kanana-jax run experiments/rl.py:size=tiny,init_from=runs/sft_tiny,chat_rm=runs/rm_tiny --workdir runs/rl_2track
    kanana-jax sweep experiments/rl.py:size=tiny,init_from=runs/sft_tiny --workdir runs/rl_rewards   # reward kinds

Arguments (`key=value,...`): size, init_from (a run's workdir[:STEP] or hf:DIR), algorithm=grpo|ppo, logic (the
Logic track's prompts: default prompts:arith for tiny, prompts:math,code,ifeval otherwise), chat_rm (a reward-model
run: adds a Chat track on sft:chat prompts scored by it), chat_weight (its share of the prompts), reward=
verifiable|random|format|incorrect (what the Logic track pays), prompts (per step, over all tracks), group
(samples per prompt), epochs, steps, seq_len, max_new_tokens, lr, kl, seed, optimizer, slice. Any other key:
`--set rl.KEY=...` (kanana_jax/config_posttrain.py RLConfig).
"""
from experiments import common


def _args(arg):
    args = common.parse_arg(arg, size="tiny", init_from="", algorithm="grpo", logic="", chat_rm="", chat_weight=0.5,
                            reward="verifiable", prompts=8, group=4, epochs=1, steps=40, seq_len=0, max_new_tokens=0,
                            lr=1e-3, kl=0.01, seed=0, optimizer="adamw", slice="")
    tiny = args.size == "tiny"
    args.logic = args.logic or ("prompts:arith" if tiny else "prompts:math,code,ifeval")
    # tiny: the Chat track's prompts (sft:chat, 54-653 byte tokens, median 227) need longer rows than the arith
    # ones; at 512 the ~8% longest are left out of the track (a warning says so)
    args.seq_len = args.seq_len or ((512 if args.chat_rm else 128) if tiny else 4096)
    args.max_new_tokens = args.max_new_tokens or (24 if tiny else 1024)
    return args


def tracks(args) -> tuple:
    logic = ("logic", args.logic, "verifiable", 1.0 - (args.chat_weight if args.chat_rm else 0.0))
    chat = (("chat", "sft:chat", f"reward_model:{args.chat_rm}", args.chat_weight),) if args.chat_rm else ()
    return (logic,) + chat


def get_config(arg: str | None = None):
    args = _args(arg)
    c = common.base_config(args.size)
    c.train.stage = "rl"
    c.train.init_from = args.init_from
    c.train.steps, c.train.seed = args.steps, args.seed
    c.train.eval_every = max(args.steps // 4, 1)
    c.train.checkpoint_every = max(args.steps // 4, 1)
    c.train.log_every = 1
    c.rl.update(algorithm=args.algorithm, tracks=tracks(args), group_size=args.group, epochs=args.epochs,
                reward_kind=args.reward, kl_coef=args.kl, max_new_tokens=args.max_new_tokens, eval_prompts=32)
    c.data.global_batch_size, c.data.seq_len = args.prompts, args.seq_len
    c.optimizer.name = args.optimizer
    c.optimizer.learning_rate = args.lr
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.0
    if common.pod_layout(c, args.size, args.slice):
        c.data.global_batch_size = max(c.data.global_batch_size // args.group, 1)   # rows = prompts x group
        c.data.seq_len = args.seq_len
        c.train.eval_every = c.train.checkpoint_every = min(100, args.steps)
    return c


def topology(arg: str | None = None) -> str:
    args = _args(arg)
    return common.pod_topology(args.size, args.slice)


def sweep(arg: str | None = None):
    """The clean-base reward ablation: what the Logic track pays (ground truth, coin flip, format only, a wrong
    label), three seeds each."""
    from experiments.sweep_dsl import param, product
    return product(param("rl.reward_kind", ["verifiable", "random", "format", "incorrect"]),
                   param("train.seed", [0, 1, 2]))
