"""Packing invariants, determinism, exact resume, sharding and mixtures of the batch iterator."""
import dataclasses
import functools
import json

import numpy as np
import pytest

from kanana_jax.config import DataConfig
from kanana_jax.data import pipeline, sources, tokenizer

KEYS = ("inputs_BxT", "targets_BxT", "segment_ids_BxT", "positions_BxT", "loss_mask_BxT")


# The real DataConfig, with this file's defaults.
DataCfg = functools.partial(DataConfig, source="embedded", seq_len=64, global_batch_size=4)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def check_packing(batch, seq_len, pad_id):
  """The invariants every batch must satisfy."""
  inp, tgt, seg, pos, mask = (batch[k] for k in KEYS)
  for k, dt in zip(KEYS, (np.int32,) * 4 + (np.float32,)):
    assert batch[k].dtype == dt and batch[k].shape[1] == seq_len, k
  for r in range(inp.shape[0]):
    s = seg[r]
    n = int((s > 0).sum())
    assert (s[n:] == 0).all() and (s[:n] > 0).all(), "padding only at the end of a row"
    assert (np.diff(s[:n]) >= 0).all() and (np.diff(s[:n]) <= 1).all() and (n == 0 or s[0] == 1)
    starts = np.flatnonzero(np.diff(np.concatenate([[0], s])) != 0)
    for t in range(n):
      expect = 0 if t in starts else pos[r, t - 1] + 1
      assert pos[r, t] == expect
    assert (inp[r, n:] == pad_id).all() and (pos[r, n:] == 0).all()
  same = np.zeros_like(mask, dtype=bool)
  same[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
  np.testing.assert_array_equal(mask, same.astype(np.float32))
  np.testing.assert_array_equal(tgt[:, :-1][same[:, :-1]], inp[:, 1:][same[:, :-1]])
  assert (tgt[mask == 0] == pad_id).all()


def write_jsonl(path, texts):
  with open(path, "w", encoding="utf-8") as f:
    for t in texts:
      f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
  return str(path)


def test_embedded_batches_satisfy_packing_invariants():
  cfg = DataCfg(seq_len=128, global_batch_size=16)
  it = pipeline.make_iterator(cfg, split="train", seed=3)
  tok = tokenizer.ByteTokenizer()
  batches = take(it, 5)
  for b in batches:
    check_packing(b, 128, tok.pad_id)
    assert b["inputs_BxT"].shape == (16, 128)
  st = it.stats()
  assert st["padding_fraction"] < 0.05, st
  assert st["split_documents"] > 0 and st["skipped_records"] == 0
  text = "".join(tok.decode(b["inputs_BxT"].ravel()) for b in batches)
  assert sum("\uac00" <= c <= "\ud7a3" for c in text) > 100 and sum(c.isascii() and c.isalpha() for c in text) > 100


def test_every_target_trained_exactly_once_and_documents_reassemble(tmp_path):
  """Eval pass with window 1: chunks in stream order rebuild every document, long ones included."""
  rng = np.random.default_rng(0)
  docs = ["짧은 문서 %d" % i if i % 3 else "long doc %d: " % i + "abc한글" * int(rng.integers(5, 60))
          for i in range(30)]
  path = write_jsonl(tmp_path / "d_{split}.jsonl", [])
  write_jsonl(tmp_path / "d_eval.jsonl", docs)
  tok = tokenizer.ByteTokenizer()
  src = sources.open_source("jsonl", path, split="eval")
  it = pipeline.TokenBatchIterator([("d", src, 1.0)], tok, seq_len=32, global_batch_size=3, split="eval",
                                   seed=0, pack_window=1)
  segments, n_targets = [], 0
  for b in it:
    check_packing(b, 32, tok.pad_id)
    n_targets += int(b["loss_mask_BxT"].sum())
    for r in range(3):
      for s in range(1, int(b["segment_ids_BxT"][r].max()) + 1):
        segments.append(b["inputs_BxT"][r][b["segment_ids_BxT"][r] == s])
  rebuilt, cur = [], None
  for seg in segments:
    if seg[0] == tok.bos_id:
      cur = list(seg)
    else:
      assert seg[0] == cur[-1], "continuation chunks overlap the previous chunk by one token"
      cur += list(seg[1:])
    if cur[-1] == tok.eos_id:
      rebuilt.append(tok.decode(cur))
  assert rebuilt == docs
  lengths = [len(d.encode()) + 2 for d in docs]
  assert n_targets == sum(n - 1 for n in lengths)
  assert it.stats()["split_documents"] == sum(n > 32 for n in lengths) > 0
  with pytest.raises(StopIteration):
    next(it)


def test_default_packing_trains_every_target_once_in_eval():
  cfg = DataCfg(path="wiki_en", seq_len=64, global_batch_size=4)
  it = pipeline.make_iterator(cfg, split="eval", seed=0)
  n = sum(int(b["loss_mask_BxT"].sum()) for b in it)
  src = sources.EmbeddedSource("eval", ("wiki_en",))
  assert n == sum(len(src[i].encode()) + 1 for i in range(len(src)))
  assert it.stats()["documents"] == len(src)


def test_same_seed_same_batches_other_seed_differs():
  cfg = DataCfg(path="math,code")
  a = take(pipeline.make_iterator(cfg, split="train", seed=1), 4)
  b = take(pipeline.make_iterator(cfg, split="train", seed=1), 4)
  c = take(pipeline.make_iterator(cfg, split="train", seed=2), 4)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["inputs_BxT"], c[0]["inputs_BxT"])


