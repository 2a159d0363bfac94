"""Document sources and bad data: missing files, malformed JSONL lines, unreadable ArrayRecord
records, over-long documents, TFDS adapter; skip-and-count never changes the order of the others."""
import dataclasses
import functools
import json
import sys
import types

import numpy as np
import pytest
from array_record.python import array_record_module

from kanana_jax.config import DataConfig
from kanana_jax.data import pipeline, sources, tokenizer


# The real DataConfig, with this file's defaults.
DataCfg = functools.partial(DataConfig, source="jsonl", seq_len=64, global_batch_size=4)


TEXTS = ["record %02d" % i for i in range(40)]


def write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def jsonl_lines(texts):
  return [json.dumps({"text": t}, ensure_ascii=False) for t in texts]


def write_array_record(path, records):
  w = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for r in records:
    w.write(r)
  w.close()
  return str(path)


def row_texts_of(batch):
  """Decoded rows of a batch (one document per row in these tests)."""
  return [tokenizer.ByteTokenizer().decode(row) for row in batch["inputs_BxT"]]


def row_texts(it, n_batches):
  return [t for _ in range(n_batches) for t in row_texts_of(next(it))]


def one_per_row(path, **kw):
  """A config whose rows hold exactly one 'record NN' document each."""
  return DataCfg(path=path, seq_len=len(TEXTS[0]) + 2, global_batch_size=10, **kw)


# ----------------------------------------------------------------------------- JSONL


def test_jsonl_reads_records_by_line_index(tmp_path):
  lines = jsonl_lines(["첫째", "second"]) + ["", "   "] + jsonl_lines(["third {brace}"])
  src = sources.JsonlSource(write_lines(tmp_path / "a.jsonl", lines))
  assert len(src) == 3 and [src[i] for i in range(3)] == ["첫째", "second", "third {brace}"]
  (tmp_path / "noeol.jsonl").write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"body": "last"}))
  src2 = sources.JsonlSource(str(tmp_path / "noeol.jsonl"), text_key="body")
  assert [src2[0], src2[1]] == ["x", "last"]
  both = sources.JsonlSource(f"{tmp_path}/a.jsonl,{tmp_path}/noeol.jsonl", text_key="text")
  assert len(both) == 5


@pytest.mark.parametrize("bad,reason", [
    ('{"text": "unterminated', "malformed JSON"),
    ('["a", "list"]', "expected a JSON object"),
    ('{"body": "no text key"}', "no key 'text'"),
    ('{"text": 42}', "'text' must be a string, got int"),
])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, bad, reason):
  lines = jsonl_lines(TEXTS[:2]) + [""] + [bad] + jsonl_lines(TEXTS[2:4])
  path = write_lines(tmp_path / "bad.jsonl", lines)
  src = sources.JsonlSource(path)
  assert len(src) == 5 and src[3] == TEXTS[2], "the bad line keeps its index slot"
  with pytest.raises(sources.BadRecordError, match=r"bad\.jsonl line 4: " + reason) as e:
    src[2]
  assert "on_bad_record='skip'" in str(e.value)


def test_invalid_utf8_line(tmp_path):
  path = tmp_path / "bin.jsonl"
  path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
  with pytest.raises(sources.BadRecordError, match="line 2: not valid UTF-8"):
    sources.JsonlSource(str(path))[1]


def test_fail_mode_raises_with_file_and_line_during_iteration(tmp_path):
  lines = jsonl_lines(TEXTS)
  lines[17] = "{broken"
  path = write_lines(tmp_path / "train.jsonl", lines)
  it = pipeline.make_iterator(one_per_row(path.replace("train", "{split}")), split="train", seed=0)
  with pytest.raises(sources.BadRecordError, match=r"train\.jsonl line 18"):
    row_texts(it, 4)


