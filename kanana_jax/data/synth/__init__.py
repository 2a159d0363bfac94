"""Seeded generators of the post-training datasets (mid-training reasoning, SFT, preference pairs, prompt sets).

Build: `python -m kanana_jax.data.synth.build` (SFT, preference, prompts) and
`python kanana_jax/data/corpus/build_reasoning.py` (mid-training reasoning corpus). Loading and
re-verification: `kanana_jax.data.posttrain_data`.
"""
