"""DeepSeek-V4 hybrid attention as layer kinds: prefill + decode == forward across block
boundaries, causality, translation invariance, generation, sharding, configs, and the CSA
indexer's training signal (V3.2's indexer KL: gradient isolation, the sown loss in the train step).

(reference == blocked implementations: tests/ops/test_v4_ops.py, and both against transformers
in tests/models/test_v4_reference.py.)"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharding
from jaxmodels import training
from jaxmodels.attention.dsa import dsa_trainable_mask, indexer_loss
from jaxmodels.attention.v4 import V4Attention, V4Config, cache_bytes, layer_pattern_from_ratios
from jaxmodels.config import BlockSettings, ConfigError, ModelConfig, from_dict, to_dict
from jaxmodels.generate import generate
from jaxmodels.model import Decoder, cache_logical_axes, init_caches

BASE = V4Config(
    num_attention_heads=8,
    head_dim=16,
    qk_rope_head_dim=8,
    q_lora_rank=16,
    o_groups=2,
    o_lora_rank=8,
    sliding_window=4,
    index_n_heads=2,
    index_head_dim=8,
    index_topk=2,
    yarn_factor=4.0,
    original_max_position_embeddings=16,
    query_chunk=32,  # >= T: no query chunking here (tests/ops/test_v4_ops.py covers it)
)
CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=3,
    layer_pattern=("v4_window", "v4_csa", "v4_hca"),
    attention={
        "v4_window": dataclasses.replace(BASE, compress_ratio=0),
        "v4_csa": dataclasses.replace(BASE, compress_ratio=4),
        "v4_hca": dataclasses.replace(BASE, compress_ratio=8),
    },
)


def _perturb(params, seed=0, scale=0.3):
    """Random offsets on every leaf, so that zero-initialised sinks and positional biases and
    unit norm gains all matter."""
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        tree, [x + scale * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
    )


@functools.cache
def _params(config: ModelConfig, T: int = 8):
    tokens = jnp.zeros((2, T), jnp.int32)
    variables = nn.meta.unbox(jax.jit(Decoder(config).init)(jax.random.key(1), tokens))
    return _perturb({"params": variables["params"]})  # not the losses sown while initialising


def _tokens(T, seed=0, vocab=64):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (2, T)), jnp.int32)


@functools.cache
def _apply(config):
    return jax.jit(Decoder(config).apply)


def test_prefill_then_decode_equals_full_forward_across_block_boundaries():
    params, tokens = _params(CONFIG), _tokens(21)
    apply = _apply(CONFIG)
    full, _ = apply(params, tokens)
    caches = init_caches(CONFIG, batch_size=2, max_length=24)
    outs, index = [], 0
    # prefill 5, two decode steps, a 5-token chunk starting mid-block (7: CSA block 2 of 4,
    # HCA block 1 of 8), then decode to the end; two chunk shapes, so two compilations
    for chunk in (5, 1, 1, 5) + (1,) * 9:
        positions = jnp.broadcast_to(jnp.arange(index, index + chunk), (2, chunk))
        logits, caches = apply(params, tokens[:, index : index + chunk], positions, caches)
        outs.append(logits)
        index += chunk
    assert index == 21  # crosses the CSA (4) and HCA (8) block ends and the window (4)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=3e-5, rtol=3e-5)
    layer_caches = caches["groups"][0]
    assert int(layer_caches[1].index) == 21
    assert layer_caches[0].compressor is None and layer_caches[2].indexer is None
    assert layer_caches[1].indexer.entries.shape == (2, 24 // 4 + 2, BASE.index_head_dim)


def test_causality_no_gradient_from_later_positions():
    params, tokens = _params(CONFIG), _tokens(20)
    model = Decoder(CONFIG)
    x_BTD = jnp.take(params["params"]["embed"]["embedding"], tokens, axis=0)

    def output_at(x, t):
        def interceptor(next_fun, args, kwargs, context):  # the embedding lookup returns x
            if context.module.name == "embed" and context.method_name == "__call__":
                return x
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            logits, _ = model.apply(params, jnp.zeros(x.shape[:2], jnp.int32))
        return jnp.take(logits, t, axis=1).sum()

    grad_fn = jax.jit(jax.grad(output_at))
    for t in (9, 16):  # mid-block of CSA (block [8, 12)) and at an HCA block start
        grad = grad_fn(x_BTD, t)
        assert np.all(np.asarray(grad[:, t + 1 :]) == 0.0)
        assert np.all(np.abs(np.asarray(grad[:, : t + 1])).sum(-1) > 0)


@pytest.mark.parametrize("label,shift", [("v4_window", 3), ("v4_csa", 8)])
def test_translation_invariance(label, shift):
    """RoPE(q)·RoPE(k) plus the de-rotated output: a layer's output is unchanged when every
    position shifts by a constant (compressed layers: by a multiple of the ratio, which keeps
    the blocks aligned), reference/attention.md §8.3."""
    config = CONFIG.attention[label]
    module = V4Attention(config, BlockSettings(hidden_size=32))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 19, 32)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(19), (2, 19))
    params = _perturb(nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), x, pos)))
    apply = jax.jit(module.apply)
    y0, _ = apply(params, x, pos)
    y1, _ = apply(params, x, pos + shift)
    np.testing.assert_allclose(y1, y0, atol=2e-5)
    # a non-relative rotation would not cancel: rotating q only breaks it
    y2, _ = apply(params, x, pos.at[:, -1].add(1))
    assert not np.allclose(y2[:, -1], y0[:, -1], atol=1e-4)


def test_greedy_generation_agrees_with_the_full_forward():
    params, prompt = _params(CONFIG), _tokens(21)[:, :6]
    out = generate(
        params, prompt, jax.random.key(0), config=CONFIG, max_new_tokens=15, temperature=0.0
    )
    seq = jnp.concatenate([prompt, out], axis=1)  # [2, 21]: the shapes compiled above
    logits, _ = _apply(CONFIG)(params, seq)
    np.testing.assert_array_equal(jnp.argmax(logits[:, 5:-1], axis=-1), out)


def _train(config, mesh_spec, steps=2):
    devices = jax.devices()[:1] if mesh_spec == "data=1" else None
    mesh = sharding.make_mesh(mesh_spec, devices=devices)
    optimizer = optax.adamw(3e-3)
    tokens = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    state, shardings = training.init_train_state(
        config, optimizer, jax.random.key(0), mesh, seq_len=16
    )
    step = training.build_trainer(config, optimizer, mesh, shardings, batch)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_sharded_train_step_equals_single_device():
    config = dataclasses.replace(CONFIG, scan_layers=True, num_layers=2, layer_pattern=("v4_csa",))
    ref_state, ref_losses = _train(config, "data=1")
    state, losses = _train(config, "data=2,fsdp=2,tensor=2")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    attention = state.params["params"]["layers"]["layer_0"]["attention"]
    assert attention["q_b_proj"]["kernel"].sharding.spec == jax.P(None, None, "tensor", None)
    # the zero-initialised sinks and positional biases receive gradients and move ...
    assert np.all(np.asarray(attention["sinks"]) != 0)
    assert np.any(np.asarray(attention["compressor"]["position_bias"]) != 0)
    # ... and so does the indexer, through its sown KL alone (top-k is discrete: the LM loss
    # gives it no gradient, test_indexer_gradient_isolation)
    assert np.any(np.asarray(attention["indexer"]["position_bias"]) != 0)


# --------------------------------------------------------------------------------------------
# CSA indexer training: V3.2's indexer KL (reference/attention.md §2.1–2.2, §8.2)

CSA = CONFIG.attention["v4_csa"]  # ratio 4, top-2: from t = 11 on a query selects
SETTINGS = BlockSettings(hidden_size=32)
FAST = {"xla_backend_optimization_level": 0}  # compile time dominates these tiny shapes


def _csa_inputs(T=16):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, T, 32)), jnp.float32)
    return x, jnp.broadcast_to(jnp.arange(T), (2, T))


@functools.cache
def _csa_params():
    variables = jax.jit(V4Attention(CSA, SETTINGS).init)(jax.random.key(0), *_csa_inputs())
    return _perturb(nn.meta.unbox(variables)["params"])


@functools.cache
def _indexer_grads(stage):
    """Gradients of an LM-like loss and of the sown indexer KL w.r.t. params and x."""
    module = V4Attention(dataclasses.replace(CSA, indexer_stage=stage), SETTINGS)
    x, pos = _csa_inputs()
    probe = jnp.asarray(np.random.default_rng(7).standard_normal(x.shape), jnp.float32)

    def losses(params, x):
        (y, _), cols = module.apply({"params": params}, x, pos, mutable=["losses"])
        return jnp.sum(y * probe), indexer_loss(cols["losses"])

    def run(params, x):  # one forward pass, pulled back once per loss
        (lm, kl), pullback = jax.vjp(losses, params, x)
        one, zero = jnp.ones_like(lm), jnp.zeros_like(lm)
        return pullback((one, zero)), pullback((zero, one)), kl

    return jax.jit(run, compiler_options=FAST)(_csa_params(), x)


@pytest.mark.parametrize("stage", ["sparse", "dense_warmup"])
def test_indexer_gradient_isolation(stage):
    """∂L_LM/∂indexer = 0 and ∂L_I/∂(every other parameter, x) = 0 exactly; each loss reaches
    every parameter of its own side (detached indexer inputs, stopped target, discrete top-k)."""
    (lm_p, lm_x), (kl_p, kl_x), kl = _indexer_grads(stage)
    main = lambda g: jax.tree.leaves({k: v for k, v in g.items() if k != "indexer"})  # noqa: E731
    assert float(kl) > 1e-3
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(lm_p["indexer"]))
    assert all(np.all(np.asarray(g) == 0) for g in main(kl_p))
    np.testing.assert_array_equal(kl_x, 0.0)
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(kl_p["indexer"]))
    assert sum(float(jnp.sum(jnp.abs(g))) for g in main(lm_p)) > 0
    assert np.any(np.asarray(lm_x) != 0)
    # DSA's stage mask (`dsa_freeze(opt, "dense_warmup")`) selects exactly V4's indexer
    mask = dsa_trainable_mask(_csa_params(), "dense_warmup")
    assert all(jax.tree.leaves(mask["indexer"])) and not any(main(mask))


def test_indexer_loss_is_sown_only_by_the_full_forward():
    """Weighted float32 scalar in ("losses", "indexer_kl"); nothing for decode or "off"."""
    params, (x, pos) = {"params": _csa_params()}, _csa_inputs()
    for stage, weight in [("sparse", 2.0), ("off", 1.0)]:
        config = dataclasses.replace(CSA, indexer_stage=stage, index_loss_weight=weight)
        module = V4Attention(config, SETTINGS)
        apply = jax.jit(functools.partial(module.apply, mutable=["losses"]), compiler_options=FAST)
        _, cols = apply(params, x, pos)
        if stage == "off":
            assert not jax.tree.leaves(cols)
            continue
        (value,) = cols["losses"]["indexer_kl"]
        assert value.shape == () and value.dtype == jnp.float32
        np.testing.assert_allclose(value, weight * _indexer_grads("sparse")[2], rtol=1e-5)
        cache = V4Attention.init_cache(config, SETTINGS, 2, 16, jnp.float32)
        _, cols = apply(params, x, pos, cache)  # a 16-token prefill into the cache
        assert not jax.tree.leaves(cols)


def test_train_step_loss_is_lm_plus_the_sown_indexer_kl():
    """One SGD(1) step of `make_train_step` on a window/CSA/HCA decoder moves every parameter
    by -∇(LM cross-entropy + indexer KL); only the CSA layer sows."""
    params, tokens = _params(CONFIG), _tokens(17)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    optimizer = optax.sgd(1.0)
    state = training.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
    )
    train_step = jax.jit(training.make_train_step(CONFIG, optimizer), compiler_options=FAST)
    new_state, metrics = train_step(state, batch)

    def total(p):
        (logits, _), cols = Decoder(CONFIG).apply(p, batch["inputs"], mutable=["losses"])
        loss_sum, count = training.cross_entropy(logits, batch["targets"])
        kl = indexer_loss(cols["losses"])
        return loss_sum / count + kl, (loss_sum / count, kl, cols["losses"])

    grad_fn = jax.jit(jax.value_and_grad(total, has_aux=True), compiler_options=FAST)
    (_, (lm, kl, sown)), grads = grad_fn(params)
    assert list(sown["group_0"]) == ["layer_1"]  # the CSA layer of (window, CSA, HCA)
    assert float(kl) > 1e-3
    np.testing.assert_allclose(metrics["loss"], lm, rtol=1e-5)
    np.testing.assert_allclose(metrics["aux_loss"], kl, rtol=1e-5)
    for new, old, g in zip(*map(jax.tree.leaves, (new_state.params, params, grads)), strict=True):
        np.testing.assert_allclose(new, old - g, atol=1e-6)


@pytest.mark.slow
def test_training_the_tiny_preset_lowers_the_indexer_kl():
    """The first two layers of deepseek-v4-tiny (sliding window, CSA; sparse stage) for 30
    Adam steps on a fixed batch: the CSA layer's indexer KL falls well below its value at
    initialisation (measured 0.107 -> 0.061; with all four layers 0.201 -> 0.111, first rising
    for a few steps while the main model moves fastest)."""
    from experiments.presets import get_preset

    config = get_preset("deepseek-v4-tiny").model
    assert config.layer_pattern[:2] == ("v4_window", "v4_csa")
    config = dataclasses.replace(config, num_layers=2, layer_pattern=config.layer_pattern[:2])
    mesh = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    optimizer = optax.adam(3e-3)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (4, 129)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    state, shardings = training.init_train_state(
        config, optimizer, jax.random.key(0), mesh, seq_len=128
    )
    step = training.build_trainer(config, optimizer, mesh, shardings, batch)
    kls = []
    for _ in range(30):
        state, metrics = step(state, batch)
        kls.append(float(metrics["aux_loss"]))
    assert kls[-1] < 0.7 * kls[0], kls


def test_cache_layout_axes_and_bytes():
    caches = init_caches(CONFIG, batch_size=2, max_length=32)
    axes = cache_logical_axes(CONFIG)
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)  # noqa: E731
    assert jax.tree.structure(caches) == jax.tree.structure(
        jax.tree.map(lambda a: 0, axes, is_leaf=is_axes)
    )
    for leaf, names in zip(
        jax.tree.leaves(caches), jax.tree.leaves(axes, is_leaf=is_axes), strict=True
    ):
        assert leaf.ndim == len(names)
    # window ring W*H + per-compressor entries (T/r + 2)*H + raw-projection rings
    H, W = BASE.head_dim, BASE.sliding_window
    f4 = 4
    assert cache_bytes(CONFIG.attention["v4_window"], 1, 32, jnp.float32) == W * H * f4 + 4
    hca = W * H + (32 // 8 + 2) * H + 8 * H + 8 * H  # gate ring stays float32
    assert cache_bytes(CONFIG.attention["v4_hca"], 1, 32, jnp.float32) == hca * f4 + 4


def test_v4_flash_compress_ratios_as_a_layer_pattern():
    ratios = [0, 0] + [4, 128] * 20 + [4]  # V4-Flash config.json `compress_ratios`, 43 layers
    pattern, attention = layer_pattern_from_ratios(ratios, BASE)
    assert len(pattern) == 43
    assert [pattern.count(k) for k in ("v4_window", "v4_csa", "v4_hca")] == [2, 21, 20]
    assert attention["v4_csa"].is_csa and not attention["v4_hca"].is_csa
    assert attention["v4_window"].rope.theta == BASE.rope_theta
    assert attention["v4_hca"].rope.theta == BASE.compress_rope_theta
    config = ModelConfig(num_layers=43, layer_pattern=pattern, attention=attention)
    assert from_dict(ModelConfig, to_dict(config)) == config


def test_config_validation_messages():
    with pytest.raises(
        ConfigError, match="num_attention_heads=6 is not divisible by v4.o_groups=4"
    ):
        V4Config(num_attention_heads=6, o_groups=4)
    with pytest.raises(ConfigError, match="compress_ratio=1 must be 0/None"):
        V4Config(compress_ratio=1)
    with pytest.raises(ConfigError, match="v4.csa=True needs a compress_ratio"):
        V4Config(csa=True)
    with pytest.raises(ConfigError, match="qk_rope_head_dim=7 must be even"):
        V4Config(qk_rope_head_dim=7)
    with pytest.raises(ConfigError, match="must be <= v4.index_head_dim=8"):
        V4Config(compress_ratio=4, qk_rope_head_dim=16, index_head_dim=8)
    with pytest.raises(ConfigError, match="implementation='flash'"):
        V4Config(implementation="flash")
    with pytest.raises(ConfigError, match=r"v4.indexer_stage='warmup' is not one of \['dense_"):
        V4Config(indexer_stage="warmup")
    with pytest.raises(ConfigError, match="v4.index_loss_weight=-1.0 must be a number >= 0"):
        V4Config(index_loss_weight=-1.0)
    assert V4Config(compress_ratio=4).is_csa and not V4Config(compress_ratio=4, csa=False).is_csa
    assert not V4Config(compress_ratio=None).is_csa and V4Config(compress_ratio=None).ratio == 0
