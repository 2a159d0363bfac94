"""HuggingFace DeepSeek-V3 `config.json` <-> our `ModelConfig`.

Every key of a DeepSeek-V3 config.json is either mapped to a ModelConfig field, checked against the one value
we implement, or listed as informational (no effect on the forward pass); any other key is an error naming it,
so a checkpoint whose architecture we do not implement is never loaded silently wrong.
"""
from __future__ import annotations

import json
import logging
import math
import os

from kanana_jax import config as config_lib
from kanana_jax.config import ModelConfig

log = logging.getLogger("kanana_jax.convert")


class HFConfigError(ValueError):
    """A config.json field is missing, unsupported, or has a value our model does not implement."""


# config.json key -> ModelConfig field (one to one, same meaning).
DIRECT = {
    "vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
    "first_k_dense_replace": "first_k_dense", "intermediate_size": "d_ff", "num_attention_heads": "n_heads",
    "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim", "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts", "moe_intermediate_size": "moe_d_ff", "num_experts_per_tok": "top_k",
    "norm_topk_prob": "norm_topk_prob", "routed_scaling_factor": "routed_scaling_factor",
    "rms_norm_eps": "rms_norm_eps", "tie_word_embeddings": "tie_embeddings", "initializer_range": "init_std",
}
# Keys handled by dedicated code below (routing method, RoPE, layout of the rope weights).
SPECIAL = ("model_type", "scoring_func", "topk_method", "n_group", "topk_group", "rope_theta", "rope_scaling",
           "rope_parameters", "rope_interleave", "max_position_embeddings", "num_key_value_heads", "head_dim",
           "qk_head_dim", "num_nextn_predict_layers")
# Keys that must hold exactly this value (the only one our model implements); absent means the HF default.
REQUIRED = {"hidden_act": "silu", "attention_bias": False, "moe_layer_freq": 1, "pretraining_tp": 1,
            "attention_dropout": 0.0, "quantization_config": None}
# Keys with no effect on the forward pass (token ids, bookkeeping, training-only or serving-only settings).
INFORMATIONAL = ("architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
                 "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "output_router_logits",
                 "aux_loss_alpha", "seq_aux", "ep_size", "router_aux_loss_coef", "return_dict",
                 "output_hidden_states", "output_attentions", "use_return_dict")
ROPE_KEYS = ("rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate", "partial_rotary_factor")
# ModelConfig fields that describe the architecture (everything config.json determines).
ARCH_FIELDS = tuple(DIRECT.values()) + (
    "attention_type", "score_func", "n_group", "topk_group", "rope_theta", "rope_scaling", "yarn_factor",
    "yarn_original_max_position", "yarn_beta_fast", "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim",
    "norm_param", "logit_soft_cap")


