"""Experiment ConfigDict -> frozen, validated dataclasses. The only module that sees ml_collections.

Every key an experiment may set is a field below. `load(config_dict)` rejects unknown keys, wrong
types and out-of-range values with a `ConfigError` naming the dotted key and what is allowed.
Model, kernels and optimizer code receive these dataclasses, never a ConfigDict.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Optional


from kanana_jax.config_fields import _INT32_MAX, ConfigError, _check, _field  # noqa: F401 (re-exported)
from kanana_jax.config_posttrain import (CalibrationConfig, DPOConfig, PipelineConfig,  # noqa: F401 (re-exported)
                                         RejectionSamplingConfig, RewardModelConfig, RLConfig, SFTConfig,
                                         parse_reward_spec)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Kanana-2 / DeepSeek-V3 architecture hyperparameters (HF config.json names in comments)."""
    vocab_size: int = _field(320, lo=1)                      # vocab_size
    d_model: int = _field(128, lo=1)                         # hidden_size
    n_layers: int = _field(3, lo=1)                          # num_hidden_layers
    first_k_dense: int = _field(1, lo=0)                     # first_k_dense_replace
    d_ff: int = _field(384, lo=1)                            # intermediate_size (dense layers)
    # attention
    attention_type: Literal["mla", "gqa"] = "mla"
    n_heads: int = _field(4, lo=1)                           # num_attention_heads
    n_kv_heads: int = _field(4, lo=1)                        # GQA only
    head_dim: int = _field(32, lo=1)                         # GQA only
    q_lora_rank: Optional[int] = _field(None, lo=1)          # None: direct query projection (Kanana-2 30B)
    kv_lora_rank: int = _field(64, lo=1)
    qk_nope_head_dim: int = _field(32, lo=1)
    qk_rope_head_dim: int = _field(16, lo=2)
    v_head_dim: int = _field(32, lo=1)
    logit_soft_cap: Optional[float] = _field(None, lo=1e-6)  # tanh soft-cap of attention logits
    attention_impl: Literal["reference", "kernel"] = "reference"
    # positions
    rope_theta: float = _field(10000.0, lo=1.0)
    rope_scaling: Literal["none", "yarn"] = "none"
    yarn_factor: float = _field(1.0, lo=1.0)
    yarn_original_max_position: int = _field(4096, lo=1)
    yarn_beta_fast: float = _field(32.0, lo=0.0)
    yarn_beta_slow: float = _field(1.0, lo=0.0)
    yarn_mscale: float = _field(1.0, lo=0.0)
    yarn_mscale_all_dim: float = _field(1.0, lo=0.0)
    # mixture of experts
    n_routed_experts: int = _field(8, lo=1)
    n_shared_experts: int = _field(1, lo=0)
    moe_d_ff: int = _field(128, lo=1)                        # moe_intermediate_size
    top_k: int = _field(2, lo=1)                             # num_experts_per_tok
    score_func: Literal["softmax", "sigmoid"] = "sigmoid"    # scoring_func
    n_group: int = _field(1, lo=1)
    topk_group: int = _field(1, lo=1)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = _field(1.0, lo=0.0)
    moe_impl: Literal["blocked", "ragged_dot", "pallas"] = "blocked"
    moe_block_rows: int = _field(64, lo=8)                   # row block of the 'blocked' CPU reference
    moe_fused_gate_up: bool = _field(False, doc="moe_impl='pallas' without fp8: gate and up as one grouped matmul "
                                                "over [E, D, 2F] (w_gate | w_up concatenated per call; params "
                                                "unchanged); off: 0.992x on the H200 step (BENCHMARKS.md)")
    # expert parallelism: used when the mesh rules split 'experts' over a mesh axis of size > 1
    expert_parallel: Literal["dropless", "capacity", "off"] = "dropless"  # off: leave the dispatch to GSPMD
    expert_capacity_factor: float = _field(1.25, lo=0.01, doc="capacity mode: slots per expert = factor*copies/E")
    # norms, embeddings, dtypes, init
    rms_norm_eps: float = _field(1e-6, lo=0.0)
    norm_param: Literal["scale", "one_plus"] = "scale"       # scale: w*x_hat (w=1 init); one_plus: (1+w)*x_hat (w=0 init)
    tie_embeddings: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"        # activation / matmul dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    init_std: float = _field(0.02, lo=0.0)
    # compilation
    scan_layers: bool = True
    remat_policy: Literal["none", "full", "dots", "dots_no_batch"] = "none"

    def __post_init__(self):
        _check(self.first_k_dense <= self.n_layers, "model.first_k_dense",
               f"must be <= model.n_layers={self.n_layers}, got {self.first_k_dense}")
        _check(self.top_k <= self.n_routed_experts, "model.top_k",
               f"must be <= model.n_routed_experts={self.n_routed_experts}, got {self.top_k}")
        _check(self.n_routed_experts % self.n_group == 0, "model.n_group",
               f"must divide model.n_routed_experts={self.n_routed_experts}, got {self.n_group}")
        _check(self.topk_group <= self.n_group, "model.topk_group",
               f"must be <= model.n_group={self.n_group}, got {self.topk_group}")
        _check(self.top_k <= self.topk_group * (self.n_routed_experts // self.n_group), "model.top_k",
               "must be <= topk_group * experts per group, so the chosen groups hold enough experts")
        _check(self.qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.attention_type == "gqa":
            _check(self.n_heads % self.n_kv_heads == 0, "model.n_kv_heads",
                   f"must divide model.n_heads={self.n_heads}, got {self.n_kv_heads}")
            _check(self.head_dim % 2 == 0, "model.head_dim", "must be even (RoPE rotates pairs)")

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.first_k_dense

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention_type == "mla" else self.head_dim


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer, schedule and per-group rules (AdamW; Muon plugs in through `name`)."""
    name: Literal["adamw", "muon"] = "adamw"
    learning_rate: float = _field(3e-3, lo=0.0)
    schedule: Literal["constant", "cosine", "wsd"] = "wsd"
    warmup_steps: int = _field(20, lo=0)
    decay_fraction: float = _field(0.2, lo=0.0, hi=1.0, doc="wsd: share of steps spent decaying")
    min_lr_ratio: float = _field(0.1, lo=0.0, hi=1.0)
    b1: float = _field(0.9, lo=0.0, hi=1.0)
    b2: float = _field(0.95, lo=0.0, hi=1.0)
    eps: float = _field(1e-8, lo=0.0)
    weight_decay: float = _field(0.1, lo=0.0)
    grad_clip_norm: float = _field(1.0, lo=0.0, doc="0 disables clipping")
    router_bias_update_rate: float = _field(1e-3, lo=0.0, doc="aux-loss-free balancing: bias += rate*sign(mean-load)")
    # Muon (name='muon'): hidden matrices get orthogonalized momentum, the rest AdamW (kanana_jax/optim/muon.py).
    muon_method: Literal["polar_express", "newton_schulz", "svd"] = "polar_express"
    muon_coeffs: Literal["polar_express_5", "polar_express_8", "newton_schulz_5"] = "polar_express_5"
    muon_steps: int = _field(5, lo=1)
    muon_beta: float = _field(0.95, lo=0.0, hi=0.9999)
    muon_nesterov: bool = True
    muon_scaling: Literal["rms_match", "spectral", "none"] = _field(
        "rms_match", doc="rms_match: 0.2*sqrt(max(fan_in, fan_out)), so AdamW learning rates carry over")
    muon_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    muon_algorithm: Literal["auto", "gram", "direct"] = "auto"
    # gram schedule: "robust" recomputes X and its Gram matrix at steps 1 and 3 (bf16-safe on ill-conditioned
    # inputs); "none" never does (11% faster on the H200, can blow up on adversarial spectra; BENCHMARKS.md Muon)
    muon_restarts: Literal["robust", "none"] = "robust"
    muon_per_head: bool = _field(False, doc="orthogonalize attention projections per head")
    adamw_lr_multiplier: float = _field(1.0, lo=0.0, doc="AdamW-group learning rate = this * learning_rate")
    partition_rules: tuple = _field((), doc="((regex, 'muon'|'adamw'|'frozen'), ...) tried before the defaults")
    muon_clip_tau: float = _field(100.0, lo=0.0, doc="MuonClip: rescale q/k of heads whose max logit > tau; 0 off")
    mup_base_width: int = _field(0, lo=0, doc="hyperparameter transfer from this d_model (0 = off)")

    def __post_init__(self):
        import re
        for rule in self.partition_rules:
            ok = (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
                  and rule[1] in ("muon", "adamw", "frozen"))
            _check(ok, "optimizer.partition_rules", f"each rule is (regex, 'muon'|'adamw'|'frozen'), got {rule!r}")
            try:
                re.compile(rule[0])
            except re.error as e:
                _check(False, "optimizer.partition_rules", f"bad regex {rule[0]!r}: {e}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how they are packed."""
    source: Literal["embedded", "jsonl", "array_record", "tfds", "chat"] = "embedded"
    path: str = ""                   # file or glob for jsonl / array_record; dataset name for tfds
    text_key: str = "text"
    tfds_data_dir: str = ""
    tokenizer: str = "byte"          # 'byte' or a path to a HuggingFace tokenizer.json
    seq_len: int = _field(128, lo=2)
    global_batch_size: int = _field(16, lo=1)
    shuffle: bool = True
    on_bad_record: Literal["fail", "skip"] = "fail"
    chat_too_long: Literal["truncate", "drop"] = _field(
        "truncate", doc="a conversation longer than seq_len: cut after its last whole assistant turn, or drop it")
    mixture: tuple = ()              # ((name, path or 'embedded', weight), ...); empty = the single source above
    mixture_weights_in: Literal["documents", "tokens"] = _field(
        "documents", doc="mixture weights are shares of documents (drawn at random) or of tokens (tracked)")
    eval_sources: tuple = _field((), doc="((name, path), ...): held-out sets evaluated one by one as "
                                         "'eval_loss/<name>'; empty = the held-out splits of the training sources")

    def __post_init__(self):
        for entry in self.mixture:
            ok = (isinstance(entry, (tuple, list)) and len(entry) == 3 and isinstance(entry[0], str)
                  and isinstance(entry[1], str) and isinstance(entry[2], (int, float))
                  and not isinstance(entry[2], bool) and math.isfinite(entry[2]) and entry[2] > 0)
            _check(ok, "data.mixture", f"entries must be (name, path or 'embedded', weight > 0), got {entry!r}")
        for entry in self.eval_sources:
            ok = (isinstance(entry, (tuple, list)) and len(entry) == 2 and all(isinstance(x, str) and x for x in entry))
            _check(ok, "data.eval_sources", f"entries must be (name, path or 'embedded:...'), got {entry!r}")
        names = [e[0] for e in self.eval_sources]
        _check(len(set(names)) == len(names), "data.eval_sources", f"names must be unique, got {names}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Steps, logging, evaluation, checkpointing and loss weights."""
    stage: Literal["pretrain", "midtrain", "sft", "dpo", "reward_model", "rl",
                   "rejection_sampling", "calibration", "pipeline"] = "pretrain"
    init_from: str = _field("", doc="start from another run's params: WORKDIR[:STEP] or hf:DIR (fresh optimizer "
                                    "and data position; used only while the workdir has no checkpoint of its own)")
    steps: int = _field(200, lo=1)
    grad_accum_steps: int = _field(1, lo=1, doc="microbatches per optimizer step; data.global_batch_size must "
                                                "be a multiple (gradients are summed token-weighted in fp32)")
    grad_accum_first_outside: bool = _field(False, doc="run microbatch 0 before the lax.scan over the other "
                                                       "microbatches, so its gradients initialize the fp32 "
                                                       "accumulator (no zero fill, no add into zeros); the same "
                                                       "sums, but the microbatch body compiles twice")
    seed: int = _field(0, lo=0)
    log_every: int = _field(10, lo=1)
    eval_every: int = _field(100, lo=0, doc="0 disables evaluation")
    eval_batches: int = _field(4, lo=1)
    checkpoint_every: int = _field(100, lo=0, doc="0 saves only at the end")
    keep_checkpoints: int = _field(2, lo=1)
    async_checkpoint: bool = True
    seq_aux_loss_coef: float = _field(0.0, lo=0.0, doc="DeepSeek-V3 sequence-wise balance loss weight")
    router_z_loss_coef: float = _field(0.0, lo=0.0)
    peak_tflops_per_device: float = _field(0.0, lo=0.0, doc="0: look up the device kind, else measure")
    progress_bar: bool = True
    tensorboard: bool = True
    # reliability (RELIABILITY.md)
    nonfinite_policy: Literal["stop", "skip"] = "stop"  # NaN/Inf loss or gradient: stop with a report, or skip the update
    max_consecutive_skips: int = _field(5, lo=1, doc="skip policy: stop after this many non-finite steps in a row")
    checkpoint_fallback: bool = True  # an unreadable latest checkpoint: resume from the newest readable one
    debug_poison_steps: tuple = ()    # test/debug aid: steps (1-based) whose batch gets a NaN loss mask

    def __post_init__(self):
        bad = [s for s in self.debug_poison_steps if isinstance(s, bool) or not isinstance(s, int) or s < 1]
        _check(not bad, "train.debug_poison_steps", f"must hold step numbers (ints >= 1), got {bad[:3]}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape per axis; one -1 absorbs the remaining devices."""
    data: int = _field(-1, lo=-1)
    fsdp: int = _field(1, lo=-1)
    expert: int = _field(1, lo=-1)
    tensor: int = _field(1, lo=-1)
    rules: Literal["fsdp", "fsdp_ep", "fsdp_tp_ep"] = "fsdp"
    # multi-slice (DCN) sizes: the axes above are per slice (ICI); each mesh axis spans dcn_* slices in total,
    # so the product of the dcn_* sizes must equal the number of slices. The tensor axis stays inside a slice.
    dcn_data: int = _field(1, lo=1)
    dcn_fsdp: int = _field(1, lo=1)
    dcn_expert: int = _field(1, lo=1)

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "expert": self.expert, "tensor": self.tensor}
        for k, v in sizes.items():
            _check(v != 0 and v >= -1, f"mesh.{k}", "must be a positive size or -1")
        _check(sum(v == -1 for v in sizes.values()) <= 1, "mesh", "at most one axis may be -1")


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    """Matmul precision (kanana_jax/model/fp8.py). 'fp8': the attention projections, dense / shared-expert MLPs and
    routed experts' grouped matmuls (and, with fp8_lm_head, the LM head) take e4m3 operands forward and
    fp8_grad_dtype output gradients, float32 accumulation; master weights and optimizer state are unchanged.
    Delayed scaling keeps per-site amax histories in the train state (TrainState.model_state; the routed experts
    always scale from the current amax). fp8_prequantize: the train step makes the weights' fp8 copies once per
    optimizer step (model/fp8_weights.py) instead of every matmul call quantizing its weight (same values).
    fp8_expert_wgrad: the routed experts' weight gradient also in fp8 (the dense sites' dW always is).
    The fp8_* keys act only with matmul='fp8': set otherwise, they fail."""
    matmul: Literal["bf16", "fp8"] = "bf16"
    fp8_grad_dtype: Literal["e4m3", "e5m2"] = "e5m2"
    fp8_lm_head: bool = False
    fp8_scaling: Literal["current", "delayed"] = "current"
    fp8_amax_history: int = _field(16, lo=1, doc="delayed scaling: steps of amax history per tensor")
    fp8_prequantize: bool = _field(True, doc="the train step quantizes the weights once per optimizer step "
                                   "(model/fp8_weights.py), not in every microbatch's matmul calls; same values")
    fp8_expert_wgrad: bool = _field(False, doc="the routed experts' weight gradient as an fp8 tgmm (e4m3 "
                                    "activations x fp8_grad_dtype cotangents, pallas_kernels/moe/fp8.py) instead "
                                    "of a bf16 one; GPU and CPU reference only (no TPU kernel)")

    def __post_init__(self):
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ("fp8_grad_dtype", "fp8_lm_head", "fp8_scaling", "fp8_amax_history", "fp8_prequantize",
                     "fp8_expert_wgrad"):
            value = getattr(self, name)
            if self.matmul != "fp8":
                _check(value == defaults[name], f"precision.{name}",
                       f"{value!r} acts only with precision.matmul='fp8' (this config has "
                       f"{self.matmul!r}); set precision.matmul='fp8' or leave it at {defaults[name]!r}")
        _check(self.fp8_scaling == "delayed" or self.fp8_amax_history == defaults["fp8_amax_history"],
               "precision.fp8_amax_history", f"{self.fp8_amax_history} acts only with "
               f"precision.fp8_scaling='delayed' (this config has {self.fp8_scaling!r}); set "
               f"precision.fp8_scaling='delayed' or leave it at {defaults['fp8_amax_history']}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: everything a run needs, validated."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    reward_model: RewardModelConfig = dataclasses.field(default_factory=RewardModelConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
    rejection_sampling: RejectionSamplingConfig = dataclasses.field(default_factory=RejectionSamplingConfig)
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)

    def __post_init__(self):
        n, b = self.train.grad_accum_steps, self.data.global_batch_size
        _check(b % n == 0, "train.grad_accum_steps",
               f"{n} does not divide data.global_batch_size={b}; allowed: a divisor of {b}")
        if self.precision.matmul == "fp8":
            _check(self.model.moe_impl != "ragged_dot", "model.moe_impl",
                   "'ragged_dot' cannot run precision.matmul='fp8' (jax.lax.ragged_dot takes no fp8 operands with "
                   "scales); allowed with fp8: 'pallas', 'blocked'")
        if self.precision.fp8_lm_head:
            _check(not self.model.tie_embeddings, "precision.fp8_lm_head",
                   "True needs an untied LM head (model.tie_embeddings=True); allowed with tied embeddings: False")
            # these stages never run the LM head's matmul in the model (reward: no head; dpo, rl: chunked log-probs)
            _check(self.train.stage not in ("dpo", "reward_model", "rl"), "precision.fp8_lm_head",
                   f"True has no effect with train.stage={self.train.stage!r} (its loss reads no LM head through "
                   "the model's fp8 path); allowed: False")


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """Checks (and for int->float, widens) one value against a field type; raises ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config key '{key}': {value!r} is not allowed; allowed values: "
                              f"{', '.join(repr(a) for a in allowed)}{hint}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a bool (True/False), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an int, got {type(value).__name__} {value!r}")
        if abs(value) > _INT32_MAX:
            raise ConfigError(f"config key '{key}': {value} does not fit in int32 (|value| <= {_INT32_MAX})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a float, got {type(value).__name__} {value!r}")
        if (isinstance(value, int) and abs(value) > 1e300) or not math.isfinite(value):
            raise ConfigError(f"config key '{key}': expected a finite float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {type(value).__name__} {value!r}")
        return value
    if tp is tuple:
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"config key '{key}': expected a tuple, got {type(value).__name__} {value!r}")
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    raise TypeError(f"unsupported field type {tp} for {key}")


def build(cls, values: dict | None, prefix: str = ""):
    """Builds dataclass `cls` from a plain nested dict, validating every key; `prefix` names the section."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(fields), n=1)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config key '{prefix}{k}'.{hint} Allowed keys in "
                          f"'{prefix.rstrip('.') or 'the top level'}': {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        key, tp = prefix + name, hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}': expected a section (dict), got {value!r}")
            kwargs[name] = build(tp, value, key + ".")
            continue
        value = _coerce(value, tp, key)
        meta = fields[name].metadata
        lo, hi = meta.get("lo"), meta.get("hi")
        if value is not None and lo is not None and value < lo:
            raise ConfigError(f"config key '{key}': {value!r} is below the minimum {lo}"
                              + (f" ({meta['doc']})" if meta.get("doc") else ""))
        if value is not None and hi is not None and value > hi:
            raise ConfigError(f"config key '{key}': {value!r} is above the maximum {hi}")
        kwargs[name] = value
    return cls(**kwargs)


def load(config: Any) -> ExperimentConfig:
    """Validates an experiment ConfigDict (or nested dict) into an `ExperimentConfig`."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return build(ExperimentConfig, values)


RUN_RECORD_KEYS = ("provenance", "history")  # keys a run adds to its config.json beside the config itself


def read_run_config(path: str) -> ExperimentConfig:
    """The validated config of a run's config.json (written by the loop: the config plus `RUN_RECORD_KEYS`)."""
    import json
    with open(path, encoding="utf-8") as f:
        values = json.load(f)
    return load({k: v for k, v in values.items() if k not in RUN_RECORD_KEYS})


def to_dict(cfg) -> dict:
    """A JSON-serialisable nested dict of a (validated) config dataclass."""
    return dataclasses.asdict(cfg)


def parse_value(text: str, current: Any, key: str):
    """Parses a command-line override `text` for `key` using the type of its current value."""
    lowered = text.strip().lower()
    if isinstance(current, str):
        return text
    if lowered in ("none", "null"):
        return None
    if isinstance(current, bool):
        if lowered not in ("true", "false", "1", "0"):
            raise ConfigError(f"config key '{key}': expected true/false, got {text!r}")
        return lowered in ("true", "1")
    if isinstance(current, int) or current is None:
        try:
            return int(text)
        except ValueError:
            if current is not None:
                raise ConfigError(f"config key '{key}': expected an int, got {text!r}") from None
    if isinstance(current, float) or current is None:
        try:
            return float(text)
        except ValueError:
            if current is not None:
                raise ConfigError(f"config key '{key}': expected a float, got {text!r}") from None
    if isinstance(current, (tuple, list)):
        import json
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config key '{key}': expected a JSON list, got {text!r}") from e
        if not isinstance(parsed, list):
            raise ConfigError(f"config key '{key}': expected a JSON list, got {text!r}")
        return tuple(parsed)
    return text


def apply_overrides(config, overrides: dict[str, Any]):
    """Sets dotted keys on a ConfigDict in place; an unknown key raises ConfigError naming it."""
    for dotted, value in overrides.items():
        node = config
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            where = ".".join(parts[:i + 1])
            if not hasattr(node, "keys"):
                raise ConfigError(f"config key '{'.'.join(parts[:i])}' is a value, not a section; "
                                  f"cannot set '{dotted}'")
            if part not in node:
                keys = list(node.keys())
                close = difflib.get_close_matches(part, keys, n=1)
                hint = f" Did you mean '{'.'.join(parts[:i] + [close[0]])}'?" if close else ""
                raise ConfigError(f"unknown config key '{where}'.{hint} Allowed here: {', '.join(keys)}")
            if i < len(parts) - 1:
                node = node[part]
        current = node[parts[-1]]
        if isinstance(value, str) and not isinstance(current, str):
            value = parse_value(value, current, dotted)
        try:
            node[parts[-1]] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key '{dotted}': cannot set {value!r}: {e}") from e
    return config
