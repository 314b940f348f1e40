"""Study 5 (long-context cost): the exponent fit, the method table and a quick end-to-end run."""

import json
import math
import os

import numpy as np
import pytest

from experiments.studies import long_context


def test_fit_recovers_a_known_exponent():
    lengths = [128, 512, 2048, 8192, 32768]
    assert long_context.fit_exponent(lengths, [3 * T**1.5 for T in lengths]) == pytest.approx(
        1.5, abs=1e-6
    )
    assert long_context.fit_exponent(lengths, [0.2 * T**2 for T in lengths]) == pytest.approx(
        2.0, abs=1e-6
    )
    assert long_context.fit_exponent(lengths, [7.0] * len(lengths)) == pytest.approx(0, abs=1e-9)


def test_fit_is_least_squares_over_noisy_points():
    lengths = np.array([1024, 2048, 4096, 8192, 16384])
    noise = np.array([1.1, 0.9, 1.05, 0.95, 1.0])
    slope = np.polyfit(np.log(lengths), np.log(5 * lengths * noise), 1)[0]
    assert long_context.fit_exponent(lengths, 5 * lengths * noise) == pytest.approx(slope)
    with pytest.raises(ValueError, match="positive"):
        long_context.fit_exponent([1, 2], [1.0, 0.0])


def test_exponents_fit_only_the_long_lengths():
    rows = [
        {"method": "m", "phase": phase, "T": T, "cpu_ms": t, "wall_ms": 2 * t}
        for phase in long_context.PHASES
        for T, t in ((1024, 50.0), (4096, 16.0), (8192, 64.0), (16384, 256.0))
    ]
    fits = long_context.exponents(rows, "method", fit_from=4096)
    assert [f["fit_lengths"] for f in fits] == [[4096, 8192, 16384]] * 2
    assert all(f["exponent"] == pytest.approx(2.0) for f in fits)
    assert all(f["wall_exponent"] == pytest.approx(2.0) for f in fits)


def test_method_builder_rejects_unknown_method():
    with pytest.raises(ValueError, match="'flash_linear'"):
        long_context.method_layers("flash_linear", long_context.Dims.quick())
    with pytest.raises(SystemExit):
        long_context.main(["--quick", "--methods", "dense,flash_linear"])


def test_hybrids_are_the_published_layer_mixes():
    dims = long_context.Dims()
    kimi = long_context.method_layers("kda_hybrid", dims)
    assert {name: (cfg.kind, w) for name, (cfg, w) in kimi.items()} == {
        "kda": ("kda", 3),
        "mla": ("mla", 1),
    }
    v4 = long_context.method_layers("v4_hybrid", dims)
    assert sorted(cfg.compress_ratio for cfg, _ in v4.values()) == [4, 128]
    assert all(cfg.is_csa == (cfg.compress_ratio == 4) for cfg, _ in v4.values())
    ((dsa, _),) = long_context.method_layers("dsa", dims).values()
    ((mla, _),) = long_context.method_layers("mla", dims).values()
    assert dsa.mla == mla  # DSA is the MLA row's layer plus the indexer


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("long_context")
    result = long_context.main(["--quick", "--out", str(out)])
    return out, result


def test_quick_run_records_every_method_and_phase(quick_run):
    out, result = quick_run
    with open(os.path.join(out, "long_context.json")) as fh:
        saved = json.load(fh)
    assert saved["records"] == result["records"]
    assert os.path.getsize(os.path.join(out, "long_context.png")) > 10_000
    lengths = list(long_context.QUICK_LENGTHS)
    keys = {(r["method"], r["phase"], r["T"]) for r in saved["records"]}
    assert keys == {
        (m, p, T) for m in long_context.METHODS for p in long_context.PHASES for T in lengths
    }
    assert all(r["wall_ms"] > 0 and r["cpu_ms"] > 0 for r in saved["records"])
    fits = {(f["method"], f["phase"]): f for f in saved["exponents"]}
    assert set(fits) == {(m, p) for m in long_context.METHODS for p in long_context.PHASES}
    assert all(math.isfinite(f["exponent"]) and f["fit_lengths"] == lengths for f in fits.values())
    # The flash-form dense reference: prefill only, at every length, with its exponent.
    assert [(r["phase"], r["T"]) for r in saved["reference_records"]] == [
        ("prefill", T) for T in lengths
    ]
    assert all(r["cpu_ms"] > 0 for r in saved["reference_records"])
    (ref_fit,) = saved["reference_exponents"]
    assert ref_fit["phase"] == "prefill" and math.isfinite(ref_fit["exponent"])


def test_quick_run_hybrids_combine_their_layers(quick_run):
    _, result = quick_run
    layer = {(r["layer"], r["phase"], r["T"]): r["cpu_ms"] for r in result["layer_records"]}
    for r in result["records"]:
        key = (r["phase"], r["T"])
        if r["method"] == "kda_hybrid":
            assert r["cpu_ms"] == pytest.approx(
                (3 * layer[("kda", *key)] + layer[("mla", *key)]) / 4
            )
        if r["method"] == "v4_hybrid":
            expected = (layer[("v4_csa", *key)] + layer[("v4_hca", *key)]) / 2
            assert r["cpu_ms"] == pytest.approx(expected)
        if r["method"] == "dense":
            assert r["cpu_ms"] == layer[("gqa", *key)]
