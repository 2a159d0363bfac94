"""Tokenizers: a byte-level default and HuggingFace `tokenizer.json` files, behind one interface.

Every tokenizer has `.encode(text) -> list[int]` (no special tokens added), `.decode(ids) -> str`
(special tokens dropped), `.vocab_size`, `.pad_id`, `.bos_id`, `.eos_id`, and `.spec`, the string
that `make_tokenizer` accepts to rebuild it.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
  """What the data pipeline needs from a tokenizer."""

  spec: str
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then pad=256, bos=257, eos=258; vocab_size = 259."""

  spec = "byte"
  vocab_size = 259
  pad_id = 256
  bos_id = 257
  eos_id = 258

  def encode(self, text: str) -> list[int]:
    """UTF-8 bytes of `text` as ids in [0, 256)."""
    return list(text.encode("utf-8"))

  def encode_np(self, text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as an int32 array [N]; the fast path used by the pipeline."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    """Bytes back to text; ids >= 256 (pad/bos/eos) are dropped, invalid UTF-8 becomes U+FFFD."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    return arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer(vocab_size=259, pad=256, bos=257, eos=258)"


# Names tried, in order, when looking up special tokens in a tokenizer.json vocabulary.
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|bos|>", "<|startoftext|>", "[CLS]")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|eos|>", "<|endoftext|>", "<|im_end|>", "[SEP]")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>", "<|endoftext|>")


class HFTokenizer:
  """A HuggingFace `tokenizers` tokenizer loaded from a `tokenizer.json` file."""

  def __init__(self, path: str):
    """Loads `path`; finds bos/eos/pad among the usual special-token names (pad falls back to eos)."""
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("HFTokenizer needs the `tokenizers` package: pip install tokenizers") from e
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"tokenizer file {path!r} does not exist; set data.tokenizer to 'byte' or to the path of a "
          "HuggingFace tokenizer.json")
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON.
      raise ValueError(f"cannot load tokenizer file {path!r}: {e}") from e
    self.spec = path
    with open(path, "rb") as f:
      self.content_hash = hashlib.sha256(f.read()).hexdigest()[:16]
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    bos = self._find(BOS_NAMES)
    eos = self._find(EOS_NAMES)
    if bos is None or eos is None:
      missing = "a BOS token (one of %s)" % (BOS_NAMES,) if bos is None else ""
      if eos is None:
        missing += (" and " if missing else "") + "an EOS token (one of %s)" % (EOS_NAMES,)
      raise ValueError(f"tokenizer file {path!r} lacks {missing}; add it as a special token to the file")
    pad = self._find(PAD_NAMES)
    self.bos_id, self.eos_id = bos, eos
    self.pad_id = eos if pad is None else pad

  def _find(self, names: Sequence[str]) -> int | None:
    for name in names:
      idx = self._tok.token_to_id(name)
      if idx is not None:
        return int(idx)
    return None

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without special tokens (the pipeline adds BOS/EOS itself)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_np(self, text: str) -> np.ndarray:
    """Token ids of `text` as an int32 array [N]."""
    return np.asarray(self.encode(text), dtype=np.int32)

  def encode_batch_np(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of many texts at once (parallel in Rust), each an int32 array."""
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encs]

  def decode(self, ids: Sequence[int]) -> str:
    """Ids back to text, special tokens dropped."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def __repr__(self) -> str:
    return (f"HFTokenizer({self.spec!r}, vocab_size={self.vocab_size}, pad={self.pad_id}, "
            f"bos={self.bos_id}, eos={self.eos_id})")


_CACHE: dict[str, Tokenizer] = {}


def make_tokenizer(spec: str) -> Tokenizer:
  """'byte' -> ByteTokenizer; any other string is the path of a HuggingFace tokenizer.json."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"data.tokenizer must be 'byte' or a path to tokenizer.json, got {spec!r}")
  if spec == "byte":
    return ByteTokenizer()
  if not os.path.isfile(spec):
    return HFTokenizer(spec)  # raises FileNotFoundError naming the path
  key = f"{os.path.abspath(spec)}@{os.stat(spec).st_mtime_ns}"
  if key not in _CACHE:
    _CACHE[key] = HFTokenizer(spec)
  return _CACHE[key]


def tokenizer_fingerprint(tok: Tokenizer) -> str:
  """A short string identifying the tokenizer's vocabulary (for cache keys and state checks)."""
  if isinstance(tok, ByteTokenizer):
    return "byte"
  ident = getattr(tok, "content_hash", tok.spec)  # the file's content, not where it lies
  return json.dumps([type(tok).__name__, ident, tok.vocab_size, tok.bos_id, tok.eos_id])
