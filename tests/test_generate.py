"""Generation: cached greedy decoding equals repeated full forward passes (MLA, MLA+q_lora, GQA; YaRN, soft-cap),
reproducible sampling, exact top-k/top-p masks, stop tokens and stop strings."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kanana_jax.config import ModelConfig
from kanana_jax.generate import sampling as sampling_lib
from kanana_jax.generate.decode_model import DecodeOptions
from kanana_jax.generate.sampler import Sampler, SamplingParams
from kanana_jax.model import Transformer

SMALL = dict(vocab_size=96, d_model=64, n_layers=2, first_k_dense=1, d_ff=128, n_heads=4, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_kv_heads=2, head_dim=16,
             n_routed_experts=4, moe_d_ff=32, top_k=2, moe_block_rows=8, init_std=0.25)
YARN_CAP = dict(rope_scaling="yarn", yarn_factor=4.0, yarn_original_max_position=8, yarn_mscale_all_dim=0.7,
                logit_soft_cap=4.0)
CONFIGS = {
    "mla": ModelConfig(**SMALL),
    "mla_qlora_yarn_cap_unscanned": ModelConfig(**SMALL, **YARN_CAP, q_lora_rank=24, scan_layers=False,
                                                tie_embeddings=True, norm_param="one_plus"),
    "gqa_yarn_cap": ModelConfig(**{**SMALL, "attention_type": "gqa"}, **YARN_CAP),
}
PROMPTS = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9], [60, 61, 62, 63, 64]]


def random_params(model, seed=0, std=0.25):
    """Random normal parameters of the model's tree (norm scales around 1); cheaper than compiling init."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        is_norm = jax.tree_util.keystr(path).endswith("['scale']")
        return jnp.asarray(1.0 + 0.1 * x if is_norm else std * x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, flax.linen.unbox(shapes))


@functools.lru_cache(maxsize=None)
def _model(name):
    cfg = CONFIGS[name]
    model = Transformer(cfg)
    return cfg, model, random_params(model)


@functools.lru_cache(maxsize=None)
def _forward(name):
    _, model, params = _model(name)
    forward = jax.jit(lambda t: model.apply({"params": params}, t))
    return lambda rows: np.asarray(forward(_right_pad(rows)))


def _right_pad(rows, width=16):
    out = np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return out


