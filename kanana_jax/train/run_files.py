"""JSON and JSON-lines files that driver stages keep in their workdirs (progress markers, samples, reports).

Writes go to `<path>.tmp`, are flushed to disk and renamed over `path`, so a kill never leaves half a file and a
resumed run reads either the old or the new content."""
from __future__ import annotations

import json
import os
from typing import Iterable


def _replace_with(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    _replace_with(path, json.dumps(obj, indent=1, ensure_ascii=False))


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    _replace_with(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_json(path: str):
    """The file's object, or None when it does not exist (yet)."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
