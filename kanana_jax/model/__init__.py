"""The Kanana-2 (DeepSeek-V3 architecture) model in Flax Linen."""
from kanana_jax.model.transformer import Transformer, layer_stacks

__all__ = ["Transformer", "layer_stacks"]