def _reference_greedy(name, prompts, n_new):
    """Argmax of a full forward pass over right-padded prompt+generation, one token at a time."""
    seqs = [list(p) for p in prompts]
    tokens, logprobs = [], []
    for _ in range(n_new):
        logits = _forward(name)(seqs)
        last = np.array([logits[b, len(s) - 1] for b, s in enumerate(seqs)])
        tok = last.argmax(-1)
        tokens.append(tok)
        logprobs.append(np.asarray(jax.nn.log_softmax(last, -1))[np.arange(len(seqs)), tok])
        for b, s in enumerate(seqs):
            s.append(int(tok[b]))
    return np.stack(tokens, 1), np.stack(logprobs, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_greedy_equals_argmax_of_full_forward(name):
    cfg, _, params = _model(name)
    n_new = 7
    out = Sampler(cfg, params).generate_arrays(PROMPTS, SamplingParams(max_new_tokens=n_new, temperature=0.0),
                                               jax.random.PRNGKey(0))
    ref_tokens, ref_logprobs = _reference_greedy(name, PROMPTS, n_new)
    np.testing.assert_array_equal(out["tokens"], ref_tokens)
    np.testing.assert_allclose(out["logprobs"], ref_logprobs, atol=2e-4)
    assert (out["lengths"] == n_new).all() and (out["finish_reason"] == 0).all()
    assert (out["sample_logprobs"] == 0).all()
    # the greedy path is not degenerate: rows differ and tokens vary along a row
    assert len({tuple(r) for r in out["tokens"]}) == len(PROMPTS)
    assert max(len(set(r)) for r in out["tokens"]) > 2


@pytest.mark.parametrize("name,options", [
    ("mla", DecodeOptions(moe="model", mla_matmul="float32")),          # the first decode path
    ("gqa_yarn_cap", DecodeOptions(moe="gather")),
    ("mla_qlora_yarn_cap_unscanned", DecodeOptions(moe="kernel")),      # Pallas expert kernel, interpret mode
])
def test_every_decode_path_keeps_greedy_equal_to_the_full_forward(name, options):
    cfg, _, params = _model(name)
    n_new = 5
    out = Sampler(cfg, params, decode_options=options).generate_arrays(
        PROMPTS, SamplingParams(max_new_tokens=n_new, temperature=0.0), jax.random.PRNGKey(0))
    ref_tokens, ref_logprobs = _reference_greedy(name, PROMPTS, n_new)
    np.testing.assert_array_equal(out["tokens"], ref_tokens)
    np.testing.assert_allclose(out["logprobs"], ref_logprobs, atol=2e-4)


def test_sampling_is_reproducible_from_the_key_and_respects_top_k():
    cfg, _, params = _model("mla")
    sampler = Sampler(cfg, params)
    sp = SamplingParams(max_new_tokens=7, temperature=1.5, top_k=3, top_p=0.9)
    a = sampler.generate_arrays(PROMPTS, sp, jax.random.PRNGKey(7))
    b = sampler.generate_arrays(PROMPTS, sp, jax.random.PRNGKey(7))
    c = sampler.generate_arrays(PROMPTS, sp, jax.random.PRNGKey(8))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["tokens"], c["tokens"])
    # every drawn token is among the 3 most likely under the full model given the drawn prefix
    prompts = [p + list(t[:-1]) for p, t in zip(PROMPTS, a["tokens"])]
    logits = _forward("mla")(prompts)
    for b, (p, t) in enumerate(zip(PROMPTS, a["tokens"])):
        for i, tok in enumerate(t):
            row = logits[b, len(p) + i - 1]
            assert tok in np.argsort(-row)[:3]
            np.testing.assert_allclose(a["logprobs"][b, i], jax.nn.log_softmax(row)[tok], atol=2e-4)
    assert np.isfinite(a["sample_logprobs"]).all() and (a["sample_logprobs"] <= 1e-6).all()


