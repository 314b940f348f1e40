"""The input pipeline of the training job: one config, one entry point.

    train_iter, val_batches_fn, info = make_datasets(DataConfig())
    batch = next(train_iter)            # {"inputs", "targets", "mask"}, each [B_host, T]
    for batch in val_batches_fn(): ...  # the same fixed validation batches on every call

Every batch is a dict of numpy arrays:
    inputs  int32   [B_host, T]  token ids, ``T = seq_len``
    targets int32   [B_host, T]  the next token: ``targets[:, t] == inputs[:, t + 1]``
    mask    float32 [B_host, T]  1 where the target is scored (text: every real token, i.e. not
                                 PAD, so all ones when packed; mqar: only the K answers)
with ``B_host = batch_size // process_count`` (``batch_size`` is the global batch).

Text (``pystdlib`` or ``path=``): documents ``BOS bytes EOS`` → ``MapDataset`` of document ids
shuffled by grain with a new order every epoch → concatenate-and-split into ``T + 1`` token windows
(``PackedWindows``) → windows shuffled within each epoch (grain, reshuffled each epoch) →
``.repeat()`` (infinite) → this host's rows (``HostShard``) → ``.batch`` → ``IterDataset``. The
whole chain is random access, so the iterator state is a single index: ``get_state()`` /
``set_state()`` resume the exact sequence, and the local batch index equals the global step on every
host, so a state saved with one process count is valid with another (grain's orbax handler names
its file ``process_{i}-of-{n}.json``, though, so after such a change read the state from one of
the old files and ``set_state`` it). Validation: the validation
documents in corpus order, packed the same way, ``val_batches * batch_size`` windows spread evenly
over the split (cycling when the split is smaller), independent of the seed.

MQAR (``name="mqar"``): example ``i`` of the infinite training stream is generated from
``np.random.default_rng([seed, 0, i])``, validation example ``i`` (``i < val_batches *
batch_size``) from ``[seed, 1, i]``; see ``experiments/data/mqar.py`` for the layout.

Bits per byte: the text mask also scores BOS/EOS targets (2 per document, ~0.02% of tokens on
pystdlib). To report bits per byte, divide the summed bits by the number of byte targets
``(targets < 256).sum()``, or multiply mean bits per token by ``info.tokens_per_byte``; compare with
``info.unigram_bpb``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

import grain
import numpy as np

from experiments.data import corpus as corpus_lib
from experiments.data.mqar import TRAIN_SPLIT, VALIDATION_SPLIT, MqarExamples
from experiments.data.packing import HostShard, PackedWindows, Take, window_to_example
from experiments.data.tokenizer import VOCAB_SIZE

DATASET_NAMES = ("pystdlib", "text", "mqar")

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Input pipeline settings, validated at construction.

    Attributes:
        name: ``"pystdlib"`` (default: the Python standard library's own sources), ``"text"``
            (needs ``path``) or ``"mqar"`` (synthetic associative recall).
        path: a text file or a folder; replaces the built-in corpus (``name`` "pystdlib" or
            "text"). A folder contributes every file ending in one of ``suffixes``.
        suffixes: file name endings read from a ``path`` folder.
        seq_len: T, tokens per training sequence (each example packs ``T + 1`` tokens).
        batch_size: global batch size, summed over all processes.
        seed: seeds the shuffles (text) or the generator (mqar); 0 <= seed < 2**32.
        val_fraction: share of files held out for validation (text), by a stable hash of the path.
        val_batches: number of fixed validation batches returned by ``val_batches_fn``.
        num_threads: grain read threads; 0 builds each batch on demand in the caller's thread
            (recommended by grain for in-memory data, and best on a 2-core CPU).
        mqar_num_kv_pairs: K, key-value pairs (and queries) per mqar sequence; needs
            ``seq_len >= 4 K``.
        mqar_key_range, mqar_value_range: half-open token ranges ``[lo, hi)`` of keys and of
            values; disjoint, inside ``[0, VOCAB_SIZE)``, each with at least K tokens.
        mqar_power_a: Zoology's power-law parameter for where queries go (1.0 = uniform).
        mqar_random_non_queries: fill non-query positions with random bytes (Zoology default)
            instead of token 0.
    """

    name: str = "pystdlib"
    path: str | None = None
    suffixes: tuple[str, ...] = corpus_lib.DEFAULT_SUFFIXES
    seq_len: int = 256
    batch_size: int = 16
    seed: int = 0
    val_fraction: float = 0.02
    val_batches: int = 8
    num_threads: int = 0
    mqar_num_kv_pairs: int = 8
    mqar_key_range: tuple[int, int] = (1, 128)
    mqar_value_range: tuple[int, int] = (128, 256)
    mqar_power_a: float = 0.01
    mqar_random_non_queries: bool = True

    def __post_init__(self):
        # Tuples may arrive as lists from a CLI or JSON; store them as tuples (hashable, frozen).
        for field in ("suffixes", "mqar_key_range", "mqar_value_range"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        if self.name not in DATASET_NAMES:
            raise ValueError(
                f"data.name={self.name!r} is unknown; choose one of {', '.join(DATASET_NAMES)}"
            )
        for field in ("seq_len", "batch_size", "val_batches"):
            if getattr(self, field) <= 0:
                raise ValueError(f"data.{field}={getattr(self, field)} must be positive")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"data.seed={self.seed} must be in [0, 2**32)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1), e.g. 0.02")
        if self.num_threads < 0:
            raise ValueError(f"data.num_threads={self.num_threads} must be >= 0")
        if self.name == "mqar":
            self._validate_mqar()
        else:
            self._validate_text()

    def _validate_text(self):
        if self.name == "text" and self.path is None:
            raise ValueError("data.name='text' needs data.path (a text file or a folder)")
        if self.path is not None and not os.path.exists(self.path):
            raise FileNotFoundError(f"data.path={self.path!r} does not exist")
        if not self.suffixes or not all(isinstance(s, str) and s for s in self.suffixes):
            raise ValueError(f"data.suffixes={self.suffixes!r} must be non-empty strings")

    def _validate_mqar(self):
        if self.path is not None:
            raise ValueError(
                f"data.path={self.path!r} is for text corpora; data.name='mqar' generates its "
                "data (drop data.path, or use data.name='text')"
            )
        K = self.mqar_num_kv_pairs
        if K <= 0:
            raise ValueError(f"data.mqar_num_kv_pairs={K} must be positive")
        if self.seq_len < 4 * K:
            raise ValueError(
                f"data.seq_len={self.seq_len} is too short for data.mqar_num_kv_pairs={K}: "
                f"mqar needs seq_len >= 4 * num_kv_pairs = {4 * K}"
            )
        for field in ("mqar_key_range", "mqar_value_range"):
            r = getattr(self, field)
            if len(r) != 2 or not 0 <= r[0] < r[1] <= VOCAB_SIZE:
                raise ValueError(
                    f"data.{field}={r} must be (lo, hi) with 0 <= lo < hi <= {VOCAB_SIZE}"
                )
            if r[1] - r[0] < K:
                raise ValueError(
                    f"data.{field}={r} holds {r[1] - r[0]} tokens, fewer than "
                    f"data.mqar_num_kv_pairs={K}"
                )
        (k0, k1), (v0, v1) = self.mqar_key_range, self.mqar_value_range
        if k0 < v1 and v0 < k1:
            raise ValueError(
                f"data.mqar_key_range={self.mqar_key_range} and data.mqar_value_range="
                f"{self.mqar_value_range} overlap; keys and values must be disjoint"
            )
        if self.mqar_power_a <= 0:
            raise ValueError(f"data.mqar_power_a={self.mqar_power_a} must be positive")


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What the training job needs to know about the data.

    Attributes:
        name: "pystdlib", "text:<path>" or "mqar".
        vocab_size: ``VOCAB_SIZE`` (264).
        seq_len, global_batch_size, host_batch_size, process_index, process_count: the layout.
        unigram_bpb: text only: entropy in bits per byte of the training split's byte
            distribution (specials excluded), the loss of the best context-free model.
        chance_accuracy: mqar only: accuracy of guessing a value uniformly from its range.
        train_documents, val_documents, train_bytes, val_bytes: split sizes (text).
        tokens_per_byte: text: validation tokens (BOS/EOS included) per byte.
    """

    name: str
    vocab_size: int
    seq_len: int
    global_batch_size: int
    host_batch_size: int
    process_index: int
    process_count: int
    unigram_bpb: float | None = None
    chance_accuracy: float | None = None
    train_documents: int = 0
    val_documents: int = 0
    train_bytes: int = 0
    val_bytes: int = 0
    tokens_per_byte: float = 1.0


def _derived_seed(seed: int, stream: int) -> int:
    """Independent 32-bit seed for one of the pipeline's shuffles."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def _text_splits(config: DataConfig) -> tuple[corpus_lib.TokenCorpus, corpus_lib.TokenCorpus]:
    if config.path is None:
        return corpus_lib.stdlib_splits(config.val_fraction)
    names, docs = corpus_lib.path_documents(config.path, config.suffixes)
    return corpus_lib.split_documents(names, docs, config.val_fraction)