def test_skip_mode_counts_and_keeps_the_order_of_the_others(tmp_path):
  good = write_lines(tmp_path / "good_train.jsonl", jsonl_lines(TEXTS))
  lines = jsonl_lines(TEXTS)
  lines[17] = "{broken"
  write_lines(tmp_path / "bad_train.jsonl", lines)
  epoch0 = row_texts(pipeline.make_iterator(one_per_row(good.replace("train", "{split}")), split="train",
                                            seed=3), 4)
  assert sorted(epoch0) == TEXTS
  cfg = one_per_row(str(tmp_path / "bad_{split}.jsonl"), on_bad_record="skip")
  it = pipeline.make_iterator(cfg, split="train", seed=3)
  got = row_texts(it, 4)[:39]
  assert got == [t for t in epoch0 if t != TEXTS[17]]
  # Every encounter is counted (the reader runs ahead of the batches into the next epoch).
  assert it.stats()["skipped_records"] >= 1
  state = it.get_state()
  row_texts(it, 8)
  again = pipeline.make_iterator(cfg, split="train", seed=3)
  again.set_state(state)
  row_texts(again, 8)
  assert again.stats() == it.stats() and it.stats()["skipped_records"] >= 2
  (tmp_path / "bad_train.jsonl").rename(tmp_path / "bad_eval.jsonl")
  one_pass = pipeline.make_iterator(cfg, split="eval", seed=3)
  assert [t for t in row_texts(one_pass, 4) if t] == TEXTS[:17] + TEXTS[18:]
  assert one_pass.stats()["skipped_records"] == 1


def test_every_record_bad_is_an_error(tmp_path):
  path = write_lines(tmp_path / "all_train.jsonl", ["{x", "{y"])
  it = pipeline.make_iterator(DataCfg(path=str(tmp_path / "all_{split}.jsonl"), on_bad_record="skip"),
                              split="train", seed=0)
  with pytest.raises(ValueError, match="every record"):
    next(it)
  del path


# ----------------------------------------------------------------------------- missing files


def test_missing_files_name_the_path(tmp_path):
  missing = str(tmp_path / "absent.jsonl")
  with pytest.raises(FileNotFoundError, match="absent.jsonl"):
    sources.JsonlSource(missing)
  with pytest.raises(FileNotFoundError, match=r"absent\*\.jsonl.*matches no file"):
    sources.JsonlSource(str(tmp_path / "absent*.jsonl"))
  with pytest.raises(FileNotFoundError, match="absent.array_record"):
    sources.ArrayRecordSource(str(tmp_path / "absent.array_record"))
  with pytest.raises(FileNotFoundError, match="absent.jsonl"):
    pipeline.make_iterator(DataCfg(path=missing), split="train", seed=0)
  with pytest.raises(FileNotFoundError, match="data.path"):
    pipeline.make_iterator(DataCfg(path=""), split="train", seed=0)


def test_empty_source_is_an_error(tmp_path):
  (tmp_path / "e_train.jsonl").write_text("\n\n")
  with pytest.raises(ValueError, match="holds no documents"):
    pipeline.make_iterator(DataCfg(path=str(tmp_path / "e_{split}.jsonl")), split="train", seed=0)


# ----------------------------------------------------------------------------- ArrayRecord


def test_array_record_json_raw_and_unreadable_records(tmp_path):
  records = [json.dumps({"text": "json 문서"}).encode(), "raw 텍스트".encode(), b"{not json, raw code",
             b"\xff\xfe\xfd", json.dumps({"other": 1}).encode()]
  path = write_array_record(tmp_path / "d.array_record", records)
  src = sources.ArrayRecordSource(path)
  assert len(src) == 5
  assert [src[0], src[1], src[2]] == ["json 문서", "raw 텍스트", "{not json, raw code"]
  with pytest.raises(sources.BadRecordError, match=r"d\.array_record record 3: neither JSON nor UTF-8"):
    src[3]
  with pytest.raises(sources.BadRecordError, match="record 4: no key 'text'"):
    src[4]


