"""MuonClip in the main job: `--optimizer.name=muon --optimizer.qk_clip_threshold=τ` on the
tiny GQA and MLA presets, a few steps in process.

The warmup starts the learning rate at 0, so step 1 moves no weight but QK-Clip's: after it the
parameters must be exactly the clip of the initial ones, with γ = τ / S from the per-head max
logits S of the first batch — q/k kernels of the heads over τ rescaled by the rule of their
kind, every other weight (and every head under τ) bit-identical — and the first layer's max
logits on that batch must then be min(S, τ).
"""

import dataclasses

import jax
import numpy as np
import pytest

from experiments import generate, presets, train
from experiments.data import make_datasets
from experiments.metrics import read_metrics
from experiments.optimizer import build_optimizer, qk_clip_module_targets
from jaxmodels import training
from jaxmodels.model import Decoder

pytestmark = pytest.mark.slow


def muon_clip_config(preset: str, tau: float):
    base = presets.get_preset(preset)
    return dataclasses.replace(
        base,
        optimizer=dataclasses.replace(
            base.optimizer, name="muon", warmup_steps=2, qk_clip_threshold=tau
        ),
        train=dataclasses.replace(
            base.train,
            steps=3,
            log_every=1,
            eval_every=3,
            checkpoint_every=3,
            progress=False,
            plot=False,
            sample_prompt="",
        ),
    )


def initial_params(config):
    """The parameters the job starts from (same seed, same mesh), on the host."""
    tx = build_optimizer(config.optimizer, config.train.steps, config.model)
    state, _ = training.init_train_state(
        config.model,
        tx,
        jax.random.key(config.train.seed),
        train.make_run_mesh(config),
        seq_len=config.data.seq_len,
    )
    return jax.device_get(state.params)


def max_logits(config, params, inputs):
    """{attention module path: per-head max logits [N]} of one forward pass."""
    _, stats = Decoder(config.model).apply(params, inputs, mutable=["attn_stats"])
    return {k: np.asarray(v) for k, v in training.max_logits_by_module(stats["attn_stats"]).items()}


def subtree(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def head_gamma(attention, gamma_N):
    """The factor of each query head's logits: GQA heads take their kv group's smallest γ."""
    if attention.kind != "gqa":
        return gamma_N
    groups = attention.num_heads // attention.num_kv_heads
    return np.repeat(gamma_N.reshape(-1, groups).min(-1), groups)


def expected_factors(attention, gamma_N):
    """{q/k leaf: factor [heads, last dim]} of the QK-Clip rule of the layer's kind."""
    if attention.kind == "gqa":  # q and k by sqrt(γ of the group)
        groups = attention.num_heads // attention.num_kv_heads
        gamma_K = gamma_N.reshape(attention.num_kv_heads, groups).min(-1)
        return {
            "q_proj": np.sqrt(np.repeat(gamma_K, groups))[:, None],
            "k_proj": np.sqrt(gamma_K)[:, None],
        }
    H, R, Hv = attention.qk_nope_head_dim, attention.qk_rope_head_dim, attention.v_head_dim
    q = np.ones((attention.num_heads, H + R))  # mla: q_nope, k_nope by sqrt(γ), q_rope by γ
    q[:, :H], q[:, H:] = np.sqrt(gamma_N)[:, None], gamma_N[:, None]
    kv = np.ones((attention.num_heads, H + Hv))  # values and the shared rope key untouched
    kv[:, :H] = np.sqrt(gamma_N)[:, None]
    return {"q_b_proj" if attention.has_q_lora else "q_proj": q, "kv_b_proj": kv}


@pytest.mark.parametrize("preset", ["tiny", "tiny-mla"])
def test_main_job_clips_the_heads_over_the_threshold(preset, tmp_path):
    probe = muon_clip_config(preset, 1.0)
    params0 = initial_params(probe)
    batch = next(make_datasets(probe.data)[0])
    s0 = max_logits(probe, params0, batch["inputs"])
    modules = list(qk_clip_module_targets(probe.model))
    assert sorted(s0) == sorted(modules)
    every = np.concatenate([s0[m] for m in modules])
    tau = float(np.median(every))  # half of the heads are clipped
    assert np.min(np.abs(every - tau)) > 1e-4 * tau

    config = muon_clip_config(preset, tau)
    captured = {}

    def hook(step, state):
        if step == 1:
            captured["params"] = jax.device_get(state.params)

    result = train.run(config, str(tmp_path), hooks=[hook], log=lambda _: None)
    assert result.status == "completed"
    params1 = captured["params"]

    # Step 1 (learning rate 0) is the clip alone.
    attention = training.attention_modules(config.model)
    rescaled = set()
    for module in modules:
        gamma_N = np.where(s0[module] > tau, tau / s0[module], 1.0)
        for leaf, f in expected_factors(attention[module], gamma_N).items():
            w_old = np.asarray(subtree(params0, module + (leaf, "kernel")))  # [in, heads, dims]
            w_new = np.asarray(subtree(params1, module + (leaf, "kernel")))
            np.testing.assert_allclose(w_new, w_old * f, rtol=1e-6)
            same = np.broadcast_to(f == 1.0, w_old.shape[1:])  # heads under τ, values
            np.testing.assert_array_equal(w_new[:, same], w_old[:, same])
            rescaled.add(module + (leaf, "kernel"))
    for path, w_old in jax.tree_util.tree_flatten_with_path(params0)[0]:
        keys = tuple(k.key for k in path)
        if keys not in rescaled:
            np.testing.assert_array_equal(subtree(params1, keys), w_old)

    # The first layer's logits on that batch scale by exactly γ: the heads (GQA: the group
    # maxima) over τ now peak at τ, the others are unchanged.
    s1 = max_logits(config, params1, batch["inputs"])
    first = modules[0]
    gamma_N = np.where(s0[first] > tau, tau / s0[first], 1.0)
    np.testing.assert_allclose(
        s1[first], s0[first] * head_gamma(attention[first], gamma_N), rtol=1e-5
    )
    np.testing.assert_allclose(np.max(s1[first]), min(np.max(s0[first]), tau), rtol=1e-5)
    assert np.all(np.concatenate([s1[m] for m in modules]) <= tau * 1.05)

    records = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["event"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3]
    np.testing.assert_allclose(records[0]["max_logit"], np.max(every), rtol=1e-5)
    # Step 2 runs the clipped weights on the next batch: near τ, not exactly under it.
    assert records[1]["max_logit"] <= 1.1 * tau

    # experiments.generate restores a MuonClip run (its optimizer state has QK-Clip's too).
    _, params, step = generate.load_params(str(tmp_path), log=lambda _: None)
    assert step == 3
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(result.state.params), strict=True)
    for got, want in leaves:
        np.testing.assert_array_equal(got, want)
