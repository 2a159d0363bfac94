"""Preference pairs -> resumable batches of (prompt + chosen, prompt + rejected) rows, for DPO and reward models.

Records (JSON lines): {"prompt": [messages ending with a user (or tool) turn], "chosen": [assistant message(s)],
"rejected": [assistant message(s)], "bucket"?: one of BUCKETS (others count as 'other'), ...}; the embedded set is kanana_jax/data/preference
(path 'embedded'), any other path is a JSONL file ('{split}' in it selects the split, else every 25th record is
held out). A bad record names its file, line and field (`data.on_bad_record` skips and counts, or fails).

Each side renders with `data.chat.ChatRenderer` (the chat template, or the plain template the eval runner uses)
as one row; only the RESPONSE's tokens are trained / scored (the prompt's earlier assistant turns are not). A
pair whose either side is longer than seq_len is dropped and counted (`stats()['dropped_pairs']`): cutting a
response would change what is preferred.

Batch (this host's rows, B = global_batch_size // shard_count, T = seq_len; index 0 = chosen, 1 = rejected):
  inputs_Bx2xT int32, targets_Bx2xT int32 (the next token), positions_Bx2xT int32, segment_ids_Bx2xT int32
  (1 on tokens, 0 on padding), loss_mask_Bx2xT float32 (1 where the target is a response token),
  lengths_Bx2 int32 (tokens in the row), pair_mask_B float32 (1 for a real pair, 0 for padding rows at the
  end of an eval pass), bucket_ids_B int32 (index into BUCKETS).
Order: split 'train' is infinite, shuffled per epoch from (seed, epoch); 'eval' is one pass, then StopIteration.
"""
from __future__ import annotations

import importlib.resources
import json
import logging
from typing import Any

import numpy as np

from kanana_jax.data import sources as sources_lib
from kanana_jax.data.chat import ChatRenderer

BUCKETS = ("chat", "math", "code", "tool", "ifeval", "arith", "other")   # 'other': a bucket not in this list
ROLES = ("system", "user", "assistant", "tool")
FIELDS = ("inputs_Bx2xT", "targets_Bx2xT", "positions_Bx2xT", "segment_ids_Bx2xT", "loss_mask_Bx2xT")
STATE_VERSION = 1
log = logging.getLogger(__name__)


def batch_dtypes() -> dict:
    return {**{k: np.dtype(np.float32 if k.startswith("loss_mask") else np.int32) for k in FIELDS},
            "lengths_Bx2": np.dtype(np.int32), "pair_mask_B": np.dtype(np.float32),
            "bucket_ids_B": np.dtype(np.int32)}


def batch_shapes(global_batch_size: int, seq_len: int) -> dict:
    B, T = global_batch_size, seq_len
    return {**{k: (B, 2, T) for k in FIELDS}, "lengths_Bx2": (B, 2), "pair_mask_B": (B,), "bucket_ids_B": (B,)}


def validate_pair(obj, path: str, where: str) -> dict:
    """A checked preference record; BadRecordError names the file, line and field."""
    def bad(field, reason):
        raise sources_lib.BadRecordError(path, where, f"{field}: {reason}" if field else reason)
    if not isinstance(obj, dict):
        bad("", f"expected a JSON object, got {type(obj).__name__}")
    for key, last in (("prompt", ("user", "tool")), ("chosen", ("assistant",)), ("rejected", ("assistant",))):
        msgs = obj.get(key)
        if not isinstance(msgs, list) or not msgs:
            bad(key, "must be a non-empty list of messages")
        for i, m in enumerate(msgs):
            f = f"{key}[{i}]"
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                bad(f"{f}.role", f"{(m or {}).get('role') if isinstance(m, dict) else m!r} is not one of "
                    f"{'|'.join(ROLES)}")
            if m["role"] != "tool" and not isinstance(m.get("content"), str) and not m.get("tool_calls"):
                bad(f"{f}.content", "must be a string")
            if key != "prompt" and m["role"] != "assistant":
                bad(f"{f}.role", f"a response holds assistant messages, got {m['role']!r}")
        if msgs[-1]["role"] not in last:
            bad(key, f"must end with a {' or '.join(last)} message, not {msgs[-1]['role']!r}")
    bucket = obj.get("bucket", "other")
    if not isinstance(bucket, str):
        bad("bucket", f"must be a string, got {type(bucket).__name__}")
    return {**obj, "bucket": bucket if bucket in BUCKETS else "other"}


class _PairRecords(sources_lib.JsonlSource):
    """JSONL preference records, validated on read (BadRecordError names file, line and field)."""

    def __getitem__(self, index: int) -> dict:
        fid = int(self._file_id[index])
        path, where = self.files[fid], f"line {int(self._line[index])}"
        f = self._handle(fid)
        f.seek(int(self._start[index]))
        raw = f.read(int(self._end[index] - self._start[index]))
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise sources_lib.BadRecordError(path, where, f"not a JSON object ({e})") from e
        return validate_pair(rec, path, where)


def open_pairs(path: str, split: str):
    """Random-access validated preference records of `split`: path 'embedded' or a JSONL file."""
    if path in ("", "embedded"):
        return _PairRecords(str(importlib.resources.files("kanana_jax.data").joinpath("preference",
                                                                                      f"{split}.jsonl")))
    if "{split}" in path:
        return _PairRecords(path.replace("{split}", split))
    return sources_lib.HeldOutView(_PairRecords(path), split)


def response_tokens(renderer, prompt: list, response: list):
    """(ids_N, response mask_N): the rendering of prompt + response, trained tokens of the response only."""
    tokens = renderer.encode(list(prompt) + list(response))
    start = int(tokens.turn_ends_M[len(prompt) - 1])
    mask = tokens.loss_mask_N.copy()
    mask[:start] = 0.0
    return tokens.ids_N, mask