def test_array_record_skip_keeps_order(tmp_path):
  good = [t.encode() for t in TEXTS]
  bad = list(good)
  bad[5] = b"\xff" * len(good[5])
  write_array_record(tmp_path / "g-train.array_record", good)
  write_array_record(tmp_path / "b-train.array_record", bad)
  write_array_record(tmp_path / "b-eval.array_record", bad)
  kw = dict(source="array_record")
  epoch0 = row_texts(pipeline.make_iterator(one_per_row(str(tmp_path / "g-{split}.array_record"), **kw),
                                            split="train", seed=1), 4)
  cfg = one_per_row(str(tmp_path / "b-{split}.array_record"), on_bad_record="skip", **kw)
  it = pipeline.make_iterator(cfg, split="train", seed=1)
  assert row_texts(it, 4)[:39] == [t for t in epoch0 if t != TEXTS[5]]
  assert it.stats()["skipped_records"] >= 1
  one_pass = pipeline.make_iterator(cfg, split="eval", seed=1)
  assert sorted(row_texts(one_pass, 4)) == sorted(TEXTS[:5] + TEXTS[6:] + [""])
  assert one_pass.stats()["skipped_records"] == 1
  with pytest.raises(sources.BadRecordError, match="record 5"):
    row_texts(pipeline.make_iterator(dataclasses.replace(cfg, on_bad_record="fail"), split="train",
                                     seed=1), 4)