def test_top_k_top_p_masks_exact_on_crafted_logits():
    logits = jnp.array([[2.0, 1.0, 3.0, 0.0, 1.0],
                        [0.0, 0.0, 0.0, 0.0, 5.0]])
    np.testing.assert_array_equal(sampling_lib.top_k_mask(logits, 2),
                                  [[1, 0, 1, 0, 0], [1, 0, 0, 0, 1]])  # tie at 0.0: lowest id wins
    np.testing.assert_array_equal(sampling_lib.top_k_mask(logits, jnp.array([3, 0])),
                                  [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # per-row k; ties 1.0 -> lower id; 0 = off
    probs = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    for p, keep in [(0.5, [1, 0, 0, 0, 0]), (0.6, [1, 1, 0, 0, 0]), (0.75, [1, 1, 0, 0, 0]),
                    (0.76, [1, 1, 1, 0, 0]), (0.95, [1, 1, 1, 1, 0]), (0.01, [1, 0, 0, 0, 0]), (1.0, [1] * 5)]:
        np.testing.assert_array_equal(sampling_lib.top_p_mask(probs, p), [keep], err_msg=f"top_p={p}")
    # temperature then top-k then top-p: T=0.5 turns [.5,.25,.15,.07,.03] into ~[.7,.17,.06,...]; k=4; p=0.8
    out = sampling_lib.filter_logits(probs, temperature=0.5, top_k=4, top_p=0.8)
    np.testing.assert_array_equal(np.isfinite(out), [[1, 1, 0, 0, 0]])
    np.testing.assert_allclose(out[0, :2], probs[0, :2] / 0.5, rtol=1e-6)
    # sampling with top_k=1 is argmax; greedy returns the argmax and its log-prob
    tok, lp, slp = sampling_lib.sample(jnp.tile(probs, (4, 1)), jax.random.PRNGKey(0), temperature=jnp.array(
        [0.0, 1.0, 1.0, 2.0]), top_k=jnp.array([0, 1, 0, 0]), top_p=jnp.array([1.0, 1.0, 0.4, 1.0]))
    np.testing.assert_array_equal(tok[:3], [0, 0, 0])
    np.testing.assert_allclose(lp[:3], np.log(0.5), rtol=1e-6)
    np.testing.assert_allclose(slp[:3], 0.0, atol=1e-6)   # greedy, or a one-token support
    # ids beyond the tokenizer's vocabulary are never drawn, greedy or sampled
    tok, _, _ = sampling_lib.sample(logits, jax.random.PRNGKey(1), temperature=jnp.array([0.0, 1.0]), valid_vocab=2)
    assert int(tok[0]) == 0 and int(tok[1]) in (0, 1)  # row 0: argmax of ids {0, 1}; row 1: id 4 (5.0) excluded


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    keys = jax.random.split(jax.random.PRNGKey(3), 4000)
    draw = jax.jit(jax.vmap(lambda k: sampling_lib.sample(logits, k, temperature=1.0, top_k=3)[0][0]))
    counts = np.bincount(np.asarray(draw(keys)), minlength=5) / 4000
    np.testing.assert_allclose(counts, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0], atol=0.03)


def test_stop_tokens_and_stop_token_sequences_end_rows():
    cfg, _, params = _model("mla")
    sp = SamplingParams(max_new_tokens=7, temperature=0.0)
    free = Sampler(cfg, params).generate_arrays(PROMPTS, sp, jax.random.PRNGKey(0))["tokens"]
    g = [list(map(int, r)) for r in free]
    stop_id = g[0][2]
    seq = tuple(g[1][3:5])
    sp_stop = SamplingParams(max_new_tokens=7, temperature=0.0, stop_token_ids=(stop_id,))
    out = Sampler(cfg, params).generate_arrays(PROMPTS, sp_stop, jax.random.PRNGKey(0), stop_sequences=[seq])
    for b in range(3):
        ends = [(g[b].index(stop_id) + 1, 1)] if stop_id in g[b] else []
        ends += [(i + 2, 2) for i in range(6) if tuple(g[b][i:i + 2]) == seq][:1]
        end, reason = min(ends) if ends else (7, 0)
        assert int(out["lengths"][b]) == end and int(out["finish_reason"][b]) == reason, (b, g[b], ends)
        np.testing.assert_array_equal(out["tokens"][b, :end], g[b][:end])
        assert (np.asarray(out["tokens"][b, end:]) == 0).all() and (np.asarray(out["logprobs"][b, end:]) == 0).all()


class _LetterTokenizer:
    """ids 0..95 -> letters 'a'+id%26 (so 'a' has several ids); encode uses the smallest id per letter."""
    vocab_size, pad_id, bos_id, eos_id = 96, 95, 94, 93

    def encode(self, text):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + int(i) % 26) for i in ids if int(i) < 93)


def test_stop_strings_cut_text_and_tokens_even_for_non_canonical_tokenizations():
    cfg, _, params = _model("mla")
    tok = _LetterTokenizer()
    sampler = Sampler(cfg, params, tokenizer=tok)
    free = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=7, temperature=0.0), jax.random.PRNGKey(0))
    for c, p in zip(free, PROMPTS):
        assert c.text == tok.decode(c.tokens) and c.finish_reason == "length" and c.prompt_length == len(p)
    text = free[1].text
    stop = text[3:5]
    cut = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=7, temperature=0.0, stop_strings=(stop, "zzzz")),
                           jax.random.PRNGKey(0))
    for full, c in zip(free, cut):
        if stop in full.text:
            n = next(n for n in range(1, 8) if stop in tok.decode(full.tokens[:n]))
            assert c.text == full.text[:full.text.index(stop)] and c.finish_reason == "stop_string"
            assert len(c.tokens) == n and len(c.logprobs) == n
            np.testing.assert_array_equal(c.tokens, full.tokens[:n])
        else:
            assert c.text == full.text and c.finish_reason == "length"
    assert cut[1].finish_reason == "stop_string"
