"""kanana_jax: a JAX research stack for Kanana-2-style Mixture-of-Experts language models."""
__version__ = "0.1.0"