def read_hf_config(path: str) -> dict:
    """The parsed config.json of a checkpoint directory (or of a config.json path)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} does not exist: expected a HuggingFace checkpoint directory with config.json")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise HFConfigError(f"{file} is not valid JSON: {e}") from e


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_fields(hf: dict) -> dict:
    """Our rope_* / yarn_* fields from rope_theta + rope_scaling (legacy) or rope_parameters (transformers 5)."""
    rp = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    unknown = sorted(set(rp) - set(ROPE_KEYS))
    if unknown:
        raise HFConfigError(f"config.json rope_scaling/rope_parameters has unsupported keys {unknown}; "
                            f"supported: {', '.join(ROPE_KEYS)}")
    theta = float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFConfigError(f"config.json partial_rotary_factor={rp['partial_rotary_factor']} is not supported "
                            "(our RoPE rotates all qk_rope_head_dim dims)")
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": "none"}
    if kind != "yarn":
        raise HFConfigError(f"config.json rope type {kind!r} is not supported; supported: 'default', 'yarn'")
    if not rp.get("truncate", True):
        raise HFConfigError("config.json rope_scaling.truncate=false is not supported (our YaRN floors/ceils the "
                            "correction range as DeepSeek-V3 does)")
    original = rp.get("original_max_position_embeddings", hf.get("original_max_position_embeddings",
                                                                   hf.get("max_position_embeddings")))
    if original is None:
        raise HFConfigError("config.json YaRN needs rope_scaling.original_max_position_embeddings "
                            "(or max_position_embeddings)")
    factor = rp.get("factor")
    if factor is None:
        factor = hf["max_position_embeddings"] / original
    # transformers: amplitude mscale(f, mscale)/mscale(f, mscale_all_dim) only when both are set and non-zero,
    # else mscale(f, 1); softmax scale * mscale(f, mscale_all_dim)^2 only when mscale_all_dim is non-zero.
    mscale_all_dim = float(rp.get("mscale_all_dim") or 0.0)
    mscale = float(rp["mscale"]) if rp.get("mscale") and mscale_all_dim else 1.0
    out = {"rope_theta": theta, "rope_scaling": "yarn", "yarn_factor": float(factor),
           "yarn_original_max_position": int(original), "yarn_beta_fast": float(rp.get("beta_fast") or 32.0),
           "yarn_beta_slow": float(rp.get("beta_slow") or 1.0), "yarn_mscale": mscale,
           "yarn_mscale_all_dim": mscale_all_dim}
    if rp.get("attention_factor") is not None:
        implied = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        if abs(float(rp["attention_factor"]) - implied) > 1e-6 * implied:
            raise HFConfigError(f"config.json rope_scaling.attention_factor={rp['attention_factor']} differs from "
                                f"the value {implied:.6g} implied by factor/mscale/mscale_all_dim; an explicit "
                                "attention factor is not supported")
    return out


def _routing_fields(hf: dict) -> dict:
    """score_func / n_group / topk_group from scoring_func + topk_method (DeepSeek-V2/V3 remote-code names)."""
    score = hf.get("scoring_func", "sigmoid")
    if score not in ("sigmoid", "softmax"):
        raise HFConfigError(f"config.json scoring_func={score!r} is not supported; supported: 'sigmoid', 'softmax'")
    method = hf.get("topk_method", "noaux_tc" if score == "sigmoid" else "greedy")
    n_group, topk_group = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
    if method == "greedy":
        n_group = topk_group = 1
    elif method == "noaux_tc":
        if score != "sigmoid" and n_group > 1:
            raise HFConfigError("config.json topk_method='noaux_tc' with scoring_func='softmax' and n_group>1 is not "
                                "supported (our softmax group score is the group maximum)")
    elif method == "group_limited_greedy":
        if score != "softmax":
            raise HFConfigError("config.json topk_method='group_limited_greedy' needs scoring_func='softmax'")
    else:
        raise HFConfigError(f"config.json topk_method={method!r} is not supported; supported: 'noaux_tc', "
                            "'greedy', 'group_limited_greedy'")
    return {"score_func": score, "n_group": n_group, "topk_group": topk_group}


def model_config_from_hf(hf: dict, *, ignore_fields=(), **overrides) -> ModelConfig:
    """ModelConfig of a DeepSeek-V3 config.json dict; `overrides` set non-architecture fields (dtype, impls,
    scan_layers, remat_policy, ...); `ignore_fields` names extra config.json keys known to be harmless."""
    if hf.get("model_type") != "deepseek_v3":
        raise HFConfigError(f"config.json model_type={hf.get('model_type')!r}: only 'deepseek_v3' checkpoints "
                            "(Kanana-2, DeepSeek-V3) are supported")
    known = set(DIRECT) | set(SPECIAL) | set(REQUIRED) | set(INFORMATIONAL) | set(ignore_fields)
    unknown = sorted(set(hf) - known)
    if unknown:
        raise HFConfigError(f"config.json has fields this converter does not implement: {unknown}. If they do not "
                            "change the forward pass, pass them as ignore_fields (CLI: --ignore-field NAME)")
    for key, value in REQUIRED.items():
        if key in hf and hf[key] != value:
            raise HFConfigError(f"config.json {key}={hf[key]!r} is not supported; only {value!r} is implemented")
    arch_overrides = sorted(set(overrides) & set(ARCH_FIELDS))
    if arch_overrides:
        raise HFConfigError(f"overrides {arch_overrides} change the architecture that config.json defines")
    kv_heads = hf.get("num_key_value_heads")
    if kv_heads not in (None, hf.get("num_attention_heads")):
        raise HFConfigError(f"config.json num_key_value_heads={kv_heads} must equal num_attention_heads for MLA")
    missing = sorted(k for k in DIRECT if k not in hf and k not in ("q_lora_rank", "tie_word_embeddings",
                                                                     "initializer_range", "norm_topk_prob"))
    if missing:
        raise HFConfigError(f"config.json lacks required fields {missing}")
    values = {ours: hf[theirs] for theirs, ours in DIRECT.items() if theirs in hf}
    values.setdefault("norm_topk_prob", True)
    values["first_k_dense"] = min(values["first_k_dense"], values["n_layers"])
    values.update(_routing_fields(hf))
    values.update(_rope_fields(hf))
    values.update(attention_type="mla", norm_param="scale")
    values.update(overrides)
    for derived, expected in (("qk_head_dim", hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]),):
        if derived in hf and hf[derived] != expected:
            raise HFConfigError(f"config.json {derived}={hf[derived]} != qk_nope_head_dim + qk_rope_head_dim")
    if float(values.get("rms_norm_eps", 1e-6)) != 1e-6:
        log.warning("rms_norm_eps=%s: transformers' DeepseekV3 normalizes the q/kv latents with eps 1e-6 while "
                    "our model (like vLLM) uses rms_norm_eps there; logits differ slightly from transformers'",
                    values["rms_norm_eps"])
    try:
        return config_lib.build(ModelConfig, values, "model.")
    except config_lib.ConfigError as e:
        raise HFConfigError(f"config.json maps to an invalid model config: {e}") from e


def rope_interleaved(hf: dict) -> bool:
    """Whether the checkpoint's q/k rope columns are in DeepSeek's interleaved pair layout (transformers default)."""
    return bool(hf.get("rope_interleave", True))


def hf_config_from_model(cfg: ModelConfig, base: dict | None = None, *, torch_dtype: str = "float32",
                         router_bias_used: bool = True, interleaved: bool = True) -> dict:
    """A DeepSeek-V3 config.json dict for `cfg`; `interleaved` says how the rope weights are written (DeepSeek's
    interleaved pairs by default); keys of `base` (e.g. the imported checkpoint's token ids) are kept unless they
    describe the architecture."""
    if cfg.attention_type != "mla":
        raise HFConfigError("model.attention_type='gqa' has no DeepSeek-V3 config.json equivalent; export MLA models")
    if cfg.logit_soft_cap is not None:
        raise HFConfigError(f"model.logit_soft_cap={cfg.logit_soft_cap}: DeepSeek-V3 has no attention soft-cap; "
                            "transformers and vLLM would compute different logits")
    if cfg.rope_scaling == "yarn" and not cfg.yarn_mscale_all_dim and cfg.yarn_mscale != 1.0:
        raise HFConfigError(f"model.yarn_mscale={cfg.yarn_mscale} with yarn_mscale_all_dim=0: transformers "
                            "ignores mscale unless mscale_all_dim is set; set model.yarn_mscale_all_dim")
    out = {k: v for k, v in (base or {}).items()
           if k in INFORMATIONAL and k not in ("torch_dtype", "dtype", "transformers_version")}
    out.update({theirs: getattr(cfg, ours) for theirs, ours in DIRECT.items()})
    if base and "max_position_embeddings" in base:
        out["max_position_embeddings"] = base["max_position_embeddings"]
    if cfg.score_func == "sigmoid":
        method = "noaux_tc"
    elif router_bias_used:
        if cfg.n_group > 1:
            raise HFConfigError("softmax routing with a non-zero balancing bias and n_group>1 has no DeepSeek "
                                "config.json equivalent (noaux_tc groups by top-2 sums); set model.n_group=1")
        method = "noaux_tc"
    else:
        method = "group_limited_greedy" if cfg.n_group > 1 else "greedy"
    out.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_act="silu",
               attention_bias=False, attention_dropout=0.0, num_key_value_heads=cfg.n_heads, scoring_func=cfg.score_func,
               topk_method=method, n_group=cfg.n_group, topk_group=cfg.topk_group, moe_layer_freq=1,
               rope_theta=cfg.rope_theta, rope_interleave=interleaved, num_nextn_predict_layers=0, torch_dtype=torch_dtype)
    if cfg.rope_scaling == "yarn":
        out["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": cfg.yarn_factor,
                               "original_max_position_embeddings": cfg.yarn_original_max_position,
                               "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow,
                               "mscale": cfg.yarn_mscale, "mscale_all_dim": cfg.yarn_mscale_all_dim}
        out.setdefault("max_position_embeddings", int(cfg.yarn_original_max_position * cfg.yarn_factor))
    else:
        out["rope_scaling"] = None
        out.setdefault("max_position_embeddings", 4096)
    return dict(sorted(out.items()))


def architecture_dict(cfg: ModelConfig) -> dict:
    """The architecture fields of `cfg` (what must match between a checkpoint and an experiment config)."""
    return {k: getattr(cfg, k) for k in ARCH_FIELDS}


def architecture_mismatch(expected: ModelConfig, actual: ModelConfig) -> dict:
    """{field: (expected, actual)} for architecture fields that differ."""
    a, b = architecture_dict(expected), architecture_dict(actual)
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}
