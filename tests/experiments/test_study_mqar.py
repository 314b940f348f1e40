"""Study 2 (MQAR across attention kinds): matched sizes, real sparsity, aggregation, a quick run."""

import json
import os
import tempfile

import pytest

from experiments.studies import mqar


@pytest.fixture(scope="module")
def param_counts():
    return {kind: mqar.param_count(mqar.model_config(kind)) for kind in mqar.KINDS}


def test_every_kind_is_within_the_parameter_tolerance_of_the_baseline(param_counts):
    base = param_counts[mqar.BASELINE]
    off = {
        kind: n / base - 1
        for kind, n in param_counts.items()
        if abs(n / base - 1) > mqar.PARAM_TOLERANCE
    }
    assert not off, f"parameter counts off the baseline's {base:,} by more than 15 %: {off}"


def test_the_models_are_the_kinds_they_claim():
    for kind in mqar.KINDS:
        config = mqar.model_config(kind)
        kinds = {config.attention[label].kind for label in config.layer_pattern}
        if kind == "kimi_linear":
            assert config.layer_pattern == ("kda", "kda", "kda", "mla")
            assert kinds == {"kda", "mla"} and config.attention["mla"].use_nope
        else:
            assert kinds == {kind}
    assert mqar.model_config("dsa").attention["dsa"].indexer_stage == "sparse"


def test_unknown_kind_is_rejected_naming_the_value():
    with pytest.raises(ValueError, match="'mamba2'"):
        mqar.model_config("mamba2")
    with pytest.raises(SystemExit):
        mqar.main(["--quick", "--kinds", "gqa,mamba2"])


@pytest.mark.parametrize("seq_len", mqar.LENGTHS)
def test_sparse_kinds_read_a_strict_subset_of_the_context(seq_len):
    fractions = {kind: mqar.attended_fraction(kind, seq_len) for kind in mqar.KINDS}
    assert fractions["gqa"] == fractions["mla"] == 1.0
    assert fractions["kda"] is None and fractions["gdn"] is None
    for kind in ("moba", "nsa", "dsa"):
        assert 0 < fractions[kind] < 0.5, (kind, fractions[kind])
    moba = mqar.attention_configs("moba")["moba"]
    assert moba.top_k < seq_len // moba.block_size
    nsa = mqar.attention_configs("nsa")["nsa"]
    assert nsa.num_selected < seq_len // nsa.slc_block
    assert nsa.num_selected > nsa.num_init + nsa.num_local  # at least one block is chosen
    assert mqar.attention_configs("dsa")["dsa"].index_topk < seq_len


def test_only_the_long_kinds_run_past_the_first_length(monkeypatch):
    def fake_training(config):
        curve = [{"step": 2, "val_accuracy": 0.5}]
        final = {"val_accuracy": 0.5, "val_loss": 1.0}
        params = mqar.param_count(config.model)
        return {"final": final, "curve": curve, "params": params, "wall_s": 0.0, "cpu_s": 0.0}

    monkeypatch.setattr(mqar, "train_and_measure", fake_training)
    grid = {"lengths": [64, 128], "kv_pairs": [4], "seeds": [0, 1], "steps": 2}
    d = mqar.Dims.quick()
    records = mqar.run(["gqa", "kda"], **grid, d=d, long_kinds=["kda"], log=lambda _: None)
    ran = [(r["kind"], r["seq_len"], r["seed"]) for r in records]
    assert ran == [("gqa", 64, 0), ("gqa", 64, 1)] + [
        ("kda", t, s) for t in (64, 128) for s in (0, 1)
    ]
    everything = mqar.run(["gqa"], **grid, d=d, long_kinds=None, log=lambda _: None)
    assert [r["seq_len"] for r in everything] == [64, 64, 128, 128]
    with pytest.raises(SystemExit):
        mqar.main(["--quick", "--long-kinds", "mamba2"])


def _run(kind, seed, *accuracies, params=7):
    curve = [{"step": 100 * (i + 1), "val_accuracy": a} for i, a in enumerate(accuracies)]
    return {
        "kind": kind,
        "seq_len": 256,
        "kv_pairs": 4,
        "seed": seed,
        "val_accuracy": accuracies[-1],
        "curve": curve,
        "params": params,
    }


