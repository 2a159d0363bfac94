"""Pallas kernels (attention, MoE), each with a pure-jnp reference, TPU and GPU backends."""
