"""Tests of the input pipeline (experiments/data): tokenizer, corpus split, packing, resume,
multi-host slicing, MQAR construction, config validation."""

import grain
import numpy as np
import pytest

from experiments.data import (
    BOS,
    EOS,
    PAD,
    VOCAB_SIZE,
    DataConfig,
    decode,
    encode,
    iterator_restore_args,
    iterator_save_args,
    make_datasets,
    mqar_example,
    unigram_bits_per_byte,
)
from experiments.data import corpus as corpus_lib
from experiments.data.packing import PackedWindows


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _make(config, process_index=0, process_count=1):
    return make_datasets(config, process_index=process_index, process_count=process_count)


@pytest.fixture
def small_folder(tmp_path):
    """A folder of four text documents plus files the reader must skip."""
    root = tmp_path / "corpus"
    (root / "pkg").mkdir(parents=True)
    (root / ".hidden").mkdir()
    contents = {
        "a.py": b"x" * 30,
        "pkg/b.txt": b"hello world, " * 3,
        "c.md": bytes(range(65, 91)) * 2,
        "pkg/d.py": b"0123456",
    }
    for rel, data in contents.items():
        (root / rel).write_bytes(data)
    (root / "skip.bin").write_bytes(b"binary")
    (root / ".hidden" / "e.py").write_bytes(b"hidden")
    (root / "empty.txt").write_bytes(b"")
    return root, contents


# --- tokenizer ---------------------------------------------------------------------------------


def test_encode_decode_round_trip():
    text = "def f(x):\n    return 'héllo ✓ 字'\n"
    ids = encode(text)
    assert ids.dtype == np.int32 and ids.tolist() == list(text.encode("utf-8"))
    assert decode(ids) == text
    with_specials = encode(text, bos=True, eos=True)
    assert (
        with_specials[0] == BOS and with_specials[-1] == EOS and len(with_specials) == len(ids) + 2
    )
    assert decode(np.concatenate([with_specials, [PAD, 263]])) == text  # specials skipped
    assert decode([0xE2, 0x9C]) == "\ufffd"  # truncated UTF-8 is replaced, not an error
    assert VOCAB_SIZE == 264 and VOCAB_SIZE % 8 == 0 and max(BOS, EOS, PAD) < VOCAB_SIZE


# --- corpus ------------------------------------------------------------------------------------


def test_stdlib_split_by_file_is_disjoint_complete_and_stable():
    names, docs = corpus_lib.stdlib_documents()
    assert names == tuple(sorted(names)) and len(names) > 100
    assert not any(
        part in {"test", "tests", "idle_test", "site-packages"}
        for n in names
        for part in n.split("/")[:-1]
    )
    train, val = corpus_lib.stdlib_splits(0.02)
    assert set(train.names).isdisjoint(val.names)
    assert set(train.names) | set(val.names) == set(names)
    assert 0.005 < val.num_documents / len(names) < 0.05
    assert train.num_bytes + val.num_bytes == sum(len(d) for d in docs)
    # The split is a fixed function of the relative path (sha256, not Python's hash()).
    assert corpus_lib.validation_score("os.py") == 0.850948727781281
    assert corpus_lib.validation_score("chunk.py") < 0.02
    assert [n in val.names for n in names] == corpus_lib.split_by_file(names, 0.02)
    # Membership does not depend on which other files exist.
    subset = names[::3]
    assert corpus_lib.split_by_file(subset, 0.02) == [n in val.names for n in subset]


def test_token_corpus_layout():
    c = corpus_lib.TokenCorpus.from_documents(("a", "b"), (b"hi", b"xyz"))
    assert c.tokens.tolist() == [BOS, 104, 105, EOS, BOS, 120, 121, 122, EOS]
    assert c.offsets.tolist() == [0, 4, 9] and c.num_bytes == 5


