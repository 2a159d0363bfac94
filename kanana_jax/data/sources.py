"""Random-access document sources: `len(src)` documents, `src[i] -> str`.

Kinds: the embedded corpus shipped in `kanana_jax/data/corpus/`, JSONL files, ArrayRecord files
and prepared TFDS datasets. A record that cannot be read raises `BadRecordError` naming the file
and the line (JSONL, 1-based) or record index (ArrayRecord, TFDS, 0-based); the pipeline decides
whether to fail or to skip and count it. Indices never shift: a bad record keeps its slot.

Train/eval splits of file sources: a `{split}` in the path is replaced by 'train' or 'eval';
without it, every `EVAL_EVERY`-th document (index % 25 == 24, 4%) is held out for eval.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Protocol, Sequence

import numpy as np

from kanana_jax.data import tokenizer as tokenizer_lib

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
REASONING_DIR = os.path.join(CORPUS_DIR, "reasoning")  # mid-training chain-of-thought data, not in 'embedded'
EVAL_EVERY = 25
SPLITS = ("train", "eval")
SOURCE_KINDS = ("embedded", "jsonl", "array_record", "tfds", "chat")


class BadRecordError(ValueError):
  """A record that cannot be turned into text; names the file and the line or record index."""

  def __init__(self, path: str, where: str, reason: str):
    self.path, self.where, self.reason = path, where, reason
    super().__init__(f"{path} {where}: {reason} (set data.on_bad_record='skip' to skip and count "
                     "such records instead of failing)")


class DocumentSource(Protocol):
  """A random-access sequence of documents."""

  name: str

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> str: ...


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _expand(pattern: str, what: str) -> list[str]:
  """Comma-separated paths or globs -> sorted existing files; FileNotFoundError names what is missing."""
  if not pattern:
    raise FileNotFoundError(f"no {what} path given: set data.path to a file, a glob, or a "
                            "comma-separated list of them")
  files: list[str] = []
  for part in (p.strip() for p in pattern.split(",")):
    if not part:
      continue
    if glob.has_magic(part):
      matched = sorted(f for f in glob.glob(part) if os.path.isfile(f))
      if not matched:
        raise FileNotFoundError(f"{what} pattern {part!r} matches no file")
      files.extend(matched)
    elif os.path.isfile(part):
      files.append(part)
    else:
      raise FileNotFoundError(f"{what} file {part!r} does not exist")
  return files


def _record_text(obj, text_key: str, path: str, where: str) -> str:
  if not isinstance(obj, dict):
    raise BadRecordError(path, where, f"expected a JSON object, got {type(obj).__name__}")
  if text_key not in obj:
    keys = sorted(obj)[:8]
    raise BadRecordError(path, where, f"no key {text_key!r} (keys: {keys}); set data.text_key")
  text = obj[text_key]
  if not isinstance(text, str):
    raise BadRecordError(path, where, f"{text_key!r} must be a string, got {type(text).__name__}")
  return text


# ----------------------------------------------------------------------------- embedded corpus


def _domains_in(directory: str) -> list[str]:
  return sorted(os.path.basename(f)[:-len("_train.jsonl")] for f in glob.glob(os.path.join(directory, "*_train.jsonl")))


def embedded_domains() -> list[str]:
  """Names of the embedded pre-training corpus domains (files `corpus/<domain>_train.jsonl`): what a bare
  'embedded' source reads."""
  names = _domains_in(CORPUS_DIR)
  if not names:
    raise FileNotFoundError(f"the embedded corpus is missing from {CORPUS_DIR}: reinstall kanana-jax "
                            "(its package data must include kanana_jax/data/corpus/*.jsonl)")
  return names


def reasoning_domains() -> list[str]:
  """Names of the embedded mid-training reasoning domains (`corpus/reasoning/<domain>_train.jsonl`, e.g.
  math_cot, code_cot); read them by name: 'embedded:math_cot,code_cot'."""
  return _domains_in(REASONING_DIR)


def _domain_path(domain: str, split: str) -> str:
  if domain in _domains_in(CORPUS_DIR):
    return os.path.join(CORPUS_DIR, f"{domain}_{split}.jsonl")
  return os.path.join(REASONING_DIR, f"{domain}_{split}.jsonl")


_TOKEN_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


class EmbeddedSource:
  """The corpus shipped with the package: all domains, or the comma-separated ones named."""

  def __init__(self, split: str, domains: Sequence[str] = ()):
    _check_split(split)
    available = embedded_domains()
    domains = tuple(domains) or tuple(available)
    unknown = [d for d in domains if d not in available + reasoning_domains()]
    if unknown:
      raise ValueError(f"unknown embedded corpus domain(s) {unknown}; available: {available} and, for "
                       f"mid-training, {reasoning_domains()}")
    self.split, self.domains = split, domains
    self.name = "embedded:" + ",".join(domains)
    self._texts: list[str] = []
    for d in domains:
      path = _domain_path(d, split)
      with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
          if line.strip():
            self._texts.append(_record_text(json.loads(line), "text", path, f"line {n}"))

  def __len__(self) -> int:
    return len(self._texts)

  def __getitem__(self, index: int) -> str:
    return self._texts[index]

  def token_ids(self, index: int, tok: tokenizer_lib.Tokenizer) -> np.ndarray:
    """Token ids of document `index` [N] int32; the whole split is tokenized once per process."""
    key = (self.split, self.domains, tokenizer_lib.tokenizer_fingerprint(tok))
    if key not in _TOKEN_CACHE:
      if hasattr(tok, "encode_batch_np"):
        parts = tok.encode_batch_np(self._texts)
      else:
        parts = [tok.encode_np(t) for t in self._texts]
      lengths = np.array([len(p) for p in parts], dtype=np.int64)
      offsets = np.concatenate([[0], np.cumsum(lengths)])
      flat = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
      _TOKEN_CACHE[key] = (flat, offsets)
    flat, offsets = _TOKEN_CACHE[key]
    return flat[offsets[index]:offsets[index + 1]]


# ----------------------------------------------------------------------------- JSONL


class JsonlSource:
  """JSON Lines files, one `{text_key: "..."}` object per line, read at random through a line index.

  The index (file, byte range, line number of every non-blank line) is built once when opened;
  a malformed line keeps its index slot and raises `BadRecordError` naming file and line when read.
  """

  _INDEX_CHUNK = 1 << 26

  def __init__(self, pattern: str, text_key: str = "text"):
    self.files = _expand(pattern, "JSONL")
    self.name, self.text_key = pattern, text_key
    file_ids, starts, ends, lines = [], [], [], []
    for fid, path in enumerate(self.files):
      s, e, n = self._index_file(path)
      file_ids.append(np.full(len(s), fid, np.int32))
      starts.append(s)
      ends.append(e)
      lines.append(n)
    self._file_id = np.concatenate(file_ids)
    self._start = np.concatenate(starts)
    self._end = np.concatenate(ends)
    self._line = np.concatenate(lines)
    self._handles: dict[int, object] = {}

  @classmethod
  def _index_file(cls, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte start, byte end (excluding newline) and 1-based line number of each non-blank line."""
    size = os.path.getsize(path)
    if size == 0:
      z = np.zeros(0, np.int64)
      return z, z, z
    data = np.memmap(path, dtype=np.uint8, mode="r")
    newlines = [np.flatnonzero(data[o:o + cls._INDEX_CHUNK] == 10) + o
                for o in range(0, size, cls._INDEX_CHUNK)]
    nl = np.concatenate(newlines).astype(np.int64)
    if len(nl) == 0 or nl[-1] != size - 1:
      nl = np.append(nl, size)  # last line without a trailing newline
    start = np.concatenate([[0], nl[:-1] + 1]).astype(np.int64)
    end = nl.copy()
    line_no = np.arange(1, len(start) + 1, dtype=np.int64)
    keep = end > start
    short = np.flatnonzero(keep & (end - start <= 8))  # whitespace-only lines are blank too
    for i in short:
      if not bytes(data[start[i]:end[i]]).strip():
        keep[i] = False
    del data
    return start[keep], end[keep], line_no[keep]

  def __len__(self) -> int:
    return len(self._start)

  def _handle(self, fid: int):
    if fid not in self._handles:
      self._handles[fid] = open(self.files[fid], "rb")  # pylint: disable=consider-using-with
    return self._handles[fid]

  def __getitem__(self, index: int) -> str:
    fid = int(self._file_id[index])
    path, where = self.files[fid], f"line {int(self._line[index])}"
    f = self._handle(fid)
    f.seek(int(self._start[index]))
    raw = f.read(int(self._end[index] - self._start[index]))
    try:
      obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise BadRecordError(path, where, f"not valid UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
      raise BadRecordError(path, where, f"malformed JSON ({e.msg} at column {e.colno})") from e
    return _record_text(obj, self.text_key, path, where)

  def __del__(self):
    for f in getattr(self, "_handles", {}).values():
      f.close()


# ----------------------------------------------------------------------------- ArrayRecord


def _bytes_to_text(raw, text_key: str, path: str, where: str) -> str:
  """A record as JSON object bytes (`{text_key: ...}`) or raw UTF-8 text."""
  if isinstance(raw, str):
    return raw
  if not isinstance(raw, (bytes, bytearray, np.bytes_)):
    raise BadRecordError(path, where, f"expected bytes, got {type(raw).__name__}")
  try:
    text = bytes(raw).decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadRecordError(path, where, f"neither JSON nor UTF-8 text ({e.reason} at byte {e.start})") from e
  if text.lstrip().startswith("{"):
    try:
      obj = json.loads(text)
    except json.JSONDecodeError:
      return text  # raw text that happens to start with a brace, e.g. code
    return _record_text(obj, text_key, path, where)
  return text


class ArrayRecordSource:
  """ArrayRecord files; each record is JSON object bytes with `text_key`, or raw UTF-8 text."""

  def __init__(self, pattern: str, text_key: str = "text"):
    try:
      from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("data.source='array_record' needs the `array-record` package: "
                        "pip install array-record (or pip install 'kanana-jax[data]')") from e
    self.files = _expand(pattern, "ArrayRecord")
    self.name, self.text_key = pattern, text_key
    self._readers = []
    counts = []
    for path in self.files:
      try:
        reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
      except Exception as e:  # the C++ reader raises RuntimeError/ValueError on corrupt headers
        raise ValueError(f"ArrayRecord file {path!r} cannot be opened ({e}); the whole file is "
                         "unreadable, remove it from data.path or regenerate it") from e
      if not reader.ok():  # e.g. a truncated file: its footer (the record index) is missing
        raise ValueError(f"ArrayRecord file {path!r} is unreadable (truncated or not ArrayRecord); "
                         "remove it from data.path or regenerate it")
      self._readers.append(reader)
      counts.append(reader.num_records())
    self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, index: int) -> str:
    fid = int(np.searchsorted(self._offsets, index, side="right") - 1)
    local = int(index - self._offsets[fid])
    path, where = self.files[fid], f"record {local}"
    try:
      raw = self._readers[fid].read([local])[0]
    except Exception as e:
      raise BadRecordError(path, where, f"unreadable record ({e})") from e
    return _bytes_to_text(raw, self.text_key, path, where)


