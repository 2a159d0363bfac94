"""Message records for SFT: JSONL / ArrayRecord / TFDS readers that return validated chat records.

A record is `{"messages": [...], "tools"?: [tool specs] or [tool names], "bucket"?: str, ...}` (other keys
kept; tool names are what rewards.tools knows, for records whose system message already lists the tools). Messages:
system/user `{"role", "content": str}`; assistant `{"role", "content": str|null, "tool_calls"?: [{"name",
"arguments": {...}}]}` (OpenAI's `{"type": "function", "function": {...}}` form is accepted and normalized);
tool `{"role": "tool", "name"?, "content": any JSON}`. A conversation needs an assistant message. A record
that cannot be read or is invalid raises `sources.BadRecordError` naming the file, the line (JSONL, 1-based)
or record (0-based) and the field, e.g. "sft.jsonl line 17: messages[2].role: 'bot' is not one of
system|user|assistant|tool"; the caller skips or fails (data.on_bad_record). Indices never shift.
"""
from __future__ import annotations

import json

import numpy as np

from kanana_jax.data import sources
from kanana_jax.data.chat import ROLES


def _tool_call(call, field: str, bad) -> dict:
  """{'name', 'arguments'} from that form or OpenAI's {'type': 'function', 'function': {...}}."""
  if isinstance(call, dict) and isinstance(call.get("function"), dict):
    call = call["function"]
  if not isinstance(call, dict):
    bad(field, f"must be an object with 'name' and 'arguments', got {type(call).__name__}")
  if not isinstance(call.get("name"), str) or not call["name"].strip():
    bad(f"{field}.name", f"must be a non-empty string, got {call.get('name')!r}")
  if not isinstance(call.get("arguments"), dict):
    bad(f"{field}.arguments", f"must be a JSON object, got {type(call.get('arguments')).__name__}")
  return {"name": call["name"], "arguments": call["arguments"]}


def validate_record(obj, path: str, where: str) -> dict:
  """A checked copy of a message record (tool calls as {'name', 'arguments'}); BadRecordError names the field."""
  def bad(field, reason):
    raise sources.BadRecordError(path, where, f"{field}: {reason}" if field else reason)
  if not isinstance(obj, dict) or "messages" not in obj:
    bad("", f"expected a JSON object with 'messages', got "
        + (f"keys {sorted(obj)[:8]}" if isinstance(obj, dict) else type(obj).__name__))
  if not isinstance(obj["messages"], list) or not obj["messages"]:
    bad("messages", f"must be a non-empty list of messages, got {obj['messages']!r:.60}")
  out = []
  for i, m in enumerate(obj["messages"]):
    f = f"messages[{i}]"
    if not isinstance(m, dict):
      bad(f, f"must be an object with 'role' and 'content', got {type(m).__name__}")
    role, content = m.get("role", "<missing>"), m.get("content")
    if role not in ROLES:
      bad(f"{f}.role", f"{role!r} is not one of {'|'.join(ROLES)}")
    if role in ("system", "user") and not isinstance(content, str):
      bad(f"{f}.content", f"must be a string, got {type(content).__name__}")
    m = dict(m)
    if role == "assistant":
      if content is not None and not isinstance(content, str):
        bad(f"{f}.content", f"must be a string or null, got {type(content).__name__}")
      calls = m.pop("tool_calls", None) or []
      if not isinstance(calls, list):
        bad(f"{f}.tool_calls", f"must be a list, got {type(calls).__name__}")
      if calls:
        m["tool_calls"] = [_tool_call(c, f"{f}.tool_calls[{k}]", bad) for k, c in enumerate(calls)]
      elif not (content or "").strip():
        bad(f, "an assistant message needs non-empty 'content' or 'tool_calls'")
    if role == "tool":
      if "content" not in m:
        bad(f"{f}.content", "missing: a tool message holds the tool's result")
      if not isinstance(m.get("name", ""), str):
        bad(f"{f}.name", f"must be a string, got {type(m['name']).__name__}")
    out.append(m)
  if not any(m["role"] == "assistant" for m in out):
    bad("messages", "a conversation needs at least one assistant message")
  tools = obj.get("tools")
  if tools is not None and not (isinstance(tools, list) and (all(isinstance(t, dict) for t in tools)
                                                             or all(isinstance(t, str) for t in tools))):
    bad("tools", "must be a list of tool specs (JSON objects, rendered into the prompt) or of tool names "
        "(strings: the system message already lists them; kept for verification)")
  if obj.get("bucket") is not None and not isinstance(obj["bucket"], str):
    bad("bucket", f"must be a string, got {type(obj['bucket']).__name__}")
  return {**obj, "messages": out}


def _json_object(raw, path: str, where: str):
  if isinstance(raw, (bytes, bytearray, np.bytes_)):
    try:
      raw = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
      raise sources.BadRecordError(path, where, f"not valid UTF-8 ({e.reason} at byte {e.start})") from e
  if not isinstance(raw, str):
    raise sources.BadRecordError(path, where, f"expected JSON bytes, got {type(raw).__name__}")
  try:
    return json.loads(raw)
  except json.JSONDecodeError as e:
    raise sources.BadRecordError(path, where, f"malformed JSON ({e.msg} at column {e.colno})") from e


class _JsonlRecords(sources.JsonlSource):
  """JsonlSource's line index, records returned as parsed JSON."""

  def record(self, index: int):
    fid = int(self._file_id[index])
    path, where = self.files[fid], f"line {int(self._line[index])}"
    f = self._handle(fid)
    f.seek(int(self._start[index]))
    return _json_object(f.read(int(self._end[index] - self._start[index])), path, where), path, where