def test_unigram_baseline():
    two = corpus_lib.TokenCorpus.from_documents(("a",), (b"ab" * 50,))
    assert unigram_bits_per_byte(two) == pytest.approx(1.0)
    four = corpus_lib.TokenCorpus.from_documents(("a", "b"), (b"abcd" * 8, b"dcba"))
    assert unigram_bits_per_byte(four) == pytest.approx(2.0)
    _, _, info = _make(DataConfig())
    train, _ = corpus_lib.stdlib_splits(0.02)
    assert info.unigram_bpb == pytest.approx(unigram_bits_per_byte(train))
    assert 4.0 < info.unigram_bpb < 5.5  # Python source: ~4.7 bits per byte


def test_path_folder_and_single_file(small_folder, tmp_path):
    root, contents = small_folder
    names, docs = corpus_lib.path_documents(str(root))
    assert names == tuple(sorted(contents))  # .bin, hidden folder and empty file skipped
    assert docs == tuple(contents[n] for n in names)
    names_py, _ = corpus_lib.path_documents(str(root), (".py",))
    assert names_py == ("a.py", "pkg/d.py")

    text = "".join(f"line {i}\n" for i in range(200)).encode()
    f = tmp_path / "one.txt"
    f.write_bytes(text)
    train, val = corpus_lib.split_documents(*corpus_lib.path_documents(str(f)), 0.1)
    assert train.num_documents == val.num_documents == 1
    joined = np.concatenate([train.tokens[1:-1], val.tokens[1:-1]]).astype(np.uint8).tobytes()
    assert joined == text
    assert decode(val.tokens).startswith("line ") and 0.05 < val.num_bytes / len(text) < 0.15


# --- text pipeline -----------------------------------------------------------------------------


def test_text_batches_are_shifted_windows_of_training_documents():
    config = DataConfig(seq_len=64, batch_size=4)
    it, _, info = _make(config)
    train, _ = corpus_lib.stdlib_splits(config.val_fraction)
    train_bytes = train.tokens.astype(np.uint8).tobytes()  # specials wrap, never match bytes
    for batch in _take(it, 3):
        assert batch["inputs"].shape == (4, 64) and batch["inputs"].dtype == np.int32
        assert batch["targets"].dtype == np.int32 and batch["mask"].dtype == np.float32
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        np.testing.assert_array_equal(batch["mask"], 1.0)  # packed: every target is real
        for row_in, row_tg in zip(batch["inputs"], batch["targets"], strict=True):
            window = np.concatenate([row_in, row_tg[-1:]])
            # Each run of bytes between specials is a piece of some training document.
            pieces = np.split(window, np.flatnonzero(window >= 256))
            longest = max((p[p < 256] for p in pieces), key=len)
            assert train_bytes.find(longest.astype(np.uint8).tobytes()) >= 0
    assert info.vocab_size == VOCAB_SIZE and info.host_batch_size == 4


def test_same_seed_same_batches_different_seed_different():
    config = DataConfig(seq_len=32, batch_size=4, seed=3)
    a = _take(_make(config)[0], 4)
    b = _take(_make(config)[0], 4)
    _assert_batches_equal(a, b)
    c = _take(_make(DataConfig(seq_len=32, batch_size=4, seed=4))[0], 4)
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


def test_packed_windows_concatenate_and_split_each_epoch_order():
    docs = (b"a" * 5, b"bb" * 4, b"c" * 13, b"dddd")  # 7 + 10 + 15 + 6 = 38 tokens
    corpus = corpus_lib.TokenCorpus.from_documents(("a", "b", "c", "d"), docs)
    order = grain.MapDataset.range(4).shuffle(seed=5)
    windows = PackedWindows(order, corpus, 9)
    assert len(windows) == 4  # 38 // 9; the last 2 tokens of each epoch are dropped
    perms = []
    for epoch in range(3):
        perm = [order[epoch * 4 + j] for j in range(4)]
        stream = np.concatenate(
            [corpus.tokens[corpus.offsets[d] : corpus.offsets[d + 1]] for d in perm]
        )
        got = np.concatenate([windows[epoch * 4 + k] for k in range(4)])
        np.testing.assert_array_equal(got, stream[:36])
        perms.append(perm)
    assert sorted(perms[0]) == [0, 1, 2, 3] and len({tuple(p) for p in perms}) > 1
    # A corpus shorter than one window still gives windows, cycling through the stream.
    tiny = PackedWindows(
        grain.MapDataset.range(1), corpus_lib.TokenCorpus.from_documents(("t",), (b"xy",)), 6
    )
    assert tiny[0].tolist() == [BOS, 120, 121, EOS, BOS, 120]