# ----------------------------------------------------------------------------- TFDS


class TfdsSource:
  """A prepared TFDS dataset read with `tfds.data_source` (ArrayRecord format, no TensorFlow needed)."""

  def __init__(self, name: str, split: str, data_dir: str = "", text_key: str = "text"):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("data.source='tfds' needs the `tensorflow-datasets` package: "
                        "pip install tensorflow-datasets (reading needs no TensorFlow)") from e
    self.name, self.split, self.text_key = f"tfds:{name}[{split}]", split, text_key
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:
      where = f" in data_dir {data_dir!r}" if data_dir else " (set data.tfds_data_dir)"
      raise FileNotFoundError(f"cannot open TFDS dataset {name!r} split {split!r}{where}: {e}") from e

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> str:
    where = f"record {index}"
    try:
      item = self._ds[index]
    except Exception as e:
      raise BadRecordError(self.name, where, f"unreadable record ({e})") from e
    if isinstance(item, dict):
      if self.text_key not in item:
        raise BadRecordError(self.name, where, f"no feature {self.text_key!r} (features: "
                             f"{sorted(item)[:8]}); set data.text_key")
      item = item[self.text_key]
    if isinstance(item, np.ndarray) and item.ndim == 0:
      item = item.item()
    return _bytes_to_text(item, self.text_key, self.name, where)


