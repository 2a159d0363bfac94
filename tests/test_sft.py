"""SFT: the assistant mask survives packing exactly, a conversation is never split (cut at a turn boundary when
too long), bucket weights hold over 1000 batches, the loss falls on a tiny run, and the configs build and sweep."""
import json

import numpy as np
import pytest

from experiments import sft as sft_config
from experiments.sweep_dsl import expand
from kanana_jax.cli import build_config
from kanana_jax.config import ConfigError, DataConfig
from kanana_jax.data import pipeline
from kanana_jax.data.chat import ChatRenderer
from kanana_jax.data.chat_records import open_chat_source
from kanana_jax.data.sources import BadRecordError
from kanana_jax.data.tokenizer import make_tokenizer
from kanana_jax.train import loop
from kanana_jax.train.stages import get_stage

TOK = make_tokenizer("byte")


def _segments(batch, row):
    """[(ids of the segment, its targets where trained)] of one packed row."""
    seg, inp, tgt, mask = (batch[k][row] for k in ("segment_ids_BxT", "inputs_BxT", "targets_BxT", "loss_mask_BxT"))
    out = []
    for s in range(1, int(seg.max()) + 1):
        where = np.flatnonzero(seg == s)
        out.append((inp[where], tgt[where][mask[where] > 0]))
    return out


@pytest.mark.parametrize("buckets", [("tool", "chat"), ("math", "code", "ifeval")])
def test_packed_mask_trains_exactly_the_assistant_tokens(buckets):
    seq_len = 3072 if "tool" in buckets else 1024
    mixture = tuple((b, f"sft:{b}", 1.0) for b in buckets)
    it = pipeline.make_iterator(DataConfig(mixture=mixture, seq_len=seq_len, global_batch_size=4), split="train",
                                seed=1)
    renderer = ChatRenderer.for_tokenizer(TOK)
    expected = {}   # rendered ids -> trained target ids, for every conversation of these buckets
    for b in buckets:
        src = open_chat_source(f"sft:{b}", split="train")
        for i in range(len(src)):
            enc = src.chat_tokens(i, renderer)
            expected[enc.ids_N.tobytes()] = enc.ids_N[enc.loss_mask_N > 0]
    checked = tool_calls = 0
    for _ in range(3):
        batch = next(it)
        for row in range(4):
            for ids, trained in _segments(batch, row):
                assert ids.tobytes() in expected, "a packed segment is a whole rendered conversation"
                np.testing.assert_array_equal(trained, expected[ids.tobytes()])
                assert TOK.decode(trained.tolist()).count("User:") == 0   # no user / tool text trained
                tool_calls += "<tool_call>" in TOK.decode(trained.tolist())
                checked += 1
    assert checked >= 12 and (tool_calls > 0) == ("tool" in buckets)


def test_a_too_long_conversation_is_cut_at_a_turn_boundary_or_dropped():
    renderer = ChatRenderer.for_tokenizer(TOK)
    src = open_chat_source("sft:chat", split="train")
    multi = next(i for i in range(len(src)) if sum(m["role"] == "assistant" for m in src[i]["messages"]) >= 2)
    enc = src.chat_tokens(multi, renderer)
    first_end, second_end = enc.assistant_ends[:2]
    seq_len = (first_end + second_end) // 2          # room for the first assistant turn, not the second
    it = pipeline.TokenBatchIterator([("chat", src, 1.0)], TOK, seq_len=seq_len, global_batch_size=1,
                                     split="train", seed=0, shuffle=False)
    tokens, trained = it._conversation(enc)          # what the iterator keeps of that conversation
    np.testing.assert_array_equal(tokens, enc.ids_N[:first_end])
    assert tokens[-1] == TOK.eos_id and trained[-1] == 1.0   # ends with the first turn's end-of-turn token
    assert it.stats()["truncated_conversations"] == 1
    drop = pipeline.TokenBatchIterator([("chat", src, 1.0)], TOK, seq_len=seq_len, global_batch_size=1,
                                       split="train", seed=0, chat_too_long="drop")
    assert drop._conversation(enc) is None and drop.stats()["dropped_conversations"] == 1


def test_bucket_weights_hold_over_1000_batches():
    weights = {"chat": 0.5, "math": 0.3, "code": 0.2}
    cfg = DataConfig(mixture=tuple((b, f"sft:{b}", w) for b, w in weights.items()), mixture_weights_in="tokens",
                     seq_len=768, global_batch_size=2, chat_too_long="drop")
    it = pipeline.make_iterator(cfg, split="train", seed=0)
    for _ in range(1000):
        next(it)
    counts = it.stats()["packed_tokens_per_source"]
    total = sum(counts.values())
    for b, w in weights.items():
        assert abs(counts[b] / total - w) < 0.01, (b, counts[b] / total)


def test_a_bad_message_record_is_named_with_file_line_and_field(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    path = tmp_path / "mine_train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, good, bad)) + "\n")
    cfg = DataConfig(mixture=(("mine", f"chat:{tmp_path}/mine_{{split}}.jsonl", 1.0),), seq_len=64,
                     global_batch_size=4)
    with pytest.raises(BadRecordError, match=r"mine_train.jsonl line 3: messages\[1\].role: 'bot'"):
        for _ in range(3):
            next(pipeline.make_iterator(cfg, split="train", seed=0))
    skip = pipeline.make_iterator(DataConfig(mixture=cfg.mixture, seq_len=64, global_batch_size=4,
                                             on_bad_record="skip"), split="train", seed=0)
    next(skip)
    assert skip.stats()["skipped_records"] >= 1


def test_sft_loss_falls_on_a_tiny_run(tmp_path):
    _, cfg = build_config("experiments/sft.py:size=tiny,steps=30,batch=4,seq_len=512,chat=1,math=1,code=0,ifeval=0",
                          ["model.n_layers=2", "train.log_every=1", "train.progress_bar=false",
                           "train.tensorboard=false", "train.eval_every=0", "train.checkpoint_every=0",
                           "optimizer.learning_rate=3e-3", "data.chat_too_long=drop"])
    loop.run(cfg, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < first - 1.0, (first, last)
    assert {"tokens/chat", "tokens/math", "lm_loss/chat", "lm_loss/math"} <= set(rows[-1])
    assert rows[-1]["tokens"] == rows[-1]["tokens/chat"] + rows[-1]["tokens/math"]


@pytest.mark.parametrize("size", ["tiny", "small", "kanana2_30b_a3b", "kanana2_155b_a17b"])
def test_sft_config_builds_for_every_size(size):
    _, cfg = build_config(f"experiments/sft.py:size={size}")
    assert cfg.train.stage == "sft" and cfg.sft.buckets and not cfg.data.mixture
    assert ("tool" in [b[0] for b in cfg.sft.buckets]) == (size != "tiny")


def test_sft_sweep_expands_and_bad_recipes_are_refused():
    assert len(expand(sft_config.sweep(), sft_config.get_config, "size=tiny")) == 6
    with pytest.raises(ConfigError, match="weights"):
        sft_config.get_config("chat=0,math=0,code=0,ifeval=0")
    _, cfg = build_config("experiments/sft.py:size=tiny", ["sft.buckets=[]"])
    with pytest.raises(ConfigError, match="'sft.buckets' is empty"):
        get_stage("sft").batch_spec(cfg)
