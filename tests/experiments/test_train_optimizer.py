"""The main job's optimizer (experiments/optimizer.py): schedules, the optax chain, Muon."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import cli
from experiments.config import OptimizerConfig, RunConfig
from experiments.optimizer import (
    build_optimizer,
    decay_mask,
    learning_rate_schedule,
    qk_clip_module_targets,
)
from jaxmodels import training
from jaxmodels.attention.gqa import GQAConfig
from jaxmodels.attention.mla import MLAConfig
from jaxmodels.attention.v4 import V4Config
from jaxmodels.config import ConfigError, ModelConfig
from jaxmodels.model import Decoder


def lrs(config, total, steps):
    schedule = learning_rate_schedule(config, total)
    return np.array([float(schedule(s)) for s in steps])


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    config = OptimizerConfig(learning_rate=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    got = lrs(config, 100, [0, 5, 10, 55, 100, 150])
    np.testing.assert_allclose(got, [0.0, 5e-3, 1e-2, 5.5e-3, 1e-3, 1e-3], rtol=1e-5)


@pytest.mark.parametrize("shape, mid", [("linear", 5.5e-3), ("cosine", 5.5e-3)])
def test_wsd_schedule_is_warmup_stable_decay(shape, mid):
    config = OptimizerConfig(
        learning_rate=1e-2,
        warmup_steps=10,
        schedule="wsd",
        decay_fraction=0.2,
        decay_shape=shape,
        min_lr_ratio=0.1,
    )
    # 100 steps: warmup 0..10, stable 10..80, decay 80..100 to 1e-3.
    got = lrs(config, 100, [5, 10, 50, 80, 90, 100])
    np.testing.assert_allclose(got, [5e-3, 1e-2, 1e-2, 1e-2, mid, 1e-3], rtol=1e-5)
    quarter = lrs(config, 100, [85])[0]
    expected = 1e-3 + 9e-3 * (0.75 if shape == "linear" else 0.5 * (1 + np.cos(np.pi / 4)))
    np.testing.assert_allclose(quarter, expected, rtol=1e-5)


def test_constant_schedule():
    config = OptimizerConfig(learning_rate=2e-3, warmup_steps=4, schedule="constant")
    np.testing.assert_allclose(lrs(config, 50, [0, 2, 4, 49]), [0, 1e-3, 2e-3, 2e-3], rtol=1e-6)


def toy_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "params": {
            "layer": {"kernel": jax.random.normal(k1, (16, 32))},
            "norm": {"scale": jnp.ones((16,))},
            "embed": {"embedding": jax.random.normal(k2, (24, 16))},
        }
    }


def test_adamw_chain_matches_a_hand_built_optax_chain():
    config = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, grad_clip=0.5, weight_decay=0.1)
    params = toy_params()
    grads = jax.tree.map(lambda p: 3.0 * jnp.sin(p) + 0.1, params)
    manual = optax.chain(
        optax.clip_by_global_norm(0.5),
        optax.adamw(
            learning_rate_schedule(config, 20),
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
        ),
    )
    ours = build_optimizer(config, 20)
    s1, s2 = ours.init(params), manual.init(params)
    ours_update, manual_update = jax.jit(ours.update), jax.jit(manual.update)
    for _ in range(3):
        u1, s1 = ours_update(grads, s1, params)
        u2, s2 = manual_update(grads, s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_array_equal(a, b)


def test_weight_decay_skips_vectors_and_clipping_bounds_the_step():
    params = toy_params()
    mask = decay_mask(params)["params"]
    assert not mask["norm"]["scale"] and mask["layer"]["kernel"] and mask["embed"]["embedding"]
    config = OptimizerConfig(learning_rate=1.0, warmup_steps=0, weight_decay=0.5, grad_clip=1.0)
    tx = build_optimizer(config, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # Zero gradients: vectors do not move, matrices shrink by lr * weight_decay.
    np.testing.assert_array_equal(updates["params"]["norm"]["scale"], 0.0)
    np.testing.assert_allclose(
        updates["params"]["layer"]["kernel"], -0.5 * params["params"]["layer"]["kernel"], rtol=1e-6
    )
    # Huge gradients are clipped to global norm 1 before Adam (first Adam step is +-lr anyway,
    # so check the clipped gradient through the chain's first stage).
    huge = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
    clipped, _ = optax.clip_by_global_norm(1.0).update(huge, optax.EmptyState())
    np.testing.assert_allclose(optax.tree.norm(clipped), 1.0, rtol=1e-5)


def test_muon_is_wired_with_rms_matching():
    config = OptimizerConfig(name="muon", learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)
    params = toy_params()
    tx = build_optimizer(config, 10)
    grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    kernel = updates["params"]["layer"]["kernel"]
    # Moonlight RMS matching: the orthogonalised update has RMS 0.2 x lr (Newton-Schulz is
    # approximate, so within 25%).
    rms = float(jnp.sqrt(jnp.mean(kernel**2)))
    assert 0.75 * 0.2 * 1e-2 < rms < 1.25 * 0.2 * 1e-2
    # The embedding goes to AdamW: its first update is lr * sign(g) elementwise.
    embedding = updates["params"]["embed"]["embedding"]
    np.testing.assert_allclose(jnp.abs(embedding), 1e-2, rtol=1e-3)


def test_muon_state_shardings_follow_fsdp_parameters():
    """Muon + AdamW (optax.partition) hold MaskedNode placeholders; the train state's
    shardings must keep them and shard the momentum like its parameter."""
    from experiments import presets
    from jaxmodels import training
    from sharding import make_mesh

    config = presets.get_preset("tiny")
    tx = build_optimizer(OptimizerConfig(name="muon", warmup_steps=0), 10)
    mesh = make_mesh("fsdp=-1")
    abstract, shardings = training.abstract_train_state(config.model, tx, mesh, seq_len=8)
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    masked = [x for x in jax.tree.leaves(abstract.opt_state, is_leaf=is_masked) if is_masked(x)]
    assert masked  # the routing placeholders survived
    specs = {
        jax.tree_util.keystr(path): leaf.sharding.spec
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract.opt_state)[0]
        if "q_proj" in jax.tree_util.keystr(path)
    }
    assert specs and all(spec[0] == "fsdp" for spec in specs.values()), specs


# -- QK-Clip (MuonClip) in the main job ---------------------------------------------------------


def attention_entries():
    return {
        "gqa": GQAConfig(num_heads=4, num_kv_heads=2, head_dim=8),
        "local": GQAConfig(num_heads=4, num_kv_heads=4, head_dim=8, sliding_window=4),
        "mla": MLAConfig(
            num_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4
        ),
        "v4": V4Config(num_attention_heads=4, head_dim=16, q_lora_rank=16, o_lora_rank=16),
    }


@pytest.mark.parametrize(
    "pattern, num_layers, scan_layers",
    [
        (("gqa",), 2, False),
        (("gqa",), 2, True),
        (("mla", "local"), 3, False),  # group_0 (mla, local) and a tail (mla)
        (("mla", "v4"), 4, True),  # v4 sows no max logits and is not clipped
    ],
)
def test_qk_clip_targets_are_keyed_like_the_sown_max_logits(pattern, num_layers, scan_layers):
    attention = {label: attention_entries()[label] for label in pattern}
    model = ModelConfig(
        hidden_size=32,
        intermediate_size=64,
        num_layers=num_layers,
        layer_pattern=pattern,
        attention=attention,
        scan_layers=scan_layers,
    )
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    init = Decoder(model).init  # init sows too: the keys the train step passes to QK-Clip
    variables = nn.meta.unbox(jax.eval_shape(init, jax.random.key(0), tokens))
    sown = jax.eval_shape(training.max_logits_by_module, variables["attn_stats"])
    targets = qk_clip_module_targets(model)
    assert set(targets) == set(sown)
    clipped_layers = sum(
        attention[model.layer_pattern[i % len(pattern)]].kind != "v4" for i in range(num_layers)
    )
    assert sum(np.prod(v.shape) // 4 for v in sown.values()) == clipped_layers
    for module, module_targets in targets.items():  # every target names a kernel of that layer
        layer = variables
        for key in module:
            layer = layer[key]
        for target in module_targets:
            kernel = layer[target.leaf[0]][target.leaf[1]]
            assert kernel.shape[target.head_axis + scan_layers] in (4, 2)  # N or K heads


def test_qk_clip_config_errors_name_the_field_the_value_and_the_rule():
    for bad in (0, -1.0, float("nan"), float("inf"), True, "100"):
        with pytest.raises(ConfigError, match=r"optimizer.qk_clip_threshold=.* positive finite"):
            OptimizerConfig(qk_clip_threshold=bad)
    v4_only = ModelConfig(
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        layer_pattern=("v4",),
        attention={"v4": attention_entries()["v4"]},
    )
    with pytest.raises(ConfigError, match=r"qk_clip_threshold=100.*uses 'v4' \(kind v4\).*none"):
        RunConfig(model=v4_only, optimizer=OptimizerConfig(qk_clip_threshold=100.0))
    with pytest.raises(cli.CLIError, match=r"--optimizer.qk_clip_threshold=-3.*positive finite"):
        cli.parse_args(["--preset=tiny", "--optimizer.qk_clip_threshold=-3"])
    args = cli.parse_args(
        ["--preset=tiny", "--optimizer.name=muon", "--optimizer.qk_clip_threshold=50"]
    )
    assert args.config.optimizer.qk_clip_threshold == 50.0
    no_model = build_optimizer(args.config.optimizer, 10)  # restore targets need only the state
    params = {"params": {"w": jnp.ones((4, 4))}}
    state = no_model.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(
        build_optimizer(args.config.optimizer, 10, args.config.model).init(params)
    )
    with pytest.raises(ValueError, match="model=config.model"):
        no_model.update(params, state, params, max_logits={})


def test_muon_clip_chain_is_muon_then_qk_clip():
    """Same update as optimizers.muon for weights under τ; τ/S-scaled heads otherwise."""
    from experiments import presets

    config = presets.get_preset("tiny")
    opt = dataclasses.replace(config.optimizer, name="muon", warmup_steps=0, qk_clip_threshold=10.0)
    tx = build_optimizer(opt, 10, config.model)
    plain = build_optimizer(dataclasses.replace(opt, qk_clip_threshold=None), 10)
    tokens = jnp.zeros((1, 8), jnp.int32)
    variables = nn.meta.unbox(jax.jit(Decoder(config.model).init)(jax.random.key(0), tokens))
    params = jax.tree.map(np.asarray, {"params": variables["params"]})
    grads = jax.tree.map(lambda p: np.cos(3.0 * p), params)
    modules = list(qk_clip_module_targets(config.model))
    s = {m: np.array([40.0, 1.0, 1.0, 1.0], np.float32) for m in modules}  # head 0 of group 0
    updates, state = tx.update(grads, tx.init(params), params, max_logits=s)
    reference, _ = plain.update(grads, plain.init(params), params)
    assert int(state[-1].clipped) == len(modules)
    new, ref = optax.apply_updates(params, updates), optax.apply_updates(params, reference)
    for path, leaf in jax.tree_util.tree_flatten_with_path(ref)[0]:
        keys = tuple(k.key for k in path)
        got = new
        for key in keys:
            got = got[key]
        if keys[-2] in ("q_proj", "k_proj"):  # group 0 (query heads 0, 1; kv head 0) by 1/2
            heads = 2 if keys[-2] == "q_proj" else 1
            np.testing.assert_allclose(got[:, :heads], 0.5 * leaf[:, :heads], rtol=1e-5)
            np.testing.assert_array_equal(got[:, heads:], leaf[:, heads:])
        else:
            np.testing.assert_array_equal(got, leaf)
