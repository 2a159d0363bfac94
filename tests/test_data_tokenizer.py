"""Tokenizers: byte-level and HuggingFace tokenizer.json round trips (Korean + English), errors."""
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from kanana_jax.data import tokenizer as tok_lib

TEXTS = ["Hello, world! The quick brown fox.", "안녕하세요. 한국어 문장도 잘 되나요?",
         "mixed 한영 text: 3 + 4 = 7\n\ttabs and 줄바꿈", "emoji 🙂 and accents: café", ""]


def build_hf_tokenizer(path, special=("<pad>", "<bos>", "<eos>")):
  """A tiny byte-level BPE tokenizer trained here, saved as tokenizer.json."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(special),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS * 20 + ["서울은 대한민국의 수도이다.", "The Moon orbits Earth."] * 20,
                          trainer=trainer)
  tok.save(str(path))
  return str(path)


def test_byte_round_trip_korean_english():
  tok = tok_lib.make_tokenizer("byte")
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
  for text in TEXTS:
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    np.testing.assert_array_equal(tok.encode_np(text), np.array(ids, np.int32))


def test_byte_decode_drops_specials_and_replaces_broken_utf8():
  tok = tok_lib.ByteTokenizer()
  ids = [tok.bos_id] + tok.encode("한글") + [tok.eos_id, tok.pad_id]
  assert tok.decode(ids) == "한글"
  assert tok.decode(tok.encode("한")[:2]) == "\ufffd"


def test_hf_round_trip_and_special_ids(tmp_path):
  path = build_hf_tokenizer(tmp_path / "tokenizer.json")
  tok = tok_lib.make_tokenizer(path)
  assert isinstance(tok, tok_lib.HFTokenizer)
  raw = tokenizers.Tokenizer.from_file(path)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == tuple(raw.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>"))
  assert tok.vocab_size == raw.get_vocab_size()
  for text in TEXTS:
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text
  batch = tok.encode_batch_np(TEXTS)
  for text, ids in zip(TEXTS, batch):
    np.testing.assert_array_equal(ids, tok.encode_np(text))
  # BPE merges learned on the training text make it shorter than its bytes.
  assert len(tok.encode("서울은 대한민국의 수도이다.")) < len("서울은 대한민국의 수도이다.".encode())


def test_hf_pad_falls_back_to_eos(tmp_path):
  tok = tok_lib.HFTokenizer(build_hf_tokenizer(tmp_path / "t.json", special=("<s>", "</s>")))
  assert tok.pad_id == tok.eos_id != tok.bos_id


def test_missing_tokenizer_file_names_path(tmp_path):
  missing = str(tmp_path / "nope" / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match="nope/tokenizer.json"):
    tok_lib.make_tokenizer(missing)


def test_tokenizer_without_bos_names_path_and_fix(tmp_path):
  path = build_hf_tokenizer(tmp_path / "nobos.json", special=("<pad>",))
  with pytest.raises(ValueError, match="nobos.json.*BOS"):
    tok_lib.make_tokenizer(path)


def test_malformed_tokenizer_file(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps({"not": "a tokenizer"}))
  with pytest.raises(ValueError, match="bad.json"):
    tok_lib.make_tokenizer(str(path))


def test_bad_spec():
  with pytest.raises(ValueError, match="data.tokenizer"):
    tok_lib.make_tokenizer("")