def test_each_epoch_covers_the_training_split_once_and_reshuffles(tmp_path):
    names = ["a.py", "b.py", "c.py", "d.py"]
    scores = sorted(corpus_lib.validation_score(n) for n in names)
    val_fraction = (scores[0] + scores[1]) / 2  # exactly one validation file
    train_names = [n for n in names if corpus_lib.validation_score(n) > val_fraction]
    for name, size in zip(train_names, (30, 39, 61), strict=True):  # 32 + 41 + 63 = 8 * 17 tokens
        (tmp_path / name).write_bytes(
            np.random.default_rng(size).integers(32, 127, size).astype(np.uint8).tobytes()
        )
    (tmp_path / (set(names) - set(train_names)).pop()).write_bytes(b"validation text\n")
    config = DataConfig(path=str(tmp_path), seq_len=16, batch_size=2, val_fraction=val_fraction)
    train, _ = corpus_lib.split_documents(*corpus_lib.path_documents(str(tmp_path)), val_fraction)
    assert train.names == tuple(train_names) and train.num_tokens == 8 * 17
    expected = np.bincount(train.tokens, minlength=VOCAB_SIZE)
    it, _, _ = _make(config)
    epochs = []
    for _ in range(3):  # 8 windows per epoch = 4 batches of 2
        rows = np.concatenate(
            [np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in _take(it, 4)]
        )
        np.testing.assert_array_equal(np.bincount(rows.reshape(-1), minlength=VOCAB_SIZE), expected)
        epochs.append(rows)
    assert not np.array_equal(epochs[0], epochs[1]) or not np.array_equal(epochs[1], epochs[2])


def test_validation_batches_fixed_seed_independent_and_from_validation_files():
    config = DataConfig(seq_len=64, batch_size=4, val_batches=3)
    _, val_fn, info = _make(config)
    first, again = val_fn(), val_fn()
    assert len(first) == 3
    _assert_batches_equal(first, again)
    _, val_fn_other_seed, _ = _make(DataConfig(seq_len=64, batch_size=4, val_batches=3, seed=9))
    _assert_batches_equal(first, val_fn_other_seed())
    train, val = corpus_lib.stdlib_splits(0.02)
    val_bytes = val.tokens.astype(np.uint8).tobytes()
    for batch in first:
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        for row in batch["inputs"]:
            pieces = np.split(row, np.flatnonzero(row >= 256))
            longest = max((p[p < 256] for p in pieces), key=len)
            assert val_bytes.find(longest.astype(np.uint8).tobytes()) >= 0
    rows = np.concatenate([b["inputs"] for b in first])
    assert len({r.tobytes() for r in rows}) == len(rows)  # spread windows, no repeats
    assert info.val_documents == val.num_documents and info.train_documents == train.num_documents


@pytest.mark.parametrize("name", ["pystdlib", "mqar"])
def test_resumed_iterator_continues_the_exact_sequence(name):
    config = DataConfig(name=name, seq_len=32, batch_size=4, seed=1)
    it, _, _ = _make(config)
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 4)
    fresh, _, _ = _make(config)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 4), expected)


def test_iterator_state_round_trips_through_orbax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    config = DataConfig(seq_len=32, batch_size=4)
    it, _, _ = _make(config)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=iterator_save_args(it)))
        mngr.wait_until_finished()
    expected = _take(it, 3)
    fresh, _, _ = _make(config)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 3
        mngr.restore(3, args=ocp.args.Composite(data=iterator_restore_args(fresh)))
    _assert_batches_equal(_take(fresh, 3), expected)


