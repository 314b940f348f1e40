"""`metrics.jsonl`: one JSON object per line, one line per log or evaluation event.

    {"event": "train", "step": 100, "loss": 1.93, "bpb": 2.78, "tokens_per_s": 10400.0, ...}
    {"event": "eval", "step": 250, "val_bpb": 2.41, "val_loss": 1.67, ...}

On resume, records after the restored step (written by the interrupted process after its last
checkpoint) are dropped, so the file always describes one consistent history.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def _clean(value: Any) -> Any:
    """JSON has no NaN/Infinity: write non-finite floats as strings ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Appends records to `path` and keeps them in memory (for the plot).

    Args:
      path: the jsonl file.
      keep_until_step: on open, drop existing records with `step` greater than this (None:
        drop the whole file, a fresh run).
      write: False on processes other than 0 (records are kept in memory only).
    """

    def __init__(self, path: str, *, keep_until_step: int | None, write: bool = True):
        self.path = path
        self.write = write
        self.records: list[dict[str, Any]] = []
        if keep_until_step is not None and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a kill
                    if record.get("step", 0) <= keep_until_step:
                        self.records.append(record)
        if self.write:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                for record in self.records:
                    f.write(json.dumps(record) + "\n")

    def add(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self.records.append(record)
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == event]


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