# ----------------------------------------------------------------------------- splits


class HeldOutView:
  """The train or eval part of a source without its own splits (eval = index % 25 == 24)."""

  def __init__(self, source: DocumentSource, split: str):
    _check_split(split)
    n = len(source)
    idx = np.arange(n, dtype=np.int64)
    held = idx % EVAL_EVERY == EVAL_EVERY - 1
    self._index = idx[held] if split == "eval" else idx[~held]
    self.source, self.name = source, f"{source.name}[{split}]"

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, index: int) -> str:
    return self.source[int(self._index[index])]


def infer_kind(path: str, default_kind: str) -> str:
  """Source kind of a mixture path: 'embedded[:domains]', 'tfds:NAME', *.jsonl, *.array_record*, or a chat
  source ('sft:BUCKETS', 'chat:PATH': message records rendered with their assistant mask)."""
  if path == "embedded" or path.startswith("embedded:"):
    return "embedded"
  if path.startswith(("sft:", "chat:")):
    return "chat"
  if path.startswith("tfds:"):
    return "tfds"
  first = path.split(",")[0].strip()
  if first.endswith((".jsonl", ".json", ".jsonl*", ".json*")):
    return "jsonl"
  if ".array_record" in first or ".arrayrecord" in first:
    return "array_record"
  if default_kind == "embedded":
    raise ValueError(f"cannot tell the source kind of mixture path {path!r}: use 'embedded', "
                     "'tfds:NAME', a *.jsonl path, a *.array_record path, or set data.source")
  return default_kind