# --- multi-host --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pystdlib", "mqar"])
def test_two_hosts_are_disjoint_and_together_equal_one_host(name):
    config = DataConfig(name=name, seq_len=32, batch_size=8, val_batches=2)
    one, one_val, _ = _make(config)
    h0, h0_val, info0 = _make(config, 0, 2)
    h1, h1_val, _ = _make(config, 1, 2)
    assert info0.host_batch_size == 4 and info0.global_batch_size == 8
    for g, b0, b1 in zip(_take(one, 3), _take(h0, 3), _take(h1, 3), strict=True):
        rows0 = {r.tobytes() for r in b0["inputs"]}
        rows1 = {r.tobytes() for r in b1["inputs"]}
        assert rows0.isdisjoint(rows1)
        for k in g:
            np.testing.assert_array_equal(np.concatenate([b0[k], b1[k]]), g[k])
    for g, b0, b1 in zip(one_val(), h0_val(), h1_val(), strict=True):
        np.testing.assert_array_equal(np.concatenate([b0["inputs"], b1["inputs"]]), g["inputs"])


def test_state_is_the_global_step_so_it_survives_a_change_of_host_count():
    config = DataConfig(seq_len=32, batch_size=8)
    one, _, _ = _make(config)
    _take(one, 4)
    state = one.get_state()
    expected = next(one)
    host1, _, _ = _make(config, 1, 2)
    host1.set_state(state)
    np.testing.assert_array_equal(next(host1)["inputs"], expected["inputs"][4:])


def test_batch_size_must_divide_over_processes():
    with pytest.raises(ValueError, match=r"data.batch_size=6 .* not divisible by the 4 processes"):
        _make(DataConfig(batch_size=6), 0, 4)


# --- mqar --------------------------------------------------------------------------------------


def _check_mqar_row(inputs, targets, mask, K, key_range, value_range):
    keys, values = inputs[0 : 2 * K : 2], inputs[1 : 2 * K : 2]
    assert len(set(keys.tolist())) == K and len(set(values.tolist())) == K
    assert np.all((keys >= key_range[0]) & (keys < key_range[1]))
    assert np.all((values >= value_range[0]) & (values < value_range[1]))
    pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
    query_pos = np.flatnonzero(mask)
    assert set(np.unique(mask).tolist()) <= {0.0, 1.0} and len(query_pos) == K
    assert np.all(query_pos >= 2 * K)  # queries come after the context
    assert sorted(inputs[query_pos].tolist()) == sorted(keys.tolist())  # each key asked once
    for t in query_pos:
        assert targets[t] == pairs[int(inputs[t])]  # the answer is the value paired earlier
    np.testing.assert_array_equal(targets[:-1], inputs[1:])


def test_mqar_answers_are_correct_by_construction():
    config = DataConfig(name="mqar", seq_len=64, batch_size=8, mqar_num_kv_pairs=6)
    it, val_fn, info = _make(config)
    for batch in _take(it, 2) + val_fn()[:1]:
        assert batch["inputs"].shape == (8, 64)
        for i in range(8):
            _check_mqar_row(
                batch["inputs"][i],
                batch["targets"][i],
                batch["mask"][i],
                6,
                config.mqar_key_range,
                config.mqar_value_range,
            )
    assert info.chance_accuracy == pytest.approx(1 / 128) and info.unigram_bpb is None


def test_mqar_mask_marks_exactly_the_queries_without_filler_noise():
    rng = np.random.default_rng(0)
    for _ in range(20):
        ex = mqar_example(
            rng,
            seq_len=40,
            num_kv_pairs=4,
            key_range=(1, 20),
            value_range=(30, 50),
            random_non_queries=False,
        )
        x = np.concatenate([ex["inputs"], ex["targets"][-1:]])
        tail = np.arange(8, 40)
        queries = tail[(tail % 2 == 0) & (x[tail] != 0)]  # with zero filler, keys mark queries
        np.testing.assert_array_equal(np.flatnonzero(ex["mask"]), queries)
        _check_mqar_row(ex["inputs"], ex["targets"], ex["mask"], 4, (1, 20), (30, 50))


