"""The whole Kanana-2 recipe as one resumable run: pretrain -> midtrain (replay) -> SFT (buckets) -> reward model ->
rejection sampling (executed) -> parallel-track RL (Logic: verifiers, Chat: the reward model) -> calibration, each
stage in WORKDIR/<i>_<name>/ starting from the previous stage's final policy (train.init_from), then the eval table.

    kanana-jax run experiments/pipeline.py:size=tiny --workdir runs/pipeline_tiny
    kanana-jax run experiments/pipeline.py:size=tiny,sft.train.steps=60,rl.rl.group_size=8 --workdir runs/p2

Arguments (`key=value,...`): size=tiny|small|kanana2_30b_a3b|kanana2_155b_a17b, seed, suites (comma-separated eval
suites; default every suite), limit (items per suite), and per-stage overrides written `STAGE.dotted.key=value`
(STAGE = pretrain, midtrain, sft, reward_model, rejection_sampling, rl, calibration): the one way to change a
stage's keys from the command line (they become pipeline.overrides). A relaunch resumes at the stage and step
where the run stopped. Outputs: WORKDIR/eval_table.md / .json / .png (accuracy and ECE per suite after every
language-model stage) and each stage's own folder. Full sizes use the pod layout of experiments/pod.py in every
stage (`python -m launch.compile_aot --config experiments/<stage>.py:size=kanana2_30b_a3b` compiles one stage's
step for its slice; `python -m launch.tpu --config experiments/pipeline.py:size=kanana2_30b_a3b ...` prints the
pod command).
"""
from experiments import common

STAGES = ("pretrain", "midtrain", "sft", "reward_model", "rejection_sampling", "rl", "calibration")

# Step budgets: tiny runs the whole chain in under 5 minutes on a 2-core CPU (4m41s and 4m21s measured; about
# 2 minutes of it XLA compiles: 6 train steps, 6 prefill + decode pairs); the others are placeholders to set per
# experiment.
TINY_RL_SHAPE = "seq_len=512,max_new_tokens=24"   # RL and calibration's RL run: one train step program
TINY = {
    "pretrain": "experiments/pretrain.py:size=tiny,steps=40,batch=8,seq_len=128",
    "midtrain": "experiments/midtrain.py:size=tiny,steps=30,batch=8,seq_len=128,replay=0.2,warmup=5",
    "sft": "experiments/sft.py:size=tiny,steps=12,batch=4,seq_len=768",
    "reward_model": "experiments/reward_model.py:size=tiny,steps=6,batch=2,seq_len=768",
    "rejection_sampling": "experiments/rejection_sampling.py:size=tiny,rounds=1,k=2,prompts_per_round=8,chunk=8,"
                          "steps=10,batch=8,heldout=0",
    "rl": "experiments/rl.py:size=tiny,steps=3,prompts=4,group=4,chat_rm={reward_model},"
          f"chat_weight=0.25,{TINY_RL_SHAPE}",
    # the RL stage's sequence length and new tokens (and its batch of 4 x 4 rows): the calibration's RL run then
    # has the RL stage's train step, which the pipeline's compile cache already holds
    "calibration": "experiments/calibration.py:size=tiny,method=rl,steps=3,batch=4,group=4,eval_prompts=16,"
                   f"{TINY_RL_SHAPE}",
}


def _steps_of(spec: str) -> int:
    """The steps= argument of a stage's config spec."""
    return int(dict(kv.split("=", 1) for kv in spec.partition(":")[2].split(","))["steps"])


# tiny: each stage's own eval once, at its last step (eval_every = its steps), over one batch, and none in RL (the
# pipeline's suites score every stage); checkpoints at half-way and at the end (a kill resumes from half-way; the
# stages' own defaults, every 1-7 steps, would write 30 checkpoints); the 3 layers unscanned (one leaf per layer:
# at this depth the train step compiles in 8.0 s instead of 12.3 and runs faster than with the layer scan)
EVAL_AT_END = ("pretrain", "midtrain", "sft", "reward_model")
TINY_SETS = (tuple(f"{s}:train.eval_every={_steps_of(TINY[s])}" for s in EVAL_AT_END)
             + tuple(f"{s}:train.eval_batches=1" for s in EVAL_AT_END) + ("rl:train.eval_every=0",)
             + tuple(f"{s}:train.checkpoint_every={_steps_of(TINY[s]) // 2}" for s in EVAL_AT_END)
             + tuple(f"{s}:model.scan_layers=false" for s in STAGES))

FULL = {
    "pretrain": "experiments/pretrain.py:size={size},steps=100000",
    "midtrain": "experiments/midtrain.py:size={size},steps=20000",
    "sft": "experiments/sft.py:size={size},steps=5000",
    "reward_model": "experiments/reward_model.py:size={size},steps=2000",
    "rejection_sampling": "experiments/rejection_sampling.py:size={size},rounds=3,steps=1000",
    "rl": "experiments/rl.py:size={size},steps=1000,chat_rm={reward_model}",
    "calibration": "experiments/calibration.py:size={size},method=rl,steps=200",
}
FROM = {"pretrain": "-", "reward_model": "sft"}   # the reward model branches off SFT; the rest chain


def _parse(arg):
    items = [i for i in (arg or "").split(",") if i]
    per_stage = [i for i in items if i.split("=", 1)[0].split(".", 1)[0] in STAGES and "." in i.split("=", 1)[0]]
    rest = ",".join(i for i in items if i not in per_stage)
    args = common.parse_arg(rest, size="tiny", seed=0, suites="math,code,ifeval,tools", limit=0)
    overrides = []
    for item in per_stage:
        key, _, value = item.partition("=")
        stage, _, dotted = key.partition(".")
        overrides.append(f"{stage}:{dotted}={value}")
    return args, tuple(overrides)


def get_config(arg: str | None = None):
    args, overrides = _parse(arg)
    tiny = args.size == "tiny"
    c = common.base_config(args.size)
    c.train.stage = "pipeline"
    c.train.seed = args.seed
    specs = TINY if tiny else {k: v.replace("{size}", args.size) for k, v in FULL.items()}
    c.pipeline.stages = tuple((name, specs[name], FROM.get(name, "")) for name in STAGES)
    c.pipeline.overrides = ((TINY_SETS if tiny else ()) + overrides
                            + tuple(f"{name}:train.seed={args.seed}" for name in STAGES))
    c.pipeline.eval_suites = args.suites
    c.pipeline.eval_limit = args.limit or (4 if tiny else 200)
    c.pipeline.eval_max_new_tokens = 32 if tiny else 1024
    c.pipeline.eval_prompt_bucket = 512 if tiny else 16   # tiny: ifeval's 256-token prompts share math's compile
    return c


def topology(arg: str | None = None) -> str:
    args, _ = _parse(arg)
    return common.pod_topology(args.size)
