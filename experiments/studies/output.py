"""Where a study's results go: ``<out>/<name>.json`` and its figure ``<out>/<name>.png``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from experiments.files import write_atomically


def write_results(out_dir: str, name: str, data: Any, plot: Callable[[str], None]) -> None:
    """Writes ``data`` as ``<out_dir>/<name>.json`` and calls ``plot(<out_dir>/<name>.png)``."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"{name}.json"), data)
    plot(os.path.join(out_dir, f"{name}.png"))
    print(f"wrote {os.path.join(out_dir, name)}.json and .png")


def write_json(path: str, data: Any) -> None:
    """``json.dump`` to a temporary file beside ``path``, then renamed over it: an interrupted
    study never leaves a truncated JSON in place of the last good one."""

    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)

    write_atomically(path, dump)
