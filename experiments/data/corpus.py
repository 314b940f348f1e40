"""Text corpora as token arrays: the built-in ``pystdlib`` corpus or a user's file/folder.

``pystdlib`` is the ``.py`` sources of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), about 730 files / 12 MB on CPython 3.11. Directories named
``site-packages``/``dist-packages`` (installed packages, not the stdlib), ``__pycache__``, hidden
directories, and test directories (``test``, ``tests``, ``idle_test``: CPython's regression suite,
``lib2to3/tests``, ``ctypes/test``, ...) are skipped. The test suites are excluded on purpose: they
are larger than the library itself and full of fixtures with deliberately odd bytes (bad encodings,
generated data), which would make the default run slower and the corpus less like ordinary code.
The corpus depends on the Python version, so figures are comparable only within one version.

Documents are files, listed in sorted order of their ``/``-separated path relative to the root.
Each document is ``BOS + bytes + EOS``. The train/validation split is by file and depends only on
the relative path and ``val_fraction`` (never on the seed, never on Python's randomized
``hash()``): a file is validation when the first 8 bytes of ``sha256(relative_path)``, read as an
integer and divided by 2**64, are below ``val_fraction``. Adding or removing other files never
moves a file between splits.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sysconfig

import numpy as np

from experiments.data.tokenizer import BOS, EOS, NUM_BYTES

STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
DEFAULT_SUFFIXES = (".py", ".txt", ".md")


@dataclasses.dataclass(frozen=True, eq=False)
class TokenCorpus:
    """The documents of one split, concatenated.

    Attributes:
        names: [n] document names (relative paths), in corpus order.
        tokens: uint16 [total] every document as ``BOS bytes EOS``, back to back.
        offsets: int64 [n + 1] document i is ``tokens[offsets[i]:offsets[i + 1]]``.
    """

    names: tuple[str, ...]
    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.names)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_bytes(self) -> int:
        """Tokens that are bytes (each document adds a BOS and an EOS)."""
        return self.num_tokens - 2 * self.num_documents

    @property
    def lengths(self) -> np.ndarray:
        """int64 [n] tokens per document, specials included."""
        return np.diff(self.offsets)

    @classmethod
    def from_documents(cls, names: tuple[str, ...], docs: tuple[bytes, ...]) -> TokenCorpus:
        lengths = np.array([len(d) + 2 for d in docs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.empty(int(offsets[-1]), dtype=np.uint16)
        for start, doc in zip(offsets[:-1], docs, strict=True):
            tokens[start] = BOS
            tokens[start + 1 : start + 1 + len(doc)] = np.frombuffer(doc, dtype=np.uint8)
            tokens[start + 1 + len(doc)] = EOS
        return cls(names=tuple(names), tokens=tokens, offsets=offsets)


def validation_score(relative_path: str) -> float:
    """Stable number in [0, 1) for a relative path; the file is validation when it is below
    ``val_fraction``. sha256 based, so identical in every process and on every machine."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_file(names: list[str] | tuple[str, ...], val_fraction: float) -> list[bool]:
    """Whether each relative path goes to validation (see the module docstring).

    With two or more files both splits are non-empty: if no score falls below
    ``val_fraction`` the file with the lowest score is validation; if all do, the file with the
    highest score is training.
    """
    scores = [validation_score(n) for n in names]
    is_val = [s < val_fraction for s in scores]
    if len(names) >= 2 and not any(is_val):
        is_val[int(np.argmin(scores))] = True
    if len(names) >= 2 and all(is_val):
        is_val[int(np.argmax(scores))] = False
    return is_val


