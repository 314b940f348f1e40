"""Writing files so that an interrupted write never replaces the last good version."""

from __future__ import annotations

import os
from collections.abc import Callable


def write_atomically(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """Calls ``write(tmp)`` for a temporary path beside ``path`` (ending in ``suffix``, for
    writers that infer the format from the name), then renames it over ``path``."""
    tmp = f"{path}.tmp{suffix}"
    write(tmp)
    os.replace(tmp, path)
