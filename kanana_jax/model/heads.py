"""Scalar heads on the Kanana-2 decoder: a reward model (Bradley-Terry scores) and a value model (PPO critic).

Both run the `Transformer` as a submodule named 'backbone' with `return_hidden=True` (so the backbone has no LM
head) and a float32 linear map D -> 1 per position:

    params = {'backbone': <Transformer params without lm_head>, 'reward_head' | 'value_head': {kernel [D,1], bias [1]}}

A stage using them sets `policy_path = ('backbone',)`: `train.init_from` loads a language model's params there
(its LM head is not read) and MuonClip / the router-bias rule address it. The head's parameters are trained by
AdamW (optim/partition.py DEFAULT_RULES name them; Muon would orthogonalize a [D, 1] matrix into a unit
vector). Sown values (attention max logits, expert loads) appear under 'backbone' in the intermediates.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from kanana_jax.config import ModelConfig
from kanana_jax.model.layers import param_with_axes
from kanana_jax.model.transformer import Transformer


class ScalarHead(nn.Module):
    """h [B,T,D] -> float32 [B,T]: h @ kernel + bias (kernel init normal(init_std), bias 0)."""
    init_std: float

    @nn.compact
    def __call__(self, h_BxTxD):
        kernel = param_with_axes(self, "kernel", (h_BxTxD.shape[-1], 1), ("embed", "head_out"),
                                 nn.initializers.normal(self.init_std), jnp.float32)
        bias = param_with_axes(self, "bias", (1,), ("head_out",), nn.initializers.zeros, jnp.float32)
        return (jnp.einsum("btd,dk->btk", h_BxTxD.astype(jnp.float32), kernel) + bias)[..., 0]


class RewardModel(nn.Module):
    """tokens [B,T] -> a score per position [B,T] float32; a conversation's score is the one at its last token."""
    cfg: ModelConfig
    fp8: object = None  # model/fp8.Fp8Recipe for the backbone (its LM head is never run)

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
        h_BxTxD = Transformer(self.cfg, self.fp8, name="backbone")(tokens_BxT, positions_BxT, segment_ids_BxT,
                                                                   return_hidden=True)
        return ScalarHead(self.cfg.init_std, name="reward_head")(h_BxTxD)


class ValueModel(nn.Module):
    """tokens [B,T] -> value estimate per position [B,T] float32 (PPO's critic)."""
    cfg: ModelConfig
    fp8: object = None  # model/fp8.Fp8Recipe for the backbone (its LM head is never run)

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
        h_BxTxD = Transformer(self.cfg, self.fp8, name="backbone")(tokens_BxT, positions_BxT, segment_ids_BxT,
                                                                   return_hidden=True)
        return ScalarHead(self.cfg.init_std, name="value_head")(h_BxTxD)


def last_token_scores(scores_BxT, lengths_B):
    """The score at each row's last token (index lengths - 1) [B]."""
    index_B = jnp.maximum(lengths_B - 1, 0)
    return jnp.take_along_axis(scores_BxT, index_B[:, None], axis=1)[:, 0]


class PolicyCritic(nn.Module):
    """PPO's learner: the policy Transformer ('policy') and a value model ('critic', its own backbone + head).
    Call `policy_hidden` / `values` through `apply(..., method=...)`; calling the module (init) runs both."""
    cfg: ModelConfig
    fp8: object = None

    def setup(self):
        self.policy = Transformer(self.cfg, self.fp8) if self.fp8 is not None else Transformer(self.cfg)
        self.critic = ValueModel(self.cfg)

    def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
        return self.policy(tokens_BxT, positions_BxT, segment_ids_BxT), self.critic(tokens_BxT, positions_BxT,
                                                                                   segment_ids_BxT)

    def policy_hidden(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
        return self.policy(tokens_BxT, positions_BxT, segment_ids_BxT, return_hidden=True)

    def values(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
        return self.critic(tokens_BxT, positions_BxT, segment_ids_BxT)
