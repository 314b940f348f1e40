"""Studies 3, 4 and 6 (issue 11): the pieces of the training studies, on tiny inputs."""

import dataclasses

import jax
import numpy as np
import pytest

from experiments.data import make_datasets
from experiments.presets import get_preset
from experiments.studies import muon_vs_adamw, residual_variants, training_runs
from jaxmodels.model import Decoder
from jaxmodels.residual.attn_res import AttnResConfig
from jaxmodels.residual.mhc import MHCConfig


def _curve(*points):
    return [{"step": s, "val_bpb": v} for s, v in points]


def test_first_step_reaching_interpolates_between_evaluations():
    curve = _curve((40, 4.0), (80, 3.0), (120, 2.5))
    assert training_runs.first_step_reaching(curve, 3.5) == pytest.approx(60.0)
    assert training_runs.first_step_reaching(curve, 2.5) == pytest.approx(120.0)
    assert training_runs.first_step_reaching(curve, 5.0) == 40.0  # first evaluation: bound
    assert training_runs.first_step_reaching(curve, 2.0) is None
    accuracy = [{"step": s, "val_accuracy": a} for s, a in ((50, 0.1), (100, 0.3), (150, 0.9))]
    reach = training_runs.first_step_reaching
    assert reach(accuracy, 0.5, "val_accuracy", higher_is_better=True) == pytest.approx(
        100 + 50 / 3
    )
    assert reach(accuracy, 0.05, "val_accuracy", higher_is_better=True) == 50.0
    assert reach(accuracy, 0.95, "val_accuracy", higher_is_better=True) is None


def test_compare_takes_each_optimizers_best_learning_rate():
    def run(name, lr, curve, wall):
        return {
            "optimizer": name,
            "learning_rate": lr,
            "steps": 160,
            "curve": curve,
            "final_val_bpb": curve[-1]["val_bpb"],
            "wall_s": wall,
            "cpu_s": wall,
        }

    runs = [
        run("adamw", 1e-3, _curve((80, 3.5), (160, 3.0)), 10.0),
        run("adamw", 1e-2, _curve((80, 3.6), (160, 3.2)), 10.0),
        run("muon", 1e-2, _curve((40, 3.4), (80, 3.0), (160, 2.6)), 12.0),
    ]
    result = muon_vs_adamw.compare(runs)
    assert result["best_lr"] == {"adamw": 1e-3, "muon": 1e-2}
    assert result["muon_steps_to_adamw_final"] == pytest.approx(80.0)
    assert result["step_ratio_adamw_over_muon"] == pytest.approx(2.0)
    assert result["adamw_steps_to_muon_final"] is None
    assert result["wall_ratio_muon_over_adamw"] == pytest.approx(1.2)


def test_study_config_keeps_the_schedule_shape_and_turns_off_extras():
    base = get_preset("small")  # 320 steps, warmup 30
    config = training_runs.study_config(base, steps=160, eval_every=40)
    assert config.train.steps == 160 and config.train.eval_every == 40
    assert config.optimizer.warmup_steps == 15
    assert config.train.sample_prompt == "" and not config.train.plot
    assert config.model == base.model and config.data == base.data
    assert training_runs.study_config(base).optimizer == base.optimizer


def test_train_and_measure_reports_the_runs_evaluations():
    config = training_runs.study_config(get_preset("tiny"), steps=8, eval_every=4)
    result = training_runs.train_and_measure(config)
    assert [p["step"] for p in result["curve"]] == [4, 8]
    assert result["final"] == result["curve"][-1]
    shapes = jax.eval_shape(
        Decoder(config.model).init, jax.random.key(0), np.zeros((1, 8), np.int32)
    )
    assert result["params"] == sum(x.size for x in jax.tree.leaves(shapes["params"]))
    assert result["final"]["val_bpb"] < result["curve"][0]["val_bpb"] + 1e-6


def _diagnostics(residual):
    config = get_preset("tiny")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, residual=residual))
    batch = make_datasets(config.data)[1]()[0]
    params = jax.jit(Decoder(config.model).init)(jax.random.key(0), batch["inputs"])
    return residual_variants.diagnostics(config, params, batch)


def test_mhc_composite_forward_gain_is_one():
    """V4's Sinkhorn ends on the normalisation that makes each row of the mixing sum to 1, so
    the composite of every prefix of layers has Amax forward gain 1 (fp32 rounding)."""
    diag = _diagnostics(MHCConfig(hc_mult=4))
    np.testing.assert_allclose(diag["gain_forward"], 1.0, atol=1e-5)
    assert len(diag["gain_forward"]) == len(diag["gain_backward"]) == 4  # 2 layers x 2


def test_attn_res_depth_weights_at_init_are_the_uniform_average():
    """Zero pseudo-queries: read l averages its l + 1 sources (embedding + l outputs)."""
    weights = np.asarray(_diagnostics(AttnResConfig(mode="full"))["depth_weights"])
    reads, sources = weights.shape
    assert (reads, sources) == (5, 6)  # 4 sub-layer reads + the final read; 1 + 4 (+ partial)
    for read in range(reads):
        expected = np.zeros(sources)
        expected[: read + 1] = 1.0 / (read + 1)
        np.testing.assert_allclose(weights[read], expected, atol=1e-6)


def test_hybrid_preset_is_kimi_linear_with_mhc_and_muon():
    hybrid, kimi = get_preset("hybrid"), get_preset("kimi-linear")
    assert hybrid.model.layer_pattern == ("kda", "kda", "kda", "mla")
    assert isinstance(hybrid.model.residual, MHCConfig) and hybrid.model.residual.hc_mult == 4
    assert hybrid.optimizer.name == "muon"
    assert dataclasses.replace(hybrid.model, residual=kimi.model.residual) == kimi.model
    assert hybrid.data == kimi.data
    assert hybrid.train.steps == 160 and hybrid.optimizer.warmup_steps == 15
