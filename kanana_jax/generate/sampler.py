"""Batched generation: prefill + a `lax.while_loop` decode over a donated KV cache, under jit, on a mesh.

Two levels:
- `decode_model.prefill` + `decode_loop`: jittable array functions over LEFT-padded prompts [B,P] (row b's prompt
  in its last lengths[b] slots) and their lengths; the cache has S = P + max_new_tokens - 1 slots.
- `Sampler(cfg, params, tokenizer=..., mesh=...)`.generate(prompts, SamplingParams(...), key): takes unpadded
  prompts of any lengths (token lists or strings), left-pads them into a power-of-two length bucket, pads the
  batch to a power of two divisible by the mesh's data-parallel size, and returns one `Completion` per prompt
  (tokens, log-probs, finish reason, text). Compiles once per (batch, length bucket, max_new_tokens, filters).
  Repeated prompts (K samples of each, as rejection sampling and GRPO ask) are prefilled once: their cache
  rows and first logits are copied to every row that samples from them (`prefilled_rows` says how many ran).
  Long prompts are prefilled a few rows at a time (`prefill_rows`, bounded by PREFILL_SCORE_BYTES of attention
  scores); the decode loop always runs over the whole batch.

Stops: a stop token id ends a row after emitting it ('stop_token'); a stop string ends it once the text contains
it ('stop_string'): the device loop matches each stop string's token encoding, the host then cuts the text at
the first occurrence of any stop string (catching other tokenizations) and drops tokens after the one that
completed it. `Completion.text` excludes the stop string; tokens include the token that completed it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from kanana_jax import sharding as sharding_lib
from kanana_jax.config import ModelConfig
from kanana_jax.generate import decode_model, kv_cache
from kanana_jax.generate.sampling import sample

FINISH_REASONS = ("length", "stop_token", "stop_string")
# Bound on the prefill's float32 attention scores per call (rows x heads x prompt bucket^2 x 4 bytes): long
# prompts (tool episodes) are prefilled a few rows at a time instead of all at once (the reference attention
# materializes the scores, and the softmax a few copies: 8 rows x 4 heads x 4096^2 took 6.8 GB).
PREFILL_SCORE_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample: temperature 0 = greedy; top_k 0 and top_p 1 disable those filters."""
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings must be non-empty strings")


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated continuation: tokens[n] (incl. a stop token), model log-probs[n] (temperature 1),
    sampling log-probs[n] (the filtered distribution drawn from), why it ended, and its text (stop string cut)."""
    tokens: np.ndarray
    logprobs: np.ndarray
    sample_logprobs: np.ndarray
    finish_reason: str
    text: str | None
    prompt_length: int


def _bucket(n: int, minimum: int) -> int:
    """The next power of two >= max(n, minimum)."""
    return 1 << max(n - 1, minimum - 1, 0).bit_length()


def make_controls(sampling: SamplingParams, stop_sequences: Sequence[Sequence[int]] = (), pad_id: int = 0):
    """(controls, static): the traced knobs of `decode_loop` as numpy arrays, and its static arguments.

    Stop ids and sequences are padded to power-of-two shapes (at least 4), so changing temperature, top-k/p
    values, stop tokens or short stop strings reuses the compiled loop. Stop sequences are right-aligned in
    `stop_seqs` [M,L] with -2 (matches anything) left of a shorter sequence; `stop_seq_valid` [M] marks real rows.
    """
    ids = list(sampling.stop_token_ids)
    stop_ids = np.full((_bucket(len(ids), 4),), -1, np.int32)
    stop_ids[:len(ids)] = ids
    seqs = [tuple(s) for s in stop_sequences if len(s)]
    width = _bucket(max((len(s) for s in seqs), default=1), 4)
    stop_seqs = np.full((_bucket(len(seqs), 4), width), -2, np.int32)
    valid = np.zeros((stop_seqs.shape[0],), bool)
    for m, seq in enumerate(seqs):
        stop_seqs[m, width - len(seq):] = seq
        valid[m] = True
    controls = {"temperature": np.float32(sampling.temperature), "top_k": np.int32(sampling.top_k),
                "top_p": np.float32(sampling.top_p), "stop_ids": stop_ids, "stop_seqs": stop_seqs,
                "stop_seq_valid": valid, "pad_id": np.int32(pad_id)}
    static = {"max_new_tokens": sampling.max_new_tokens, "use_top_k": sampling.top_k > 0,
              "use_top_p": sampling.top_p < 1.0}
    return controls, static


def decode_loop(params, cache, first_logits_BxV, lengths_B, key, controls: dict, *, cfg: ModelConfig,
                max_new_tokens: int, use_top_k: bool = False, use_top_p: bool = False,
                valid_vocab: int | None = None, options: decode_model.DecodeOptions = decode_model.DecodeOptions()):
    """Samples up to N = max_new_tokens tokens after a prefill over S = P + N - 1 cache slots.

    `controls` comes from `make_controls` (temperature/top_k/top_p may also be per-row arrays [B]); ids >=
    `valid_vocab` (beyond the tokenizer's vocabulary) are never drawn; `options` says how a step computes.
    Returns {'tokens' [B,N] (pad_id after the end), 'logprobs' [B,N], 'sample_logprobs' [B,N] (0 after the end),
    'lengths' [B] (tokens generated, stop token included), 'finish_reason' [B] (index into FINISH_REASONS),
    'cache' (the updated cache: returning it lets a donated input cache be updated in place)}.
    """
    N = max_new_tokens
    B = first_logits_BxV.shape[0]
    S = next(iter(next(iter(cache.values())).values())).shape[2]
    P = S - N + 1
    start_B = P - lengths_B.astype(jnp.int32)
    stacked = kv_cache.stacked_layer_params(decode_model.inference_config(cfg), params)
    seqs_MxL, pad_id = controls["stop_seqs"], controls["pad_id"]
    width = seqs_MxL.shape[1]

    def draw(logits_BxV, i):
        return sample(logits_BxV, jax.random.fold_in(key, i), temperature=controls["temperature"],
                      top_k=controls["top_k"] if use_top_k else 0, top_p=controls["top_p"] if use_top_p else 1.0,
                      valid_vocab=valid_vocab, method=options.sampling_filter)

    def record(state, i, tok_B, lp_B, slp_B):
        """Writes step i's draws for unfinished rows and updates done/lengths/finish reasons."""
        done_B = state["done"]
        tok_B = jnp.where(done_B, pad_id, tok_B)
        buf = lax.dynamic_update_slice(state["buf"], tok_B[:, None], (0, width + i))
        hit_token = jnp.isin(tok_B, controls["stop_ids"]) & ~done_B
        window_BxL = lax.dynamic_slice_in_dim(buf, i + 1, width, axis=1)  # the last `width` generated tokens
        match_BxM = jnp.all((seqs_MxL[None] == -2) | (window_BxL[:, None, :] == seqs_MxL[None]), axis=-1)
        hit_string = jnp.any(match_BxM & controls["stop_seq_valid"][None], axis=-1) & ~done_B & ~hit_token
        return dict(
            buf=buf, reason=jnp.where(hit_token, 1, jnp.where(hit_string, 2, state["reason"])),
            done=done_B | hit_token | hit_string, lengths=jnp.where(done_B, state["lengths"], i + 1),
            logprobs=state["logprobs"].at[:, i].set(jnp.where(done_B, 0.0, lp_B)),
            sample_logprobs=state["sample_logprobs"].at[:, i].set(jnp.where(done_B, 0.0, slp_B)),
            cache=state["cache"])

    state = dict(buf=jnp.full((B, width + N), -1, jnp.int32), reason=jnp.zeros((B,), jnp.int32),
                 done=jnp.zeros((B,), bool), lengths=jnp.zeros((B,), jnp.int32),
                 logprobs=jnp.zeros((B, N), jnp.float32), sample_logprobs=jnp.zeros((B, N), jnp.float32),
                 cache=cache)
    state = record(state, 0, *draw(first_logits_BxV, 0))

    def cond(carry):
        i, st = carry
        return (i < N) & ~jnp.all(st["done"])

    def body(carry):
        i, st = carry
        prev_B = lax.dynamic_index_in_dim(st["buf"], width + i - 1, axis=1, keepdims=False)
        logits_BxV, new_cache = decode_model.decode_step(params, st["cache"], prev_B, P + i - 1, start_B, cfg=cfg,
                                                         stacked_layers=stacked, options=options)
        st = record({**st, "cache": new_cache}, i, *draw(logits_BxV, i))
        return i + 1, st

    _, state = lax.while_loop(cond, body, (jnp.int32(1), state))
    tokens_BxN = state["buf"][:, width:]
    tokens_BxN = jnp.where(tokens_BxN < 0, pad_id, tokens_BxN)
    return {"tokens": tokens_BxN, "logprobs": state["logprobs"], "sample_logprobs": state["sample_logprobs"],
            "lengths": state["lengths"], "finish_reason": state["reason"], "cache": state["cache"]}


def shard_params(cfg: ModelConfig, params, mesh, rules):
    """Places a parameter tree on `mesh` with the training layout (logical axes mapped by `rules`)."""
    from kanana_jax.model import Transformer
    model = Transformer(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
    shardings = sharding_lib.param_shardings(boxed, mesh, rules)
    return jax.device_put(params, shardings)


@jax.jit
def _gather_rows(cache, logits_BxV, index_B):
    """Cache rows (axis 1 of every [L, B, S, ...] leaf) and first-token logits of prefilled prompts, copied to the
    rows that sample from them."""
    return jax.tree.map(lambda x: jnp.take(x, index_B, axis=1), cache), jnp.take(logits_BxV, index_B, axis=0)


@functools.lru_cache(maxsize=32)
def _jitted_prefill(cfg: ModelConfig, mesh, batch_axes):
    """The prefill jitted once per model config and mesh layout (shared by Samplers of any decode options)."""
    prefill_out = None
    if mesh is not None:
        prefill_out = (kv_cache.cache_shardings(cfg, mesh, batch_axes), NamedSharding(mesh, P(batch_axes, None)))
    return jax.jit(functools.partial(decode_model.prefill, cfg=cfg), static_argnames=("cache_len",),
                   out_shardings=prefill_out)


@functools.lru_cache(maxsize=32)
def _jitted(cfg: ModelConfig, mesh, batch_axes, options: decode_model.DecodeOptions):
    """(prefill, decode_loop) jitted once per model config, mesh layout and decode options (shared by Samplers)."""
    decode = jax.jit(functools.partial(decode_loop, cfg=cfg, options=options), donate_argnums=(1,),
                     static_argnames=("max_new_tokens", "use_top_k", "use_top_p", "valid_vocab"))
    return _jitted_prefill(cfg, mesh, batch_axes), decode


class Sampler:
    """Generates from a `Transformer` parameter tree; optional tokenizer (for strings) and mesh (batch sharding).

    With `mesh`, rows are split over the mesh axes that `rules` map 'activation_batch' to and the parameters are
    expected on the mesh already (see `shard_params`). `decode_options` (decode_model.DecodeOptions) picks how a
    decode step computes (the default: the fastest paths measured in BENCHMARKS.md "Sampler decode speed").
    """

    def __init__(self, cfg: ModelConfig, params, *, tokenizer=None, mesh=None, rules=None, min_prompt_bucket=16,
                 prefill_score_bytes: int = PREFILL_SCORE_BYTES,
                 decode_options: decode_model.DecodeOptions = decode_model.DecodeOptions()):
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.mesh, self.rules = mesh, rules
        self.min_prompt_bucket = min_prompt_bucket
        self.prefill_score_bytes = prefill_score_bytes
        self.prefilled_rows = 0   # rows the last generate_arrays prefilled (fewer than its batch when prompts repeat)
        self.pad_id = tokenizer.pad_id if tokenizer is not None else 0
        self.batch_axes, self.row_multiple = None, 1
        self._rows = self._rows_2d = None
        if mesh is not None:
            if rules is None:
                raise ValueError("Sampler(mesh=...) needs rules= (e.g. kanana_jax.sharding.logical_rules('fsdp'))")
            axes = dict(rules)["activation_batch"]
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            self.batch_axes = tuple(a for a in axes if mesh.shape[a] > 1) or None
            self.row_multiple = math.prod(mesh.shape[a] for a in (self.batch_axes or ()))
            self._rows = NamedSharding(mesh, P(self.batch_axes))
            self._rows_2d = NamedSharding(mesh, P(self.batch_axes, None))
        self._prefill, self._decode = _jitted(cfg, mesh, self.batch_axes, decode_options)

    def _context(self):
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(sharding_lib.use_mesh(self.mesh))
            stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def prefill_rows(self, rows: int, width: int) -> int:
        """Rows per prefill call for `rows` prompts padded to `width`: the prefill's float32 attention scores
        (rows x heads x width^2, the reference attention materializes them) stay within `prefill_score_bytes`; a
        divisor of `rows` that the data-parallel mesh size divides (at least that size)."""
        per_row = self.cfg.n_heads * width * width * 4
        fits = [r for r in range(self.row_multiple, rows + 1, self.row_multiple)
                if rows % r == 0 and r * per_row <= self.prefill_score_bytes]
        return max(fits, default=self.row_multiple)

    def _prefill_in_chunks(self, tokens, lengths, cache_len: int):
        """(cache, first logits) of left-padded prompts, prefilled `prefill_rows` rows at a time; the decode then
        runs over all rows together."""
        rows = tokens.shape[0]
        step = self.prefill_rows(rows, tokens.shape[1])
        if step >= rows:
            return self._prefill(self.params, *self._put(tokens, lengths), cache_len=cache_len)
        parts = [self._prefill(self.params, *self._put(tokens[i:i + step], lengths[i:i + step]), cache_len=cache_len)
                 for i in range(0, rows, step)]
        cache = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *[c for c, _ in parts])
        return cache, jnp.concatenate([logits for _, logits in parts], axis=0)

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need Sampler(tokenizer=...); or pass token id lists")
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]

    def _stop_sequences(self, sampling: SamplingParams, extra=()) -> tuple[tuple[int, ...], ...]:
        """Token-id stop sequences: the stop strings' encodings plus `extra`, deduplicated, in a stable order."""
        seqs = {tuple(int(t) for t in s) for s in extra}
        if sampling.stop_strings:
            if self.tokenizer is None:
                raise ValueError("stop_strings need Sampler(tokenizer=...) to encode them")
            seqs |= {tuple(self.tokenizer.encode(s)) for s in sampling.stop_strings}
        return tuple(sorted(s for s in seqs if s))

    def generate_arrays(self, prompts: Sequence, sampling: SamplingParams, key,
                        stop_sequences: Sequence[Sequence[int]] = ()) -> dict:
        """Prompts -> numpy dict of `decode_loop` outputs for exactly len(prompts) rows (no host-side stop cut).

        `stop_sequences` are token-id sequences that end a row like stop strings do ('stop_string').
        """
        ids = [self.encode(p) for p in prompts]
        if not ids:
            raise ValueError("generate needs at least one prompt")
        empty = [i for i, p in enumerate(ids) if not p]
        if empty:
            raise ValueError(f"prompts {empty[:5]} are empty; every prompt needs at least one token (e.g. BOS)")
        n = len(ids)
        B = self._rows_for(n)
        Pb = _bucket(max(map(len, ids)), self.min_prompt_bucket)
        unique: dict[tuple, int] = {}
        row_of = [unique.setdefault(tuple(p), len(unique)) for p in ids]
        lengths = np.ones((B,), np.int32)
        lengths[:n] = [len(p) for p in ids]
        cache_len = Pb + sampling.max_new_tokens - 1
        with self._context():
            lengths_d = lengths if self.mesh is None else jax.device_put(lengths, self._rows)
            if len(unique) < n:   # repeated prompts (K samples each): prefill each once, copy its cache rows
                U = self._rows_for(len(unique))
                tokens, u_lengths = self._left_padded(list(unique), U, Pb)
                cache, logits = self._prefill_in_chunks(tokens, u_lengths, cache_len)
                index = np.zeros((B,), np.int32)
                index[:n] = row_of
                cache, logits = _gather_rows(cache, logits, index if self.mesh is None else
                                             jax.device_put(index, self._rows))
                self.prefilled_rows = U
            else:
                tokens, _ = self._left_padded(ids, B, Pb)
                cache, logits = self._prefill_in_chunks(tokens, lengths, cache_len)
                self.prefilled_rows = B
            controls, static = make_controls(sampling, self._stop_sequences(sampling, stop_sequences), self.pad_id)
            out = self._decode(self.params, cache, logits, lengths_d, key, controls, **static,
                               valid_vocab=None if self.tokenizer is None else self.tokenizer.vocab_size)
        out.pop("cache")
        out = jax.device_get(out)
        return {k: np.asarray(v)[:n] for k, v in out.items()} | {"prompt_lengths": lengths[:n]}

    def _rows_for(self, n: int) -> int:
        """Padded batch rows for n prompts: a power of two that the data-parallel mesh size divides."""
        return -(-_bucket(n, 1) // self.row_multiple) * self.row_multiple

    def _left_padded(self, ids, rows: int, width: int):
        tokens = np.full((rows, width), self.pad_id, np.int32)
        lengths = np.ones((rows,), np.int32)
        for b, p in enumerate(ids):
            tokens[b, width - len(p):] = p
            lengths[b] = len(p)
        return tokens, lengths

    def _put(self, tokens, lengths):
        if self.mesh is None:
            return tokens, lengths
        return jax.device_put(tokens, self._rows_2d), jax.device_put(lengths, self._rows)

    def _cut_at_stop_string(self, tokens: np.ndarray, stops: tuple[str, ...]) -> tuple[int, str] | None:
        """(tokens to keep, text before the stop) when the decoded text contains a stop string, else None."""
        text = self.tokenizer.decode(tokens)
        hits = [text.find(s) for s in stops if s in text]
        if not hits:
            return None
        lo, hi = 1, len(tokens)  # smallest prefix whose text contains a stop string (monotone in the prefix)
        while lo < hi:
            mid = (lo + hi) // 2
            prefix = self.tokenizer.decode(tokens[:mid])
            lo, hi = (lo, mid) if any(s in prefix for s in stops) else (mid + 1, hi)
        return lo, text[:min(hits)]

    def generate(self, prompts: Sequence, sampling: SamplingParams, key) -> list[Completion]:
        """Prompts (strings or token-id lists) -> one Completion each; reproducible for a fixed `key`."""
        out = self.generate_arrays(prompts, sampling, key)
        completions = []
        for b in range(len(out["lengths"])):
            n = int(out["lengths"][b])
            tokens = out["tokens"][b, :n]
            reason = FINISH_REASONS[int(out["finish_reason"][b])]
            text = None
            if self.tokenizer is not None:
                cut = self._cut_at_stop_string(tokens, sampling.stop_strings) if sampling.stop_strings else None
                if cut is not None:
                    n, text = cut
                    tokens, reason = tokens[:n], "stop_string"
                else:
                    text = self.tokenizer.decode(tokens)
            completions.append(Completion(tokens, out["logprobs"][b, :n], out["sample_logprobs"][b, :n], reason,
                                          text, int(out["prompt_lengths"][b])))
        return completions
