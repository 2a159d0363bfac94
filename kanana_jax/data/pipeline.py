"""Packed, resumable token batches: sources -> documents -> chunks -> packed rows -> host batches.

Each document becomes `[BOS] + ids + [EOS]`. A document longer than `seq_len` tokens is split
into chunks of at most `seq_len` tokens that overlap by one token, so every next-token target of
the document is trained exactly once; it is counted in `stats()['split_documents']`, never dropped.
A conversation (a chat source: records of messages, rendered by `data.chat.ChatRenderer` with BOS first
and an end-of-turn token after each assistant turn) keeps its per-token trained mask (assistant tokens
only) and is never split: one longer than `seq_len` is cut after its last whole assistant turn that fits
(`data.chat_too_long='truncate'`, counted in `truncated_conversations`) or dropped (`'drop'`, or when not
even its first assistant turn fits; counted in `dropped_conversations`).
Chunks are packed into rows of `seq_len` tokens by best fit over a window of `PACK_WINDOW`
pending chunks (longest chunk that fits first). A chunk is never split across rows.

Batch (this host's rows, B = global_batch_size // shard_count, T = seq_len):
  inputs_BxT int32      token ids (pad_id on padding)
  targets_BxT int32     the next token of the same segment (pad_id where loss_mask is 0)
  segment_ids_BxT int32 1, 2, 3... per packed chunk in a row, 0 on padding
  positions_BxT int32   0, 1, 2... restarting at every chunk
  loss_mask_BxT float32 1 where the target is the next token of the same chunk (and, in a conversation, an
                        assistant token), else 0
  source_ids_BxT int32  (only with `source_ids`, e.g. for a mixture of several sources) the mixture index of the
                        source each token came from (0 on padding)

Order: split='train' is infinite; each source is shuffled per epoch with a permutation drawn from
(seed, source index, epoch). split='eval' is one pass over every source in order, then
StopIteration (the last batch is filled with padding rows). Every host builds the same global
batch and keeps its rows, so the iterator state is identical on all hosts and does not depend on
shard_count. Mixtures choose each next document's source by weight: with `mix_unit='documents'` at
random from (seed, position), so weights are shares of documents; with `mix_unit='tokens'` the source
furthest below its share of the tokens read so far (ties: the first), so weights are shares of tokens
(the packed tokens per source are in `stats()['packed_tokens_per_source']`).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from kanana_jax.config_fields import ConfigError
from kanana_jax.data import sources as sources_lib
from kanana_jax.data import tokenizer as tokenizer_lib

PACK_WINDOW = 32
STATE_VERSION = 1
MIX_BLOCK = 4096
_MIX_SALT = 0x6D6978
_LOG_SKIPS = 10
BAD_RECORD_MODES = ("fail", "skip")
TOO_LONG_MODES = ("truncate", "drop")
MIX_UNITS = ("documents", "tokens")
BATCH_DTYPES = {"inputs_BxT": np.dtype(np.int32), "targets_BxT": np.dtype(np.int32),
                "segment_ids_BxT": np.dtype(np.int32), "positions_BxT": np.dtype(np.int32),
                "loss_mask_BxT": np.dtype(np.float32)}

log = logging.getLogger(__name__)


def _perm(seed: int, source_index: int, epoch: int, n: int, shuffle: bool) -> np.ndarray:
  """The order of a source's documents in one epoch."""
  if not shuffle:
    return np.arange(n, dtype=np.int64)
  return np.random.default_rng([seed, source_index, epoch]).permutation(n)


def chunk_bounds(length: int, seq_len: int) -> list[tuple[int, int]]:
  """[start, end) of the chunks of a document of `length` tokens (BOS/EOS included); overlap 1."""
  if length <= seq_len:
    return [(0, length)]
  stride = seq_len - 1
  return [(s, min(s + seq_len, length)) for s in range(0, length - 1, stride)]


