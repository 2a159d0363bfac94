"""Seeded generators of the post-training datasets (mid-training reasoning, SFT, preference pairs, prompt sets).

Build: `python -m kanana_jax.data.synth.build` (SFT, preference, prompts) and
`python kanana_jax/data/corpus/build_reasoning.py` (mid-training reasoning corpus). Loading and
re-verification: `kanana_jax.data.posttrain_data` (which does not need this package). The generators reuse
the corpus scripts (corpus/facts.py, gen_math.py, src/), so they run from a source checkout, not a wheel.
"""
