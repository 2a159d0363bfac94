"""`kanana-jax convert`: HuggingFace DeepSeek-V3 checkpoints <-> our training checkpoints.

    kanana-jax convert hf-config /ckpt/kanana-2-30b-a3b-base
    kanana-jax convert hf-to-orbax /ckpt/kanana-2-30b-a3b-base experiments/pretrain.py:size=kanana2_30b_a3b \
        --workdir runs/mid --set model.param_dtype=bfloat16
    kanana-jax convert orbax-to-hf runs/mid /out/kanana-mid --dtype bfloat16 --base /ckpt/kanana-2-30b-a3b-base
"""
from __future__ import annotations

import json

from kanana_jax.cli import add_config_arguments, build_config, command


def _hf_config(args):
    from kanana_jax.convert import hf_config
    cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(args.hf_dir), ignore_fields=args.ignore_field)
    arch = hf_config.architecture_dict(cfg)
    print(json.dumps(arch, indent=1))
    print(" ".join(f"--set model.{k}={'none' if v is None else v}" for k, v in arch.items()))


def _hf_to_orbax(args):
    from kanana_jax.convert.orbax_hf import hf_to_workdir
    _, cfg = build_config(args.config, args.set)
    path = hf_to_workdir(args.hf_dir, cfg, args.workdir)
    print(f"wrote {path}; continue training with: kanana-jax run {args.config} --workdir {args.workdir} "
          + " ".join(f"--set {s}" for s in args.set))


def _orbax_to_hf(args):
    from kanana_jax.convert.orbax_hf import workdir_to_hf
    step, files = workdir_to_hf(args.workdir, args.out_dir, step=args.step, dtype=args.dtype, base_dir=args.base,
                                max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    print(f"exported step {step} of {args.workdir} to {args.out_dir}: {len(files)} files")


@command("convert", "convert checkpoints: hf-config | hf-to-orbax | orbax-to-hf (HuggingFace DeepSeek-V3 format)")
def convert_command(args):
    args.convert_fn(args)


def _add_arguments(parser):
    sub = parser.add_subparsers(dest="convert_command", required=True)
    p = sub.add_parser("hf-config", help="print the model config (and --set overrides) of a HF checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("--ignore-field", action="append", default=[], metavar="NAME",
                   help="config.json key known not to affect the forward pass")
    p.set_defaults(convert_fn=_hf_config)
    p = sub.add_parser("hf-to-orbax", help="write a HF checkpoint as step 0 of a workdir for `kanana-jax run`")
    p.add_argument("hf_dir")
    add_config_arguments(p)
    p.add_argument("--workdir", required=True, help="new run directory (must hold no checkpoints)")
    p.set_defaults(convert_fn=_hf_to_orbax)
    p = sub.add_parser("orbax-to-hf", help="export a training checkpoint's parameters as a HF checkpoint")
    p.add_argument("workdir")
    p.add_argument("out_dir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="tensor dtype (default: the parameters' own; the router stays float32)")
    p.add_argument("--base", default=None, help="the HF checkpoint the run started from (token ids, tokenizer); "
                   "without it the run's own tokenizer (data.tokenizer) is written")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.set_defaults(convert_fn=_orbax_to_hf)


convert_command.add_arguments = _add_arguments
