"""Pre-train Kanana-2 30B-A3B or 155B-A17B on a Cloud TPU pod slice (mesh, batch, sequence, remat per slice).

    python -m launch.compile_aot --config experiments/pod.py:model=30b_a3b            # proof it fits (v5p-128)
    python -m launch.tpu --config experiments/pod.py:model=30b_a3b --project P --zone us-east5-a \
        --workdir gs://BUCKET/runs/30b --set data.source=array_record --set data.path=gs://BUCKET/tokens/*.arrayrecord

Arguments (`key=value,...`): model=30b_a3b|155b_a17b, slice=<TPU slice name> (default: the model's named slice,
see SLICES), batch (global, sequences), seq_len, steps, lr, optimizer=adamw|muon. Layouts measured with
`launch.compile_aot` are in SCALING.md; any other slice uses the same rules with fsdp absorbing the remaining chips.
"""
from experiments import common

# model -> slice -> (mesh overrides, global batch, seq_len). The first slice of each model is its named slice;
# the others are the smallest slices it was shown to fit on (SCALING.md).
SLICES = {
    "30b_a3b": {
        "v5p-128": (dict(rules="fsdp_ep", data=1, fsdp=-1, expert=8, tensor=1), 256, 4096),
        "v5p-16": (dict(rules="fsdp_ep", data=1, fsdp=-1, expert=8, tensor=1), 8, 4096),
    },
    "155b_a17b": {
        "v5p-512": (dict(rules="fsdp_ep", data=1, fsdp=-1, expert=8, tensor=1), 512, 4096),
        "v5p-128": (dict(rules="fsdp_ep", data=1, fsdp=-1, expert=8, tensor=1), 64, 4096),
    },
}
SIZE = {"30b_a3b": "kanana2_30b_a3b", "155b_a17b": "kanana2_155b_a17b"}
MODEL_OF_SIZE = {size: model for model, size in SIZE.items()}


def _args(arg):
    args = common.parse_arg(arg, model="30b_a3b", slice="", batch=0, seq_len=0, steps=100_000, lr=2e-4,
                            optimizer="adamw")
    if args.model not in SLICES:
        raise ValueError(f"unknown pod model {args.model!r}; allowed: {', '.join(SLICES)}")
    return args


def named_slice(model: str, slice_name: str = "") -> str:
    """The slice a pod model is laid out for: `slice_name`, else the model's named slice (first in SLICES)."""
    return slice_name or next(iter(SLICES[model]))


def apply_layout(c, model: str, slice_name: str = ""):
    """Sets the pod layout of `model` on ConfigDict `c` for its slice (mesh, global batch, sequence length,
    bf16 compute with fp32 params, full remat, dropless expert parallelism). Every stage's full-size config uses
    this, so all of them compile for the slices SCALING.md measured. Returns the slice name."""
    name = named_slice(model, slice_name)
    layouts = SLICES[model]
    mesh, batch, seq_len = layouts.get(name, next(iter(layouts.values())))
    c.model.update(dtype="bfloat16", param_dtype="float32", remat_policy="full", scan_layers=True,
                   moe_impl="ragged_dot", expert_parallel="dropless")
    c.mesh.update(mesh)
    c.data.global_batch_size = batch
    c.data.seq_len = seq_len
    c.train.progress_bar = False
    return name


def topology(arg: str | None = None) -> str:
    """The TPU slice this config is laid out for (launchers and compile_aot default to it)."""
    args = _args(arg)
    return named_slice(args.model, args.slice)


def get_config(arg: str | None = None):
    args = _args(arg)
    c = common.base_config(SIZE[args.model])
    apply_layout(c, args.model, args.slice)
    c.data.global_batch_size = args.batch or c.data.global_batch_size
    c.data.seq_len = args.seq_len or c.data.seq_len
    c.train.stage = "pretrain"
    c.train.steps = args.steps
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.optimizer.name = args.optimizer
    c.optimizer.learning_rate = args.lr
    c.optimizer.schedule = "wsd"
    c.optimizer.warmup_steps = 2000
    return c


def sweep():
    """Learning-rate sweep at the named slice (override dicts applied to get_config)."""
    return [{"optimizer.learning_rate": lr} for lr in (1e-4, 2e-4, 4e-4)]