def one_doc_per_row(tmp_path, n=8):
  texts = ["record %02d" % i for i in range(n)]
  path = write_jsonl(tmp_path / "recs_{split}.jsonl", [])
  write_jsonl(tmp_path / "recs_train.jsonl", texts)
  return DataCfg(source="jsonl", path=path, seq_len=len(texts[0]) + 2, global_batch_size=n), texts


def row_texts(batch):
  tok = tokenizer.ByteTokenizer()
  return [tok.decode(row) for row in batch["inputs_BxT"]]


def test_each_epoch_is_a_new_permutation(tmp_path):
  cfg, texts = one_doc_per_row(tmp_path)
  it = pipeline.make_iterator(cfg, split="train", seed=5)
  epochs = [row_texts(b) for b in take(it, 3)]
  for e in epochs:
    assert sorted(e) == texts
  assert epochs[0] != epochs[1] != epochs[2]
  no_shuffle = pipeline.make_iterator(dataclasses.replace(cfg, shuffle=False), split="train", seed=5)
  assert [row_texts(b) for b in take(no_shuffle, 2)] == [texts, texts]


@pytest.mark.parametrize("where", ["mid_epoch", "before_wrap", "after_wrap"])
def test_resume_equals_uninterrupted(where):
  """State saved mid-epoch, just before the reader wraps into epoch 1, and just after it wrapped
  (while chunks of epoch 0 still wait in the packing window)."""
  cfg = DataCfg(path="wiki_ko", seq_len=64, global_batch_size=8)
  ref = pipeline.make_iterator(cfg, split="train", seed=7)
  n_docs = len(sources.EmbeddedSource("train", ("wiki_ko",)))
  if where == "mid_epoch":
    take(ref, 5)
  while where == "before_wrap" and ref.stats()["documents"] < n_docs - 3:
    next(ref)
  while where == "after_wrap" and ref.stats()["epochs"]["embedded"] == 0:
    next(ref)
  state = json.loads(json.dumps(ref.get_state()))
  assert len(json.dumps(state)) < 10_000
  if where == "after_wrap":
    assert state["epoch"] == [1] and state["buffer"], "epoch-0 chunks are still pending"
  expected = take(ref, 12)
  assert ref.stats()["epochs"]["embedded"] == (0 if where == "mid_epoch" else 1)
  fresh = pipeline.make_iterator(cfg, split="train", seed=7)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 12), expected)
  assert fresh.stats() == ref.stats()


def test_resume_of_eval_and_mixture():
  cfg = DataCfg(mixture=(("ko", "embedded:wiki_ko", 1.0), ("m", "embedded:math", 2.0)))
  for split in ("train", "eval"):
    ref = pipeline.make_iterator(cfg, split=split, seed=0)
    take(ref, 3)
    state = ref.get_state()
    rest = list(ref) if split == "eval" else take(ref, 10)
    fresh = pipeline.make_iterator(cfg, split=split, seed=0)
    fresh.set_state(state)
    assert_batches_equal(list(fresh) if split == "eval" else take(fresh, 10), rest)