def _spread(available: int, needed: int) -> np.ndarray:
    """``needed`` indices spread evenly over ``range(available)``, cycling if it is smaller."""
    if available >= needed:
        return np.arange(needed, dtype=np.int64) * available // needed
    return np.arange(needed, dtype=np.int64) % available


def _text_datasets(config: DataConfig, shard: dict):
    """(train, validation) MapDatasets of this host's examples (not yet batched), info fields."""
    train, val = _text_splits(config)
    window = config.seq_len + 1
    doc_order = grain.MapDataset.range(train.num_documents).shuffle(
        seed=_derived_seed(config.seed, 0)
    )
    windows = PackedWindows(doc_order, train, window)
    windows = windows.shuffle(seed=_derived_seed(config.seed, 1)).repeat()
    train_ds = HostShard(windows, **shard).map(window_to_example)
    val_windows = PackedWindows(grain.MapDataset.range(val.num_documents), val, window)
    needed = config.val_batches * config.batch_size
    val_ds = Take(val_windows, _spread(len(val_windows), needed))
    val_ds = HostShard(val_ds, **shard).map(window_to_example)
    info = dict(
        name="pystdlib" if config.path is None else f"text:{config.path}",
        unigram_bpb=corpus_lib.unigram_bits_per_byte(train),
        train_documents=train.num_documents,
        val_documents=val.num_documents,
        train_bytes=train.num_bytes,
        val_bytes=val.num_bytes,
        tokens_per_byte=val.num_tokens / max(val.num_bytes, 1),
    )
    return train_ds, val_ds, info


