"""Input pipelines of the training job (grain): byte-level text and MQAR.

Modules: ``tokenizer`` (bytes + BOS/EOS/PAD, vocab 264), ``corpus`` (the built-in ``pystdlib``
corpus or a user's files, split by file), ``packing`` (concatenate-and-split and per-host grain
datasets), ``mqar`` (synthetic associative recall), ``pipeline`` (``DataConfig``,
``make_datasets``, orbax args for the iterator state).
"""

from experiments.data.corpus import TokenCorpus, unigram_bits_per_byte
from experiments.data.mqar import mqar_example
from experiments.data.pipeline import (
    DATASET_NAMES,
    DataConfig,
    DataInfo,
    iterator_restore_args,
    iterator_save_args,
    make_datasets,
)
from experiments.data.tokenizer import BOS, EOS, NUM_BYTES, PAD, VOCAB_SIZE, decode, encode

__all__ = [
    "BOS",
    "DATASET_NAMES",
    "EOS",
    "NUM_BYTES",
    "PAD",
    "VOCAB_SIZE",
    "DataConfig",
    "DataInfo",
    "TokenCorpus",
    "decode",
    "encode",
    "iterator_restore_args",
    "iterator_save_args",
    "make_datasets",
    "mqar_example",
    "unigram_bits_per_byte",
]