def test_state_from_other_setup_is_rejected():
  it = pipeline.make_iterator(DataCfg(seq_len=64), split="train", seed=0)
  next(it)
  state = it.get_state()
  with pytest.raises(ValueError, match="seq_len"):
    pipeline.make_iterator(DataCfg(seq_len=32), split="train", seed=0).set_state(state)
  with pytest.raises(ValueError, match="seed"):
    pipeline.make_iterator(DataCfg(seq_len=64), split="train", seed=1).set_state(state)


def test_shards_are_disjoint_slices_of_the_global_batch():
  cfg = DataCfg(global_batch_size=8, seq_len=48)
  whole = take(pipeline.make_iterator(cfg, split="train", seed=0), 3)
  shards = [pipeline.make_iterator(cfg, split="train", seed=0, shard_index=i, shard_count=4)
            for i in range(4)]
  for step in range(3):
    parts = [next(s) for s in shards]
    for k in KEYS:
      assert parts[0][k].shape == (2, 48)
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[step][k])
    rows = [bytes(r) for p in parts for r in p["inputs_BxT"]]
    assert len(set(rows)) == len(rows), "no row appears on two hosts"
  assert all(s.get_state() == shards[0].get_state() for s in shards)
  with pytest.raises(ValueError, match="global_batch_size=8"):
    pipeline.make_iterator(cfg, split="train", seed=0, shard_index=0, shard_count=3)


def test_mixture_realises_weights_per_document():
  cfg = DataCfg(seq_len=256, global_batch_size=16,
                mixture=(("wiki", "embedded:wiki_en,wiki_ko", 3.0), ("math", "embedded:math", 1.0)))
  it = pipeline.make_iterator(cfg, split="train", seed=11)
  while it.stats()["documents"] < 3000:
    next(it)
  per = it.stats()["documents_per_source"]
  share = per["wiki"] / (per["wiki"] + per["math"])
  assert abs(share - 0.75) < 0.03, per  # binomial sd ~ 0.008 at n=3000
  other = pipeline.make_iterator(cfg, split="train", seed=12)
  assert not np.array_equal(next(other)["inputs_BxT"], next(pipeline.make_iterator(
      cfg, split="train", seed=11))["inputs_BxT"])


def test_mixture_entry_errors(tmp_path):
  with pytest.raises(ValueError, match="unique"):
    pipeline.make_iterator(DataCfg(mixture=(("a", "embedded", 1.0), ("a", "embedded", 1.0))),
                           split="train", seed=0)
  with pytest.raises(ValueError, match="weight"):
    pipeline.make_iterator(DataCfg(mixture=(("a", "embedded", 0.0),)), split="train", seed=0)
  with pytest.raises(ValueError, match="source kind"):
    pipeline.make_iterator(DataCfg(mixture=(("a", str(tmp_path / "x.bin"), 1.0),)), split="train", seed=0)
  with pytest.raises(ValueError, match="unknown embedded corpus domain"):
    pipeline.make_iterator(DataCfg(path="klingon"), split="train", seed=0)


def test_hf_tokenizer_pipeline(tmp_path):
  from test_data_tokenizer import build_hf_tokenizer  # pylint: disable=import-outside-toplevel
  path = build_hf_tokenizer(tmp_path / "tokenizer.json")
  tok = tokenizer.make_tokenizer(path)
  it = pipeline.make_iterator(DataCfg(path="wiki_ko", tokenizer=path), split="train", seed=0)
  for b in take(it, 3):
    check_packing(b, 64, tok.pad_id)
    assert b["inputs_BxT"].max() < tok.vocab_size


@pytest.mark.parametrize("mixture", [(), (("ko", "embedded:wiki_ko", 1.0), ("m", "embedded:math", 1.0))])
def test_pretrain_batch_spec_matches_batches(mixture):
  from kanana_jax.config import ExperimentConfig  # pylint: disable=import-outside-toplevel
  from kanana_jax.train.stages import get_stage  # pylint: disable=import-outside-toplevel
  cfg = ExperimentConfig(data=DataCfg(global_batch_size=8, seq_len=32, mixture=mixture))
  spec = get_stage("pretrain").batch_spec(cfg)
  b = next(pipeline.make_iterator(cfg.data, split="train", seed=0, shard_index=1, shard_count=2))
  assert set(b) == set(spec) == set(KEYS) | ({"source_ids_BxT"} if mixture else set())
  for k, field in spec.items():
    assert b[k].shape == field.local(2) and b[k].dtype == field.dtype