def test_mqar_queries_follow_the_power_law():
    def mean_slot(power_a):
        rng = np.random.default_rng(1)
        pos = [
            np.flatnonzero(
                mqar_example(
                    rng,
                    seq_len=256,
                    num_kv_pairs=8,
                    key_range=(1, 128),
                    value_range=(128, 256),
                    power_a=power_a,
                )["mask"]
            )
            for _ in range(200)
        ]
        return (np.concatenate(pos).mean() - 16) / 2

    uniform = mean_slot(1.0)
    assert abs(uniform - 59.5) < 4  # (120 slots - 1) / 2
    assert mean_slot(0.01) < 0.7 * uniform  # Zoology's default asks keys again sooner


def test_mqar_is_deterministic_and_validation_differs_from_training():
    config = DataConfig(name="mqar", seq_len=32, batch_size=4, val_batches=2)
    a_it, a_val, _ = _make(config)
    b_it, b_val, _ = _make(config)
    a_train = _take(a_it, 2)
    _assert_batches_equal(a_train, _take(b_it, 2))
    _assert_batches_equal(a_val(), b_val())
    other_seed, _, _ = _make(DataConfig(name="mqar", seq_len=32, batch_size=4, seed=1))
    assert not np.array_equal(a_train[0]["inputs"], next(other_seed)["inputs"])
    assert not np.array_equal(a_val()[0]["inputs"], a_train[0]["inputs"])


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(seq_len=0), ValueError, r"data.seq_len=0 must be positive"),
        (dict(batch_size=-2), ValueError, r"data.batch_size=-2 must be positive"),
        (
            dict(name="wiki"),
            ValueError,
            r"data.name='wiki' is unknown; choose one of "
            r"pystdlib, text, mqar",
        ),
        (dict(path="/no/such/dir"), FileNotFoundError, r"data.path='/no/such/dir' does not exist"),
        (dict(name="text"), ValueError, r"data.name='text' needs data.path"),
        (dict(val_fraction=1.5), ValueError, r"data.val_fraction=1.5 must be in \(0, 1\)"),
        (dict(seed=-1), ValueError, r"data.seed=-1 must be in \[0, 2\*\*32\)"),
        (
            dict(name="mqar", seq_len=20, mqar_num_kv_pairs=8),
            ValueError,
            r"data.seq_len=20 is too short .* seq_len >= 4 \* num_kv_pairs = 32",
        ),
        (dict(name="mqar", mqar_key_range=(1, 130)), ValueError, r"overlap"),
        (dict(name="mqar", mqar_value_range=(200, 300)), ValueError, r"0 <= lo < hi <= 264"),
        (dict(name="mqar", mqar_key_range=(1, 4)), ValueError, r"fewer than"),
        (dict(name="mqar", path="."), ValueError, r"data.path='.' is for text corpora"),
    ],
)
def test_config_validation_messages(kwargs, error, message):
    with pytest.raises(error, match=message):
        DataConfig(**kwargs)


def test_config_accepts_lists_and_is_frozen():
    config = DataConfig(name="mqar", mqar_key_range=[1, 100], suffixes=[".py"])
    assert config.mqar_key_range == (1, 100) and config.suffixes == (".py",)
    hash(config)
    with pytest.raises(AttributeError):
        config.seq_len = 3  # type: ignore[misc]


def test_user_path_pipeline_keeps_validation_files_out_of_training(small_folder):
    root, contents = small_folder  # the four files use disjoint sets of characters
    it, val_fn, info = _make(DataConfig(path=str(root), seq_len=16, batch_size=2))
    assert info.name == f"text:{root}" and (info.train_documents, info.val_documents) == (3, 1)
    names = sorted(contents)
    (val_name,) = [
        n for n, v in zip(names, corpus_lib.split_by_file(names, 0.02), strict=True) if v
    ]
    val_chars = set(contents[val_name])
    for batch in _take(it, 10):
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        assert val_chars.isdisjoint(batch["inputs"].reshape(-1).tolist())
    val = val_fn()
    assert len(val) == 8  # the tiny validation file is cycled to fill val_batches
    for batch in val:
        assert set(batch["inputs"].reshape(-1).tolist()) <= val_chars | {BOS, EOS}