def _mqar_datasets(config: DataConfig, shard: dict):
    """(train, validation) MapDatasets of this host's mqar examples, info fields."""
    settings = dict(
        seq_len=config.seq_len,
        num_kv_pairs=config.mqar_num_kv_pairs,
        key_range=config.mqar_key_range,
        value_range=config.mqar_value_range,
        power_a=config.mqar_power_a,
        random_non_queries=config.mqar_random_non_queries,
    )
    train_ids = HostShard(grain.MapDataset.range(sys.maxsize), **shard)
    train_ds = train_ids.map(MqarExamples(seed=config.seed, split=TRAIN_SPLIT, **settings))
    val_ids = grain.MapDataset.range(config.val_batches * config.batch_size)
    val_ds = HostShard(val_ids, **shard).map(
        MqarExamples(seed=config.seed, split=VALIDATION_SPLIT, **settings)
    )
    lo, hi = config.mqar_value_range
    return train_ds, val_ds, dict(name="mqar", chance_accuracy=1.0 / (hi - lo))


def make_datasets(
    config: DataConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tuple[grain.DatasetIterator, Callable[[], list[Batch]], DataInfo]:
    """Build this process's training iterator and validation batches.

    Args:
        config: the data settings.
        process_index, process_count: this host's slice of every global batch; default
            ``jax.process_index()`` / ``jax.process_count()`` (call ``jax.distributed.initialize()``
            first on a multi-host run). Tests pass them to simulate several hosts.

    Returns:
        train_iter: an infinite ``grain.DatasetIterator`` of batches (dict of ``inputs``,
            ``targets`` int32 [B_host, T] and ``mask`` float32 [B_host, T]); checkpoint it with
            ``get_state``/``set_state`` or ``iterator_save_args``/``iterator_restore_args``.
        val_batches_fn: ``() -> list`` of the ``config.val_batches`` fixed validation batches
            (built on the first call, then the same arrays every call).
        info: ``DataInfo`` (vocab size, unigram baseline, sizes).
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if config.batch_size % process_count:
        raise ValueError(
            f"data.batch_size={config.batch_size} (global) is not divisible by the "
            f"{process_count} processes; use a multiple of {process_count}"
        )
    host_batch = config.batch_size // process_count
    shard = dict(
        process_index=process_index, process_count=process_count, host_batch_size=host_batch
    )
    build = _mqar_datasets if config.name == "mqar" else _text_datasets
    train_ds, val_ds, extra = build(config, shard)

    read = grain.ReadOptions(
        num_threads=config.num_threads, prefetch_buffer_size=2 * config.num_threads
    )
    train_iter = iter(train_ds.batch(host_batch, drop_remainder=True).to_iter_dataset(read))
    val_batched = val_ds.batch(host_batch, drop_remainder=True)
    cache: list[list[Batch]] = []

    def val_batches_fn() -> list[Batch]:
        if not cache:
            cache.append([val_batched[i] for i in range(len(val_batched))])
        return list(cache[0])

    info = DataInfo(
        vocab_size=VOCAB_SIZE,
        seq_len=config.seq_len,
        global_batch_size=config.batch_size,
        host_batch_size=host_batch,
        process_index=process_index,
        process_count=process_count,
        **extra,
    )
    return train_iter, val_batches_fn, info


def iterator_save_args(iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointSave:
    """Orbax args that save a grain iterator's state, e.g.
    ``mngr.save(step, args=ocp.args.Composite(state=..., data=iterator_save_args(it)))``."""
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointRestore:
    """Orbax args that restore into ``iterator`` (a fresh one from ``make_datasets`` with the same
    config), e.g.
    ``mngr.restore(step, args=ocp.args.Composite(data=iterator_restore_args(it)))``."""
    return grain.checkpoint.CheckpointRestore(iterator)
