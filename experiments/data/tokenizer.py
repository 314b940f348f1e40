"""Byte-level tokenizer: tokens 0..255 are the bytes of the UTF-8 text, then three specials.

The vocabulary is padded from 259 to ``VOCAB_SIZE = 264`` so that the embedding and the output
layer divide evenly over an 8-way ``tensor`` mesh axis; ids 259..263 never occur in data.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

NUM_BYTES = 256
BOS = 256  # begins every document
EOS = 257  # ends every document
PAD = 258  # fills positions that hold no data (never produced by the packed text pipeline)
VOCAB_SIZE = 264  # 259 used ids, padded to a multiple of 8 for tensor sharding


def encode(text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    """UTF-8 bytes of ``text`` as token ids.

    Args:
        text: any string.
        bos, eos: add ``BOS`` in front / ``EOS`` at the end.

    Returns:
        int32 array [n] with ``n = len(text.encode()) + bos + eos``.
    """
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    parts = ([np.array([BOS], np.int32)] if bos else []) + [ids]
    if eos:
        parts.append(np.array([EOS], np.int32))
    return np.concatenate(parts)


def decode(ids: Iterable[int] | np.ndarray) -> str:
    """Text of the byte tokens in ``ids`` (any shape, flattened); specials and ids outside
    0..255 are skipped, invalid UTF-8 becomes U+FFFD (``errors='replace'``)."""
    arr = np.asarray(ids).reshape(-1)
    arr = arr[(arr >= 0) & (arr < NUM_BYTES)]
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