def _walk(root: str, suffixes: tuple[str, ...], skip_dirs: frozenset[str]) -> list[str]:
    """Relative ``/``-separated paths of the files under root with one of the suffixes, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(suffixes):
                rel = os.path.relpath(os.path.join(dirpath, f), root)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _read(root: str, rels: list[str]) -> tuple[bytes, ...]:
    docs = []
    for rel in rels:
        with open(os.path.join(root, rel), "rb") as fh:
            docs.append(fh.read())
    return tuple(docs)


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


@functools.lru_cache(maxsize=1)
def stdlib_documents() -> tuple[tuple[str, ...], tuple[bytes, ...]]:
    """(relative paths, file bytes) of the standard library's ``.py`` files; read once per
    process (about 0.1 s) and cached."""
    root = stdlib_root()
    rels = [r for r in _walk(root, (".py",), STDLIB_SKIP_DIRS)]
    docs = _read(root, rels)
    keep = [i for i, d in enumerate(docs) if d]  # empty __init__.py files carry no text
    return tuple(rels[i] for i in keep), tuple(docs[i] for i in keep)


def path_documents(
    path: str, suffixes: tuple[str, ...] = DEFAULT_SUFFIXES
) -> tuple[tuple[str, ...], tuple[bytes, ...]]:
    """(names, bytes) of a user's text file, or of every file under a folder whose name ends
    with one of ``suffixes`` (case-insensitive; hidden files/folders and ``__pycache__`` are
    skipped; empty files are dropped). Not cached: an edited file is read afresh."""
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            return (os.path.basename(path),), (fh.read(),)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data.path={path!r} does not exist")
    rels = _walk(path, tuple(s.lower() for s in suffixes), frozenset({"__pycache__"}))
    docs = _read(path, rels)
    keep = [i for i, d in enumerate(docs) if d]
    if not keep:
        raise ValueError(
            f"data.path={path!r} holds no non-empty file ending in {', '.join(suffixes)}; "
            "set data.suffixes or point data.path at a text file"
        )
    return tuple(rels[i] for i in keep), tuple(docs[i] for i in keep)


def split_documents(
    names: tuple[str, ...], docs: tuple[bytes, ...], val_fraction: float
) -> tuple[TokenCorpus, TokenCorpus]:
    """(train, validation) corpora.

    Two or more documents: split by file with ``split_by_file``. One document (a single text
    file): the last ``val_fraction`` of its bytes, starting at a line start where there is one,
    becomes the validation document, the rest the training document.
    """
    if len(docs) == 1:
        data = docs[0]
        if len(data) < 2:
            raise ValueError(f"{names[0]!r} has {len(data)} bytes; need at least 2 to split")
        cut = min(max(int(len(data) * (1.0 - val_fraction)), 1), len(data) - 1)
        newline = data.find(b"\n", cut - 1)
        if 0 <= newline < len(data) - 1:
            cut = newline + 1
        train = TokenCorpus.from_documents((f"{names[0]}[train]",), (data[:cut],))
        val = TokenCorpus.from_documents((f"{names[0]}[validation]",), (data[cut:],))
        return train, val
    is_val = split_by_file(names, val_fraction)
    pick = lambda want: tuple(i for i, v in enumerate(is_val) if v == want)  # noqa: E731
    tr, va = pick(False), pick(True)
    train = TokenCorpus.from_documents(tuple(names[i] for i in tr), tuple(docs[i] for i in tr))
    val = TokenCorpus.from_documents(tuple(names[i] for i in va), tuple(docs[i] for i in va))
    return train, val


@functools.lru_cache(maxsize=4)
def stdlib_splits(val_fraction: float) -> tuple[TokenCorpus, TokenCorpus]:
    """Cached (train, validation) corpora of ``pystdlib``."""
    return split_documents(*stdlib_documents(), val_fraction)


def unigram_bits_per_byte(corpus: TokenCorpus) -> float:
    """Entropy, in bits, of the corpus's byte distribution (specials excluded): the loss of the
    best model that ignores context, i.e. the "unigram baseline" a language model must beat."""
    counts = np.bincount(corpus.tokens, minlength=NUM_BYTES + 3)[:NUM_BYTES].astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())
