"""HuggingFace DeepSeek-V3 (Kanana-2) checkpoints <-> our model, tokenizer chat templates, orbax <-> HF.

    from kanana_jax.convert.hf_import import load_hf_checkpoint      # config.json + safetensors -> (cfg, params, hf)
    from kanana_jax.convert.hf_export import export_hf               # (params, cfg) -> config.json + safetensors
    from kanana_jax.convert.tokenizer_chat import ChatTokenizer      # chat template -> ids + assistant mask
    from kanana_jax.convert.orbax_hf import hf_to_workdir, workdir_to_hf
CLI: `kanana-jax convert hf-config | hf-to-orbax | orbax-to-hf`.
"""
