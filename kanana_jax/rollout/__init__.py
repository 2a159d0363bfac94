"""Rollouts for rejection sampling and RL: prompt sets (`prompts`), sampling from the live params with shared
prefills and multi-turn tool episodes (`generate`), and verification in the real environments (`verify`)."""