class TokenBatchIterator:
  """Yields dicts of numpy arrays (see module docstring); `get_state`/`set_state` resume exactly."""

  def __init__(self, sources: Sequence[tuple[str, sources_lib.DocumentSource, float]],
               tokenizer: tokenizer_lib.Tokenizer, *, seq_len: int, global_batch_size: int,
               split: str, seed: int, shuffle: bool = True, on_bad_record: str = "fail",
               shard_index: int = 0, shard_count: int = 1, pack_window: int = PACK_WINDOW,
               mix_unit: str = "documents", source_ids: Sequence[int] | None = None,
               chat_too_long: str = "truncate"):
    if split not in sources_lib.SPLITS:
      raise ValueError(f"split must be one of {sources_lib.SPLITS}, got {split!r}")
    if on_bad_record not in BAD_RECORD_MODES:
      raise ValueError(f"data.on_bad_record must be one of {BAD_RECORD_MODES}, got {on_bad_record!r}")
    if seq_len < 2:
      raise ValueError(f"data.seq_len must be >= 2 (a target needs two tokens), got {seq_len}")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
      raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index} and {shard_count}")
    if global_batch_size < 1 or global_batch_size % shard_count:
      raise ValueError(f"data.global_batch_size={global_batch_size} must be a positive multiple of "
                       f"the number of data shards (hosts) {shard_count}")
    if not sources:
      raise ValueError("no data source given")
    if chat_too_long not in TOO_LONG_MODES:
      raise ValueError(f"data.chat_too_long must be one of {TOO_LONG_MODES}, got {chat_too_long!r}")
    if mix_unit not in MIX_UNITS:
      raise ValueError(f"data.mixture_weights_in must be one of {MIX_UNITS}, got {mix_unit!r}")
    if source_ids is not None and len(source_ids) != len(sources):
      raise ValueError(f"source_ids needs one id per source ({len(sources)}), got {list(source_ids)}")
    for name, src, weight in sources:
      if len(src) == 0:
        raise ValueError(f"data source {name!r} ({src.name}) holds no documents for split {split!r}")
      if not weight > 0:
        raise ValueError(f"data.mixture weight of {name!r} must be > 0, got {weight}")
    self.names = [name for name, _, _ in sources]
    self._sources = [src for _, src, _ in sources]
    weights = np.array([w for _, _, w in sources], dtype=np.float64)
    self.weights = weights / weights.sum()
    self.tokenizer = tokenizer
    self.seq_len, self.global_batch_size = seq_len, global_batch_size
    self.split, self.seed, self.shuffle = split, int(seed), bool(shuffle)
    self.on_bad_record = on_bad_record
    self.shard_index, self.shard_count = shard_index, shard_count
    self.local_batch_size = global_batch_size // shard_count
    self.pack_window = pack_window
    self.mix_unit = mix_unit
    self.chat_too_long = chat_too_long
    self._renderer = None  # data.chat.ChatRenderer, made on the first conversation
    self.source_ids = None if source_ids is None else np.asarray(source_ids, np.int32)
    self._positions_T = np.arange(seq_len, dtype=np.int32)
    self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}
    self._mix_cache: tuple[int, np.ndarray] | None = None
    self._reset()

  # --------------------------------------------------------------------------- stream of chunks

  def _reset(self) -> None:
    n = len(self._sources)
    self._epoch = [0] * n
    self._pos = [0] * n
    self._mix_pos = 0
    self._mix_tokens = np.zeros(n, np.int64)
    self._eval_source = 0
    # (source, doc, next chunk, tokens, trained mask or None, chunk bounds); buffer: (source, doc, chunk, tokens,
    # trained mask or None) - the mask marks trained target tokens of a conversation (None: every token)
    self._cur: tuple | None = None
    self._buffer: list[tuple] = []
    self._exhausted = False
    self._stats = {"batches": 0, "documents": 0, "skipped_records": 0, "split_documents": 0,
                   "chunks": 0, "tokens": 0, "padding_tokens": 0, "target_tokens": 0,
                   "documents_per_source": {name: 0 for name in self.names},
                   "packed_tokens_per_source": {name: 0 for name in self.names},
                   "truncated_conversations": 0, "dropped_conversations": 0}

  def _order(self, s: int) -> np.ndarray:
    cached = self._perm_cache.get(s)
    if cached is None or cached[0] != self._epoch[s]:
      shuffle = self.shuffle and self.split == "train"
      cached = (self._epoch[s], _perm(self.seed, s, self._epoch[s], len(self._sources[s]), shuffle))
      self._perm_cache[s] = cached
    return cached[1]

  def _choose_source(self) -> int:
    if len(self._sources) == 1:
      return 0
    if self.mix_unit == "tokens":
      return int(np.argmax(self.weights * self._mix_tokens.sum() - self._mix_tokens))
    block = self._mix_pos // MIX_BLOCK
    if self._mix_cache is None or self._mix_cache[0] != block:
      rng = np.random.default_rng([self.seed, _MIX_SALT, block])
      self._mix_cache = (block, rng.choice(len(self._sources), size=MIX_BLOCK, p=self.weights))
    return int(self._mix_cache[1][self._mix_pos % MIX_BLOCK])

  def _tokens(self, s: int, doc: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(tokens, trained mask) of document `doc` of source `s`: [BOS] + ids + [EOS] and None (every token), or a
    conversation's ids and assistant mask; None when skipped as bad or dropped as too long."""
    src = self._sources[s]
    try:
      if hasattr(src, "chat_tokens"):
        return self._conversation(src.chat_tokens(doc, self._chat_renderer()))
      if hasattr(src, "token_ids"):
        ids = src.token_ids(doc, self.tokenizer)
      elif hasattr(self.tokenizer, "encode_np"):
        ids = self.tokenizer.encode_np(src[doc])
      else:
        ids = np.asarray(self.tokenizer.encode(src[doc]), dtype=np.int32)
    except sources_lib.BadRecordError as e:
      if self.on_bad_record == "fail":
        raise
      self._stats["skipped_records"] += 1
      if self._stats["skipped_records"] <= _LOG_SKIPS:
        log.warning("skipping bad record (%d so far): %s", self._stats["skipped_records"], e)
      return None
    tok = self.tokenizer
    return np.concatenate([[tok.bos_id], ids, [tok.eos_id]]).astype(np.int32), None

  def _chat_renderer(self):
    if self._renderer is None:
      from kanana_jax.data.chat import ChatRenderer  # pylint: disable=import-outside-toplevel
      self._renderer = ChatRenderer.for_tokenizer(self.tokenizer)
    return self._renderer

  def _conversation(self, tokens) -> tuple[np.ndarray, np.ndarray] | None:
    """A rendered conversation cut to whole assistant turns within seq_len (or dropped: None)."""
    from kanana_jax.data.chat import truncate_at_turn  # pylint: disable=import-outside-toplevel
    n = len(tokens.ids_N)
    if n > self.seq_len and self.chat_too_long == "drop":
      self._stats["dropped_conversations"] += 1
      return None
    cut = truncate_at_turn(tokens, min(n, self.seq_len))
    if cut is None:
      self._stats["dropped_conversations"] += 1
      return None
    if n > self.seq_len:
      self._stats["truncated_conversations"] += 1
    return cut.ids_N.astype(np.int32), cut.loss_mask_N.astype(np.float32)

  def _next_document(self) -> tuple[int, int, np.ndarray, np.ndarray | None] | None:
    """The next readable document (source, index, tokens, trained mask), or None at the end of an eval pass."""
    bad_streak = [0] * len(self._sources)
    while True:
      if self.split == "train":
        s = self._choose_source()
        self._mix_pos += 1
      else:
        s = self._eval_source
        if s >= len(self._sources):
          return None
        if self._pos[s] >= len(self._sources[s]):
          self._eval_source += 1
          continue
      doc = int(self._order(s)[self._pos[s]])
      self._pos[s] += 1
      if self.split == "train" and self._pos[s] == len(self._sources[s]):
        self._epoch[s] += 1
        self._pos[s] = 0
      got = self._tokens(s, doc)
      if got is not None:
        self._stats["documents"] += 1
        self._stats["documents_per_source"][self.names[s]] += 1
        self._mix_tokens[s] += len(got[0])
        bad_streak[s] = 0
        return (s, doc) + got
      bad_streak[s] += 1
      if bad_streak[s] > len(self._sources[s]):
        raise ConfigError(f"every record of data source {self.names[s]!r} ({self._sources[s].name}) is bad or, "
                          f"for conversations, longer than data.seq_len={self.seq_len} at its first assistant "
                          "turn; nothing to train on from it (raise data.seq_len or drop the source)")

  def _next_chunk(self) -> tuple | None:
    if self._cur is None:
      got = self._next_document()
      if got is None:
        return None
      s, doc, tokens, trained = got
      bounds = chunk_bounds(len(tokens), self.seq_len)
      if len(bounds) > 1:
        self._stats["split_documents"] += 1
      self._cur = (s, doc, 0, tokens, trained, bounds)
    s, doc, c, tokens, trained, bounds = self._cur
    lo, hi = bounds[c]
    self._cur = (s, doc, c + 1, tokens, trained, bounds) if c + 1 < len(bounds) else None
    self._stats["chunks"] += 1
    return s, doc, c, tokens[lo:hi], None if trained is None else trained[lo:hi]

  def _fill_buffer(self) -> None:
    while not self._exhausted and len(self._buffer) < self.pack_window:
      chunk = self._next_chunk()
      if chunk is None:
        self._exhausted = True
      else:
        self._buffer.append(chunk)

  def _build_row(self) -> list[tuple]:
    """Best fit: repeatedly take the longest pending chunk that fits the space left in the row."""
    space, parts = self.seq_len, []
    while space >= 2:
      self._fill_buffer()
      best, best_len = -1, 0
      for j, chunk in enumerate(self._buffer):
        n = len(chunk[3])
        if best_len < n <= space:
          best, best_len = j, n
      if best < 0:
        break
      parts.append(self._buffer.pop(best))
      space -= best_len
    return parts

  # --------------------------------------------------------------------------- batches

  def __iter__(self) -> "TokenBatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = [self._build_row() for _ in range(self.global_batch_size)]
    if not any(rows):
      raise StopIteration
    b, t = self.local_batch_size, self.seq_len
    mine = rows[self.shard_index * b:(self.shard_index + 1) * b]
    pad = self.tokenizer.pad_id
    inputs = np.full((b, t), pad, np.int32)
    segments = np.zeros((b, t), np.int32)
    positions = np.zeros((b, t), np.int32)
    source_ids = np.zeros((b, t), np.int32)
    trained = np.ones((b, t), np.float32)   # 1 where the token may be a target (0: a conversation's prompt)
    for r, parts in enumerate(mine):
      o = 0
      for k, (s, _, _, chunk, chunk_trained) in enumerate(parts):
        n = len(chunk)
        inputs[r, o:o + n] = chunk
        segments[r, o:o + n] = k + 1
        positions[r, o:o + n] = self._positions_T[:n]
        if self.source_ids is not None:
          source_ids[r, o:o + n] = self.source_ids[s]
        if chunk_trained is not None:
          trained[r, o:o + n] = chunk_trained
        o += n
    mask = np.zeros((b, t), np.float32)
    mask[:, :-1] = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0) & (trained[:, 1:] > 0)
    targets = np.full((b, t), pad, np.int32)
    targets[:, :-1] = inputs[:, 1:]
    targets[mask == 0] = pad
    used = sum(len(c[3]) for parts in rows for c in parts)
    st = self._stats
    for parts in rows:
      for s, _, _, chunk, _ in parts:
        st["packed_tokens_per_source"][self.names[s]] += len(chunk)
    st["batches"] += 1
    st["tokens"] += used
    st["padding_tokens"] += self.global_batch_size * t - used
    st["target_tokens"] += sum(len(c[3]) - 1 if c[4] is None else int(c[4][1:].sum()) for p in rows for c in p)
    batch = {"inputs_BxT": inputs, "targets_BxT": targets, "segment_ids_BxT": segments,
             "positions_BxT": positions, "loss_mask_BxT": mask}
    if self.source_ids is not None:
      batch["source_ids_BxT"] = source_ids
    return batch

  # --------------------------------------------------------------------------- state

  def stats(self) -> dict[str, Any]:
    """Counters over the whole run (global, all hosts): documents, skipped_records, split_documents..."""
    out = dict(self._stats)
    out["documents_per_source"] = dict(self._stats["documents_per_source"])
    out["packed_tokens_per_source"] = dict(self._stats["packed_tokens_per_source"])
    out["epochs"] = {name: e for name, e in zip(self.names, self._epoch)}
    total = self._stats["tokens"] + self._stats["padding_tokens"]
    out["padding_fraction"] = self._stats["padding_tokens"] / total if total else 0.0
    return out

  def _fingerprint(self) -> dict[str, Any]:
    return {"split": self.split, "seed": self.seed, "seq_len": self.seq_len, "shuffle": self.shuffle,
            "pack_window": self.pack_window, "sources": self.names,
            "sizes": [len(s) for s in self._sources],
            "weights": [round(float(w), 12) for w in self.weights],
            "tokenizer": tokenizer_lib.tokenizer_fingerprint(self.tokenizer),
            # only when not the default, so states saved before the key existed still match
            **({"mix_unit": self.mix_unit} if self.mix_unit != "documents" else {})}

  def get_state(self) -> dict[str, Any]:
    """A small JSON-serialisable dict; identical on every host (it does not depend on the shard)."""
    cur = None if self._cur is None else [self._cur[0], self._cur[1], self._cur[2]]
    return {"version": STATE_VERSION, "config": self._fingerprint(),
            "epoch": list(self._epoch), "pos": list(self._pos), "mix_pos": self._mix_pos,
            "mix_tokens": [int(x) for x in self._mix_tokens], "eval_source": self._eval_source, "exhausted": self._exhausted, "cur": cur,
            "buffer": [[s, doc, c] for s, doc, c, *_ in self._buffer], "stats": self.stats()}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues exactly where the iterator that produced `state` (via get_state) stood."""
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"data iterator state version {state.get('version')!r} is not {STATE_VERSION}")
    want, have = self._fingerprint(), state["config"]
    diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
    if diff:
      raise ValueError("data iterator state was saved with a different data setup "
                       f"(key: (saved, now)): {diff}; restore with the same data config and seed")
    self._reset()
    self._epoch, self._pos = list(state["epoch"]), list(state["pos"])
    self._mix_pos, self._eval_source = int(state["mix_pos"]), int(state["eval_source"])
    self._mix_tokens = np.asarray(state.get("mix_tokens", [0] * len(self._sources)), np.int64)
    self._exhausted = bool(state["exhausted"])
    docs: dict[tuple[int, int], tuple] = {}

    def chunks_of(s: int, doc: int):
      if (s, doc) not in docs:
        got = self._tokens(s, doc)
        if got is None:
          raise ValueError(f"document {doc} of data source {self.names[s]!r} was readable when the "
                           "state was saved but is bad now: the data changed since the checkpoint")
        docs[s, doc] = got + (chunk_bounds(len(got[0]), self.seq_len),)
      return docs[s, doc]

    for s, doc, c in state["buffer"]:
      tokens, trained, bounds = chunks_of(s, doc)
      lo, hi = bounds[c]
      self._buffer.append((s, doc, c, tokens[lo:hi], None if trained is None else trained[lo:hi]))
    if state["cur"] is not None:
      s, doc, c = state["cur"]
      tokens, trained, bounds = chunks_of(s, doc)
      self._cur = (s, doc, c, tokens, trained, bounds)
    saved = state["stats"]
    for key, fresh in self._stats.items():   # a key newer than the saved state keeps its fresh value
      if isinstance(fresh, dict):
        self._stats[key] = {name: int(saved.get(key, {}).get(name, 0)) for name in self.names}
      else:
        self._stats[key] = saved.get(key, fresh)


def source_names(data_cfg) -> list[str]:
  """Names of the sources a DataConfig reads: the mixture's names, or [data.source] for a single source."""
  return [str(e[0]) for e in data_cfg.mixture] if data_cfg.mixture else [data_cfg.source]