def test_aggregate_mean_min_max_learned_and_steps_to_learn_over_seeds():
    records = [_run("kda", 0, 0.1, 0.5), _run("kda", 1, 0.3, 0.7, 0.9), _run("kda", 2, 0.1, 0.1)]
    records.append(_run("gdn", 0, 0.25, params=5))
    rows = {r["kind"]: r for r in mqar.aggregate(records)}
    assert rows["kda"]["mean"] == pytest.approx(0.5)
    assert (rows["kda"]["min"], rows["kda"]["max"], rows["kda"]["seeds"]) == (0.1, 0.9, 3)
    assert rows["kda"]["learned"] == 2  # final accuracy >= mqar.LEARNED (0.5)
    assert rows["kda"]["steps_to_learn"] == [200, 150, None]  # 0.3 -> 0.7 crosses at step 150
    assert rows["gdn"]["mean"] == rows["gdn"]["min"] == rows["gdn"]["max"] == 0.25
    assert (rows["gdn"]["learned"], rows["gdn"]["steps_to_learn"]) == (0, [None])
    assert rows["kda"]["params"] == 7


def test_quick_run_end_to_end(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the run workdirs go
    out = tmp_path / "out"
    # One kind keeps the test near 10 s (each run compiles its own programs and writes a
    # checkpoint); `--quick` alone trains the pair MHA and KDA.
    result = mqar.main(["--quick", "--kinds", "gqa", "--out", str(out)])
    assert os.listdir(scratch) == []  # every run's workdir was deleted
    with open(out / "mqar.json") as f:
        saved = json.load(f)
    assert (out / "mqar.png").stat().st_size > 0
    records = saved["records"]
    assert [(r["kind"], r["seq_len"], r["kv_pairs"], r["seed"]) for r in records] == [
        ("gqa", 64, 4, 0)
    ]
    keys = {"kind", "seq_len", "kv_pairs", "seed", "val_accuracy", "params", "steps", "wall_s"}
    for r in records:
        assert keys <= set(r)
        assert 0.0 <= r["val_accuracy"] <= 1.0
        assert r["params"] == mqar.param_count(mqar.model_config(r["kind"], mqar.Dims.quick()))
        assert r["curve"][-1]["step"] == r["steps"] == saved["recipe"]["steps"]
    assert saved["aggregate"] == result["aggregate"] == mqar.aggregate(records)


def _record(seed, accuracy):
    return {**_run("kda", seed, accuracy), "kv_pairs": 8}


def test_append_adds_seeds_and_replaces_a_rerun_cell():
    saved = {
        "recipe": {"steps": 500},
        "grid": {"seeds": [0, 1]},
        "study_wall_s": 10.0,
        "study_cpu_s": 20.0,
        "records": [_record(0, 0.9), _record(1, 0.1)],
    }
    new = {
        "grid": {"seeds": [1, 2]},
        "study_wall_s": 5.0,
        "study_cpu_s": 6.0,
        "records": [_record(1, 0.5), _record(2, 0.3)],
    }
    result = mqar.merged(saved, new)
    assert [(r["seed"], r["val_accuracy"]) for r in result["records"]] == [
        (0, 0.9),
        (1, 0.5),
        (2, 0.3),
    ]
    (row,) = result["aggregate"]
    assert row["seeds"] == 3 and row["mean"] == pytest.approx((0.9 + 0.5 + 0.3) / 3)
    assert result["grid"] == {"seeds": [0, 1]} and result["appended"] == [{"seeds": [1, 2]}]
    assert (result["study_wall_s"], result["study_cpu_s"]) == (15.0, 26.0)


def test_append_refuses_another_recipe_before_training(tmp_path):
    recipe = mqar.recipe(mqar.Dims(), 500, quick=False)
    path = tmp_path / "mqar.json"
    with pytest.raises(ValueError, match="does not exist"):
        mqar.load_for_append(str(path), recipe)
    path.write_text(json.dumps({"recipe": recipe, "records": []}))
    assert mqar.load_for_append(str(path), recipe)["recipe"] == recipe
    with pytest.raises(ValueError, match="steps 600 differs .* 500"):
        mqar.load_for_append(str(path), mqar.recipe(mqar.Dims(), 600, quick=False))
    with pytest.raises(SystemExit):  # the quick recipe differs: fails before any run
        mqar.main(["--quick", "--append", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        mqar.main(["--quick", "--append"])  # nothing to append to
