"""Generation: KV-cached batched sampling (`sampler.Sampler`, `sampler.SamplingParams`), the cached decode path
(`decode_model`, `kv_cache`), logit filters (`sampling`) and the Hermes tool-call format (`tool_calls`).

Nothing is imported here on purpose: `kanana_jax.rewards.tools` imports `generate.tool_calls` and must not
pull in jax.
"""
