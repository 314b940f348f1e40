"""MQAR, multi-query associative recall (Zoology, Arora et al. 2023; used by Kimi Linear §5.1).

Layout of one example, following ``zoology/data/multiquery_ar.py`` (HazyResearch/zoology). With
``T = seq_len`` and ``K = num_kv_pairs`` a token row ``x`` of ``T + 1`` tokens is built:

* context ``x[0:2K]``: ``key_0 value_0 key_1 value_1 ...``; the K keys are distinct tokens drawn
  from ``key_range`` and the K values distinct tokens drawn from ``value_range`` (the two ranges
  are disjoint, so a key token is never a value token);
* queries: the rest, from ``c = 2K``, is ``S = (T - 2K) // 2`` two-token slots; K distinct slots
  ``s_j`` are drawn with ``P(s) ∝ (s + 1) ** (power_a - 1)`` (Zoology's power law; with
  ``power_a = 0.01`` a key is more often asked again soon after the context), and slot ``s_j``
  holds ``x[c + 2 s_j] = key_j, x[c + 2 s_j + 1] = value_j``, so every key is asked exactly once;
* every other position is filler: a uniform random token from 0..255 (Zoology's
  ``random_non_queries=True``, the default) or 0.

The example is ``inputs = x[:-1]``, ``targets = x[1:]`` (so ``targets`` is ``inputs`` shifted by
one, as for text) and ``mask[t] = 1`` exactly at the K query positions ``t = c + 2 s_j``, where
``inputs[t] = key_j`` and ``targets[t] = value_j``; loss and accuracy count only the answers.
One difference from Zoology's current code: there the input after a query is filler, here it is
the answer itself (as in the Zoology paper's figure); inputs at t + 1 cannot influence the causal
prediction at t, so the scored task is the same and "targets = inputs shifted" holds everywhere.

Every example is a pure function of ``(seed, split, index)`` through
``np.random.default_rng([seed, split, index])``: stateless, random access, resumable.
"""

from __future__ import annotations

import numpy as np

TRAIN_SPLIT = 0
VALIDATION_SPLIT = 1


def mqar_example(
    rng: np.random.Generator,
    *,
    seq_len: int,
    num_kv_pairs: int,
    key_range: tuple[int, int],
    value_range: tuple[int, int],
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> dict[str, np.ndarray]:
    """One MQAR example (layout in the module docstring).

    Returns:
        ``inputs`` int32 [T], ``targets`` int32 [T], ``mask`` float32 [T] with exactly
        ``num_kv_pairs`` ones.
    """
    T, K = seq_len, num_kv_pairs
    keys = rng.choice(np.arange(*key_range), size=K, replace=False)
    values = rng.choice(np.arange(*value_range), size=K, replace=False)
    num_slots = (T - 2 * K) // 2
    p = np.arange(1, num_slots + 1, dtype=np.float64) ** (power_a - 1.0)
    slots = rng.choice(num_slots, size=K, replace=False, p=p / p.sum())
    if random_non_queries:
        x = rng.integers(0, 256, size=T + 1)
    else:
        x = np.zeros(T + 1, np.int64)
    x[0 : 2 * K : 2], x[1 : 2 * K : 2] = keys, values
    query_pos = 2 * K + 2 * slots
    x[query_pos], x[query_pos + 1] = keys, values
    mask = np.zeros(T, np.float32)
    mask[query_pos] = 1.0
    x = x.astype(np.int32)
    return {"inputs": x[:-1], "targets": x[1:], "mask": mask}


class MqarExamples:
    """Callable ``index -> example`` for one split: ``np.random.default_rng([seed, split,
    index])`` drives ``mqar_example``; picklable, for ``grain.MapDataset.map``."""

    def __init__(self, *, seed: int, split: int, **settings):
        self.seed, self.split, self.settings = seed, split, settings

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split, int(index)])
        return mqar_example(rng, **self.settings)
