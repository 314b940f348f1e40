"""grain ``MapDataset`` building blocks: concatenate-and-split packing and per-host slicing.

Everything here is random access (``MapDataset``), so a pipeline's position is one integer and a
grain iterator over it checkpoints and resumes exactly.
"""

from __future__ import annotations

import grain
import numpy as np

from experiments.data.corpus import TokenCorpus
from experiments.data.tokenizer import PAD


class PackedWindows(grain.MapDataset):
    """Concatenate-and-split packing of a corpus into windows of ``window`` tokens.

    ``order`` is a ``MapDataset`` of document ids whose ``n`` consecutive elements
    ``order[e*n : (e+1)*n]`` give the document order of epoch ``e`` (``n`` = number of
    documents), e.g. ``grain.MapDataset.range(n).shuffle(seed=s)``, which reshuffles every epoch.
    Epoch e's stream is those documents concatenated (each already ``BOS bytes EOS``); it is cut
    into ``len(self) = max(1, total // window)`` windows, and index ``e * len(self) + k`` is window
    k of epoch e: stream positions ``[k*window, (k+1)*window)``, taken modulo the stream length
    (so a corpus shorter than one window still yields windows). The tail
    ``total - len(self) * window`` of each epoch is dropped; since the order changes every epoch,
    a different tail is dropped each time.

    Elements are int32 arrays [window].
    """

    def __init__(self, order: grain.MapDataset, corpus: TokenCorpus, window: int):
        super().__init__(order)
        if corpus.num_documents == 0:
            raise ValueError("cannot pack an empty corpus")
        self._corpus = corpus
        self._window = int(window)
        self._num_docs = corpus.num_documents
        self._total = corpus.num_tokens
        self._len = max(1, self._total // self._window)
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self._len

    def __str__(self) -> str:
        return f"PackedWindows(window={self._window}, documents={self._num_docs})"

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(doc ids in stream order [n], stream start [n], stream end [n]) of one epoch; the
        last few epochs are cached (a batch of shuffled windows touches at most two)."""
        layout = self._layouts.get(epoch)
        if layout is None:
            base = epoch * self._num_docs
            perm = np.array([self._parent[base + j] for j in range(self._num_docs)], np.int64)
            lengths = self._corpus.lengths[perm]
            ends = np.cumsum(lengths)
            layout = (perm, ends - lengths, ends)
            if len(self._layouts) >= 4:
                self._layouts = {}  # rebinding, not clearing: safe under grain's read threads
            self._layouts[epoch] = layout
        return layout

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, k = divmod(int(index), self._len)
        perm, starts, ends = self._epoch_layout(epoch)
        pos_W = (k * self._window + np.arange(self._window, dtype=np.int64)) % self._total
        rank_W = np.searchsorted(ends, pos_W, side="right")
        flat_W = self._corpus.offsets[perm[rank_W]] + (pos_W - starts[rank_W])
        return self._corpus.tokens[flat_W].astype(np.int32)


class Take(grain.MapDataset):
    """``parent[indices[i]]`` for i in range(len(indices)): a fixed selection of elements."""

    def __init__(self, parent: grain.MapDataset, indices: np.ndarray):
        super().__init__(parent)
        self._indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[int(self._indices[index])]


class HostShard(grain.MapDataset):
    """This process's rows of every global batch.

    The parent holds the global example stream; global batch g is parent elements
    ``[g*B, (g+1)*B)`` with ``B = process_count * host_batch_size``. Process p takes rows
    ``[p*b, (p+1)*b)`` of each (``b = host_batch_size``): local element i is parent element
    ``(i // b) * B + p * b + i % b``. Batching this dataset by ``b`` therefore gives local batch g
    = rows of global batch g, the layout ``jax.make_array_from_process_local_data`` expects, and
    the local batch index equals the global step on every host and for every process count.
    """

    def __init__(
        self,
        parent: grain.MapDataset,
        *,
        process_index: int,
        process_count: int,
        host_batch_size: int,
    ):
        super().__init__(parent)
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self._p, self._b = process_index, host_batch_size
        self._B = process_count * host_batch_size
        self._len = (len(parent) // self._B) * self._b

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        g, j = divmod(int(index), self._b)
        return self._parent[g * self._B + self._p * self._b + j]


def window_to_example(window_W: np.ndarray) -> dict[str, np.ndarray]:
    """Split a packed window [T + 1] into ``inputs`` [T], ``targets`` [T] (inputs shifted by
    one) and ``mask`` float32 [T] (1 where the target is a real token, i.e. not PAD)."""
    targets = window_W[1:]
    return {
        "inputs": window_W[:-1],
        "targets": targets,
        "mask": (targets != PAD).astype(np.float32),
    }
