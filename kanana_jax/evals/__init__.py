"""Embedded eval suites, scoring and calibration.

Modules: `suites` (packaged JSONL suites and prompts), `scoring` (accuracy + ECE per suite),
`calibration` (ECE, Brier, confidence parsing). Nothing is imported here on purpose:
`kanana_jax.rewards.math` imports `evals.calibration`, and eager imports would make a cycle.
"""