def _sources_for(data_cfg, split: str) -> list[tuple[str, sources_lib.DocumentSource, float]]:
  common = dict(split=split, text_key=data_cfg.text_key, tfds_data_dir=data_cfg.tfds_data_dir)
  mixture = tuple(data_cfg.mixture or ())
  if not mixture:
    return [(data_cfg.source, sources_lib.open_source(data_cfg.source, data_cfg.path, **common), 1.0)]
  out, seen = [], set()
  for entry in mixture:
    if len(entry) != 3:
      raise ValueError(f"data.mixture entries are (name, path_or_'embedded', weight), got {entry!r}")
    name, path, weight = entry
    if name in seen:
      raise ValueError(f"data.mixture names must be unique; {name!r} appears twice")
    seen.add(name)
    out.append((str(name), _open_named(data_cfg, str(name), str(path), split), float(weight)))
  return out


def _open_named(data_cfg, name: str, path: str, split: str, key: str = "data.mixture"):
  """The `split` of a named mixture / eval source; an unknown, missing or empty source names itself."""
  try:
    kind = sources_lib.infer_kind(path, data_cfg.source)
    return sources_lib.open_source(kind, path, split=split, text_key=data_cfg.text_key,
                                   tfds_data_dir=data_cfg.tfds_data_dir)
  except (FileNotFoundError, ValueError) as e:
    raise type(e)(f"{key} source {name!r} ({path!r}, split {split!r}): {e}") from e