class _ArrayRecordRecords(sources.ArrayRecordSource):
  """ArrayRecordSource's readers, records returned as parsed JSON."""

  def record(self, index: int):
    fid = int(np.searchsorted(self._offsets, index, side="right") - 1)
    local = int(index - self._offsets[fid])
    path, where = self.files[fid], f"record {local}"
    try:
      raw = self._readers[fid].read([local])[0]
    except Exception as e:
      raise sources.BadRecordError(path, where, f"unreadable record ({e})") from e
    return _json_object(raw, path, where), path, where


class _TfdsRecords(sources.TfdsSource):
  """TfdsSource's data source; a record is JSON bytes, or features with 'messages'/'tools' as JSON text."""

  def record(self, index: int):
    where = f"record {index}"
    try:
      item = self._ds[index]
    except Exception as e:
      raise sources.BadRecordError(self.name, where, f"unreadable record ({e})") from e
    if not isinstance(item, dict):
      return _json_object(item.item() if isinstance(item, np.ndarray) else item, self.name, where), self.name, where
    obj = {}
    for key, value in item.items():
      value = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
      if isinstance(value, (bytes, np.bytes_)) or key in ("messages", "tools") and isinstance(value, str):
        value = _json_object(value, self.name, where) if key in ("messages", "tools") else bytes(value).decode()
      obj[key] = value
    return obj, self.name, where


class MessageRecordSource:
  """Validated chat records at random: len(src), src[i] -> {'messages': [...], 'tools'?: [...], 'bucket'?: str, ...}.

  kind 'jsonl' (a JSON object per line) or 'array_record' (JSON object bytes per record): `pattern` is
  comma-separated files or globs; 'tfds': `pattern` is the dataset name, split `tfds_split`. A record that
  cannot be read or validated raises BadRecordError naming file, line (1-based) or record (0-based) and field.
  """
  KINDS = ("jsonl", "array_record", "tfds")

  def __init__(self, pattern: str, kind: str = "jsonl", *, tfds_split: str = "train", tfds_data_dir: str = ""):
    if kind not in self.KINDS:
      raise ValueError(f"message record kind must be one of {self.KINDS}, got {kind!r}")
    if kind == "tfds":
      self._records = _TfdsRecords(pattern, tfds_split, tfds_data_dir)
    else:
      self._records = (_JsonlRecords if kind == "jsonl" else _ArrayRecordRecords)(pattern)
    self.kind, self.name = kind, self._records.name

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return validate_record(*self._records.record(index))


def open_message_source(kind: str, path: str, *, split: str, tfds_data_dir: str = ""):
  """The `split` ('train'|'eval') of message records, with sources.open_source's conventions: '{split}' in a
  file path, else every 25th record held out for eval; tfds 'NAME[|TRAIN_SPLIT|EVAL_SPLIT]'."""
  if split not in sources.SPLITS:
    raise ValueError(f"split must be one of {sources.SPLITS}, got {split!r}")
  if kind == "tfds":
    parts = (path[len("tfds:"):] if path.startswith("tfds:") else path).split("|")
    names = {"train": parts[1] if len(parts) > 1 else "train", "eval": parts[2] if len(parts) > 2 else "validation"}
    return MessageRecordSource(parts[0], "tfds", tfds_split=names[split], tfds_data_dir=tfds_data_dir)
  if "{split}" in path:
    return MessageRecordSource(path.replace("{split}", split), kind)
  return sources.HeldOutView(MessageRecordSource(path, kind), split)


class ChatSource:
  """Message records as a pipeline source: `chat_tokens(i, renderer)` renders record i with its loss mask
  (tool specs in 'tools' are rendered; tool names are not: the system message holds them)."""

  def __init__(self, records, name: str):
    self.records, self.name = records, name

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    return self.records[index]

  def chat_tokens(self, index: int, renderer):
    record = self.records[index]
    tools = record.get("tools")
    return renderer.encode(record["messages"], tools=tools if tools and isinstance(tools[0], dict) else None)


def open_chat_source(path: str, *, split: str, tfds_data_dir: str = "") -> ChatSource:
  """A chat source from a mixture path: 'sft:BUCKET[,BUCKET...]' (the embedded SFT buckets of
  kanana_jax/data/sft) or 'chat:PATH' (message records: *.jsonl, *.array_record, or tfds:NAME[|TRAIN|EVAL];
  '{split}' in a file path selects the split, else every 25th record is held out)."""
  if path.startswith("sft:"):
    from kanana_jax.data import posttrain_data  # pylint: disable=import-outside-toplevel
    names = [n.strip() for n in path[len("sft:"):].split(",") if n.strip()]
    if not names:
      raise ValueError("'sft:' needs bucket names, e.g. sft:math,code")
    files = ",".join(str(posttrain_data.dataset_path("sft", n, split)) for n in names)
    return ChatSource(MessageRecordSource(files, "jsonl"), path)
  if not path.startswith("chat:"):
    raise ValueError(f"a chat source path starts with 'sft:' or 'chat:', got {path!r}")
  spec = path[len("chat:"):]
  kind = "tfds" if spec.startswith("tfds:") else sources.infer_kind(spec, "jsonl")
  return ChatSource(open_message_source(kind, spec, split=split, tfds_data_dir=tfds_data_dir), path)