def open_source(kind: str, path: str, *, split: str, text_key: str = "text",
                tfds_data_dir: str = "") -> DocumentSource:
  """Opens the `split` ('train'|'eval') of a source of `kind` (one of SOURCE_KINDS) at `path`.

  embedded: path '' or 'embedded' (all domains) or '[embedded:]dom1,dom2'.
  chat: 'sft:BUCKETS' or 'chat:PATH' (conversations; data/chat_records.open_chat_source).
  jsonl / array_record: comma-separated files or globs; '{split}' in the path selects the split.
  tfds: 'NAME[:VERSION][|TRAIN_SPLIT|EVAL_SPLIT]' (default splits 'train' and 'validation').
  """
  _check_split(split)
  if kind == "chat":
    from kanana_jax.data.chat_records import open_chat_source  # pylint: disable=import-outside-toplevel
    return open_chat_source(path, split=split, tfds_data_dir=tfds_data_dir)
  if kind == "embedded":
    spec = path[len("embedded"):].lstrip(":") if path.startswith("embedded") else path
    return EmbeddedSource(split, tuple(d.strip() for d in spec.split(",") if d.strip()))
  if kind == "tfds":
    parts = (path[len("tfds:"):] if path.startswith("tfds:") else path).split("|")
    if not parts[0]:
      raise ValueError("data.path must name the TFDS dataset, e.g. 'my_corpus:1.0.0|train|validation'")
    splits = {"train": parts[1] if len(parts) > 1 else "train",
              "eval": parts[2] if len(parts) > 2 else "validation"}
    return TfdsSource(parts[0], splits[split], tfds_data_dir, text_key)
  if kind in ("jsonl", "array_record"):
    cls = JsonlSource if kind == "jsonl" else ArrayRecordSource
    if "{split}" in path:
      return cls(path.replace("{split}", split), text_key)
    return HeldOutView(cls(path, text_key), split)
  raise ValueError(f"data.source must be one of {SOURCE_KINDS}, got {kind!r}")
