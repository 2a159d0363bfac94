"""A trained reward model (a `train.stage='reward_model'` run) as a scorer of conversations, for the RL Chat track.

    scorer = RewardModelScorer("runs/rm_tiny")               # newest checkpoint (or step=N)
    scores = scorer.score([messages_a, messages_b, ...])      # float32 [N]: higher = preferred

Each conversation (a list of chat messages ending with the assistant's reply) renders with the run's tokenizer
and chat template exactly as in training (data/preference.py), and its score is the reward head's output at the
last token. A conversation longer than the run's data.seq_len keeps its LAST seq_len tokens (the reply and
as much context as fits) and is counted in `truncated`. Batches are padded to a fixed (batch_size, seq_len), so
scoring compiles once.
"""
from __future__ import annotations

import os
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kanana_jax import config as config_lib
from kanana_jax.data.chat import ChatRenderer
from kanana_jax.data.tokenizer import make_tokenizer
from kanana_jax.model.heads import RewardModel, last_token_scores
from kanana_jax.train.checkpoint import Checkpointer


class RewardModelScorer:
    """Scores conversations with the reward model of `workdir` (see the module docstring)."""

    def __init__(self, workdir: str, step: int | None = None, batch_size: int = 16):
        path = os.path.join(workdir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: RewardModelScorer needs a reward-model run directory")
        self.cfg = config_lib.read_run_config(path)
        if self.cfg.train.stage != "reward_model":
            raise ValueError(f"{workdir} is a train.stage={self.cfg.train.stage!r} run, not a reward model "
                             "(train a scorer with experiments/reward_model.py)")
        self.model = RewardModel(self.cfg.model)
        shapes = flax.linen.unbox(jax.eval_shape(self.model.init, jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 2), jnp.int32))["params"])
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
        checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=10 ** 6, async_save=False)
        try:
            steps = checkpointer.all_steps()
            if not steps:
                raise FileNotFoundError(f"no committed checkpoint under {checkpointer.directory}")
            self.step = steps[-1] if step is None else step
            self.params = checkpointer.restore_params(self.step, abstract)
        finally:
            checkpointer.close()
        self.tokenizer = make_tokenizer(self.cfg.data.tokenizer)
        self.renderer = ChatRenderer.for_tokenizer(self.tokenizer)
        self.batch_size, self.seq_len = batch_size, self.cfg.data.seq_len
        self.truncated = 0
        self._score = jax.jit(self._scores)

    def _scores(self, params, ids_BxT, lengths_B):
        segments_BxT = (jnp.arange(ids_BxT.shape[1])[None] < lengths_B[:, None]).astype(jnp.int32)
        return last_token_scores(self.model.apply({"params": params}, ids_BxT, None, segments_BxT), lengths_B)

    def encode(self, messages: Sequence[dict]) -> np.ndarray:
        ids = self.renderer.encode(list(messages)).ids_N
        if len(ids) > self.seq_len:
            self.truncated += 1
            ids = ids[-self.seq_len:]
        return ids

    def score(self, conversations: Sequence[Sequence[dict]]) -> np.ndarray:
        """float32 [N]: the reward of each conversation."""
        out = []
        for lo in range(0, len(conversations), self.batch_size):
            chunk = [self.encode(c) for c in conversations[lo:lo + self.batch_size]]
            ids = np.full((self.batch_size, self.seq_len), self.tokenizer.pad_id, np.int32)
            lengths = np.ones((self.batch_size,), np.int32)
            for r, row in enumerate(chunk):
                ids[r, :len(row)], lengths[r] = row, len(row)
            out.append(np.asarray(self._score(self.params, ids, lengths))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)