def make_iterator(data_cfg, *, split: str, seed: int, shard_index: int = 0,
                  shard_count: int = 1) -> TokenBatchIterator:
  """The packed batch iterator of `split` ('train'|'eval') for this host, from a DataConfig. A mixture of
  several sources also yields `source_ids_BxT`."""
  sources = _sources_for(data_cfg, split)
  return TokenBatchIterator(
      sources, tokenizer_lib.make_tokenizer(data_cfg.tokenizer),
      seq_len=data_cfg.seq_len, global_batch_size=data_cfg.global_batch_size, split=split,
      seed=seed, shuffle=data_cfg.shuffle, on_bad_record=data_cfg.on_bad_record,
      shard_index=shard_index, shard_count=shard_count, mix_unit=data_cfg.mixture_weights_in,
      source_ids=list(range(len(sources))) if len(sources) > 1 else None, chat_too_long=data_cfg.chat_too_long)


def make_eval_iterators(data_cfg, *, seed: int) -> dict[str, TokenBatchIterator]:
  """Held-out iterators, one per group: `data.eval_sources` if set ({name: iterator}), else {'': the single
  source} or one per mixture source. With a mixture of several sources the batches carry `source_ids_BxT` (the
  mixture index of a source of that name, else 0), so they have the fields of the training batches."""
  tokenizer = tokenizer_lib.make_tokenizer(data_cfg.tokenizer)
  common = dict(seq_len=data_cfg.seq_len, global_batch_size=data_cfg.global_batch_size, split="eval", seed=seed,
                shuffle=data_cfg.shuffle, on_bad_record=data_cfg.on_bad_record, chat_too_long=data_cfg.chat_too_long)
  train_names = source_names(data_cfg)
  if data_cfg.eval_sources:
    groups = [(name, _open_named(data_cfg, name, path, "eval", "data.eval_sources"), 1.0) for name, path in data_cfg.eval_sources]
  else:
    groups = _sources_for(data_cfg, "eval")
    if len(groups) == 1:
      return {"": TokenBatchIterator(groups, tokenizer, **common)}
  with_ids = len(train_names) > 1
  return {name: TokenBatchIterator(
      [(name, src, 1.0)], tokenizer, **common,
      source_ids=[train_names.index(name) if name in train_names else 0] if with_ids else None)
      for name, src, _ in groups}