class PairBatchIterator:
    """Yields pair batches (module docstring); `get_state` / `set_state` resume exactly."""

    def __init__(self, records, tokenizer, *, seq_len: int, global_batch_size: int, split: str, seed: int,
                 shuffle: bool = True, on_bad_record: str = "fail", shard_index: int = 0, shard_count: int = 1):
        if global_batch_size % shard_count:
            raise ValueError(f"data.global_batch_size={global_batch_size} must be a multiple of the number of "
                             f"data shards (hosts) {shard_count}")
        if len(records) == 0:
            raise ValueError(f"preference source {records.name} holds no pairs for split {split!r}")
        self.records, self.tokenizer = records, tokenizer
        self.renderer = ChatRenderer.for_tokenizer(tokenizer)
        self.seq_len, self.global_batch_size, self.split = seq_len, global_batch_size, split
        self.seed, self.shuffle, self.on_bad_record = int(seed), shuffle, on_bad_record
        self.shard_index, self.shard_count = shard_index, shard_count
        self._epoch, self._pos = 0, 0
        self._stats = {"batches": 0, "pairs": 0, "dropped_pairs": 0, "skipped_records": 0}
        self._perm = None

    def _order(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self._epoch:
            n = len(self.records)
            order = (np.random.default_rng([self.seed, 0x70616972, self._epoch]).permutation(n)
                     if self.shuffle and self.split == "train" else np.arange(n))
            self._perm = (self._epoch, order)
        return self._perm[1]

    def _row(self, index: int):
        """The two rendered sides of record `index`, or None (bad record skipped, or too long: dropped)."""
        try:
            rec = self.records[index]
        except sources_lib.BadRecordError as e:
            if self.on_bad_record == "fail":
                raise
            self._stats["skipped_records"] += 1
            log.warning("skipping bad preference record: %s", e)
            return None
        sides = [response_tokens(self.renderer, rec["prompt"], rec[k]) for k in ("chosen", "rejected")]
        if max(len(ids) for ids, _ in sides) > self.seq_len:
            self._stats["dropped_pairs"] += 1
            return None
        return sides, BUCKETS.index(rec["bucket"])

    def _next_pair(self):
        misses = 0
        while True:
            if self._pos >= len(self.records):
                if self.split != "train":
                    return None
                self._epoch, self._pos = self._epoch + 1, 0
            index = int(self._order()[self._pos])
            self._pos += 1
            got = self._row(index)
            if got is not None:
                return got
            misses += 1
            if misses > len(self.records):
                raise ValueError(f"no usable pair in {self.records.name}: every record is bad or longer than "
                                 f"data.seq_len={self.seq_len} (raise it)")

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        pairs = []
        for _ in range(self.global_batch_size):
            got = self._next_pair()
            if got is None:
                break
            pairs.append(got)
        if not pairs:
            raise StopIteration
        b, T = self.global_batch_size // self.shard_count, self.seq_len
        mine = pairs[self.shard_index * b:(self.shard_index + 1) * b]
        pad = self.tokenizer.pad_id
        out = {"inputs_Bx2xT": np.full((b, 2, T), pad, np.int32), "targets_Bx2xT": np.full((b, 2, T), pad, np.int32),
               "positions_Bx2xT": np.broadcast_to(np.arange(T, dtype=np.int32), (b, 2, T)).copy(),
               "segment_ids_Bx2xT": np.zeros((b, 2, T), np.int32), "loss_mask_Bx2xT": np.zeros((b, 2, T), np.float32),
               "lengths_Bx2": np.zeros((b, 2), np.int32), "pair_mask_B": np.zeros((b,), np.float32),
               "bucket_ids_B": np.zeros((b,), np.int32)}
        for r, (sides, bucket) in enumerate(mine):
            for k, (ids, mask) in enumerate(sides):
                n = len(ids)
                out["inputs_Bx2xT"][r, k, :n] = ids
                out["targets_Bx2xT"][r, k, :n - 1] = ids[1:]
                out["segment_ids_Bx2xT"][r, k, :n] = 1
                out["loss_mask_Bx2xT"][r, k, :n - 1] = mask[1:]
                out["lengths_Bx2"][r, k] = n
            out["pair_mask_B"][r], out["bucket_ids_B"][r] = 1.0, bucket
        self._stats["batches"] += 1
        self._stats["pairs"] += len(pairs)
        return out

    def stats(self) -> dict[str, Any]:
        return dict(self._stats, epoch=self._epoch)

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "split": self.split, "seed": self.seed, "size": len(self.records),
                "epoch": self._epoch, "pos": self._pos, "stats": dict(self._stats)}

    def set_state(self, state: dict[str, Any]) -> None:
        want = {"version": STATE_VERSION, "split": self.split, "seed": self.seed, "size": len(self.records)}
        diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"preference iterator state was saved with another setup (key: (saved, now)): {diff}")
        self._epoch, self._pos, self._perm = int(state["epoch"]), int(state["pos"]), None
        self._stats = {**self._stats, **state["stats"]}


def make_pair_iterator(path: str, data_cfg, *, split: str, seed: int, shard_index: int = 0, shard_count: int = 1):
    from kanana_jax.data.tokenizer import make_tokenizer  # pylint: disable=import-outside-toplevel
    return PairBatchIterator(open_pairs(path, split), make_tokenizer(data_cfg.tokenizer), seq_len=data_cfg.seq_len,
                             global_batch_size=data_cfg.global_batch_size, split=split, seed=seed,
                             shuffle=data_cfg.shuffle, on_bad_record=data_cfg.on_bad_record,
                             shard_index=shard_index, shard_count=shard_count)