def test_unreadable_or_truncated_array_record_file_names_it(tmp_path):
  path = tmp_path / "junk.array_record"
  path.write_bytes(b"this is not an array record file" * 10)
  with pytest.raises(ValueError, match="junk.array_record"):
    sources.ArrayRecordSource(str(path))
  whole = open(write_array_record(tmp_path / "w.array_record", [b"x" * 500] * 300), "rb").read()
  (tmp_path / "cut.array_record").write_bytes(whole[:len(whole) // 2])
  with pytest.raises(ValueError, match="cut.array_record is unreadable|cut.array_record' is unreadable"):
    sources.ArrayRecordSource(str(tmp_path / "cut.array_record"))


def test_corrupted_chunk_records_are_skipped_in_place(tmp_path):
  """Zeroed bytes inside the file break a few records' checksums; the others keep their slots."""
  rng = np.random.default_rng(0)
  texts = ["chunk record %03d %s 가나다" % (i, rng.bytes(60).hex()) for i in range(300)]
  whole = open(write_array_record(tmp_path / "ok.array_record", [t.encode() for t in texts]), "rb").read()
  for frac in range(3, 12):  # find a spot inside record data (not the footer) to corrupt
    broken = bytearray(whole)
    mid = len(whole) // frac
    broken[mid:mid + 300] = bytes(300)
    (tmp_path / "c.array_record").write_bytes(bytes(broken))
    src = sources.ArrayRecordSource(str(tmp_path / "c.array_record"))
    assert len(src) == 300
    bad = []
    for i in range(300):
      try:
        assert src[i] == texts[i]
      except sources.BadRecordError as e:
        assert f"record {i}" in str(e) and "c.array_record" in str(e)
        bad.append(i)
    if bad:
      break
  assert 0 < len(bad) < 20
  (tmp_path / "c.array_record").rename(tmp_path / "c-eval.array_record")
  cfg = DataCfg(source="array_record", path=str(tmp_path / "c-{split}.array_record"),
                on_bad_record="skip", seq_len=len(texts[0].encode()) + 2, global_batch_size=10)
  it = pipeline.make_iterator(cfg, split="eval", seed=0)
  rows = [r for b in it for r in row_texts_of(b) if r]
  assert rows == [t for i, t in enumerate(texts) if i not in bad]
  assert it.stats()["skipped_records"] == len(bad)


# ----------------------------------------------------------------------------- over-long documents


def test_over_long_document_is_split_not_dropped(tmp_path):
  long_text = "가나다라 " * 200  # 2,600 bytes, far over seq_len
  path = write_lines(tmp_path / "long_eval.jsonl", jsonl_lines(["short", long_text, "tail"]))
  it = pipeline.make_iterator(DataCfg(path=path.replace("eval", "{split}"), seq_len=64), split="eval",
                              seed=0)
  batches = list(it)
  st = it.stats()
  assert st["split_documents"] == 1 and st["documents"] == 3
  n_chunks = len(pipeline.chunk_bounds(len(long_text.encode()) + 2, 64))
  assert st["chunks"] == n_chunks + 2
  targets = sum(int(b["loss_mask_BxT"].sum()) for b in batches)
  assert targets == sum(len(t.encode()) + 1 for t in ["short", long_text, "tail"])


def test_chunk_bounds_cover_every_target_once():
  for length in (2, 5, 63, 64, 65, 127, 128, 129, 1000):
    bounds = pipeline.chunk_bounds(length, 64)
    assert all(2 <= hi - lo <= 64 for lo, hi in bounds)
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    targets = [t for lo, hi in bounds for t in range(lo + 1, hi)]
    assert targets == list(range(1, length))


# ----------------------------------------------------------------------------- splits and TFDS


def test_held_out_split_without_placeholder(tmp_path):
  path = write_lines(tmp_path / "all.jsonl", jsonl_lines(["doc %d" % i for i in range(100)]))
  train = sources.open_source("jsonl", path, split="train")
  ev = sources.open_source("jsonl", path, split="eval")
  assert len(train) == 96 and len(ev) == 4
  assert [ev[i] for i in range(4)] == ["doc 24", "doc 49", "doc 74", "doc 99"]
  assert not {train[i] for i in range(96)} & {ev[i] for i in range(4)}


def test_embedded_corpus_splits_are_disjoint():
  for dom in sources.embedded_domains():
    tr, ev = sources.EmbeddedSource("train", (dom,)), sources.EmbeddedSource("eval", (dom,))
    assert len(ev) >= 2 and not {tr[i] for i in range(len(tr))} & {ev[i] for i in range(len(ev))}


def test_tfds_missing_package_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
    sources.open_source("tfds", "my_corpus", split="train")


def test_tfds_source_through_data_source(monkeypatch):
  calls = []

  def data_source(name, split, data_dir):
    calls.append((name, split, data_dir))
    if split == "broken":
      raise FileNotFoundError("no such split")
    return [{"text": np.bytes_(("tfds 문서 %d" % i).encode())} for i in range(5)] + [{"text": b"\xff"}]

  monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(data_source=data_source))
  src = sources.open_source("tfds", "my_corpus:1.0.0", split="eval", tfds_data_dir="/d")
  assert calls[-1] == ("my_corpus:1.0.0", "validation", "/d")
  assert len(src) == 6 and src[2] == "tfds 문서 2"
  with pytest.raises(sources.BadRecordError, match=r"tfds:my_corpus:1.0.0\[validation\] record 5"):
    src[5]
  sources.open_source("tfds", "tfds:c|train[:90%]|train[90%:]", split="train")
  assert calls[-1] == ("c", "train[:90%]", None)
  with pytest.raises(FileNotFoundError, match="'c' split 'broken'"):
    sources.open_source("tfds", "c|broken", split="train")
  cfg = DataCfg(source="tfds", path="my_corpus", on_bad_record="skip", seq_len=16, global_batch_size=2)
  it = pipeline.make_iterator(cfg, split="eval", seed=0)
  assert sum(int(b["loss_mask_BxT"].sum()) for b in it) == 5 * (len("tfds 문서 0".encode()) + 1)
  assert it.stats()["skipped_records"] == 1


def test_mixture_paths_infer_their_kind(tmp_path):
  jl = write_lines(tmp_path / "x.jsonl", jsonl_lines(["doc %d" % i for i in range(50)]))
  ar = write_array_record(tmp_path / "y.array_record", [b"ar %d" % i for i in range(50)])
  cfg = DataCfg(source="embedded",
                mixture=(("j", jl, 1.0), ("a", ar, 1.0), ("e", "embedded:code", 1.0)))
  it = pipeline.make_iterator(cfg, split="train", seed=0)
  for _ in range(10):
    next(it)
  assert all(n > 0 for n in it.stats()["documents_per_source"].values())
