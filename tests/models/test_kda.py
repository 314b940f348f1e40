"""KDA and Gated DeltaNet layers: forms, caches, causality, sharding, gates, import (§8.6)."""

import dataclasses
import functools
import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharding
from jaxmodels import training
from jaxmodels.attention.kda import (
    REFERENCE_CONFIGS,
    DeltaAttention,
    DeltaCache,
    GDNConfig,
    KDAConfig,
    a_log_init,
    dt_bias_init,
    forget_gate,
    short_conv,
)
from jaxmodels.attention.mla import MLAConfig, MLALatentCache
from jaxmodels.config import BlockSettings, ConfigError, ModelConfig, RopeConfig
from jaxmodels.generate import generate
from jaxmodels.model import Decoder, cache_logical_axes, init_caches
from jaxmodels.weights.hf_kimi_linear import (
    kda_config_from_hf,
    kda_params_from_hf,
    kda_params_to_hf,
    load_kda_layers,
)

# H != J and chunk 4 < T = 9 (two full chunks and a padded one) exercise every reshape.
KDA = KDAConfig(num_heads=2, head_dim=8, v_head_dim=6, chunk_size=4)
GDN = GDNConfig(num_heads=2, head_dim=8, v_head_dim=6, chunk_size=4)
SETTINGS = BlockSettings(hidden_size=32, init_std=0.2)
B, T = 2, 9


def _normal(shape, seed=0, scale=1.0):
    """Test data from numpy (jax.random would compile a kernel per shape)."""
    return jnp.asarray(np.random.default_rng(seed).normal(0.0, scale, shape), jnp.float32)


def _inputs(T=T, seed=0):
    x = _normal((B, T, SETTINGS.hidden_size), seed)
    return x, jnp.broadcast_to(jnp.arange(T), (B, T))


def _tokens(shape, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _fill(shapes, seed=0, std=0.2):
    """Random values for a tree of parameter shapes, without compiling an initialiser (on this
    CPU backend, initialisers of 3-D kernels take seconds to compile): kernels N(0, std),
    norm gains near 1, realistic gate parameters (rates 1..16, softplus(dt_bias) ~ 0.05)."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        if name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(x.shape)
        elif name == "A_log":
            value = np.log(rng.uniform(1.0, 16.0, x.shape))
        elif name == "dt_bias":
            value = rng.normal(-3.0, 1.0, x.shape)
        else:
            value = std * rng.standard_normal(x.shape)
        return jnp.asarray(value, x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.cache
def _params(config):
    x, pos = _inputs()
    shapes = jax.eval_shape(DeltaAttention(config, SETTINGS).init, jax.random.key(1), x, pos)
    return _fill(nn.meta.unbox(shapes)["params"])


@functools.cache
def _apply(config, settings=SETTINGS):
    """Jitted `(params, x, positions, cache) -> (y, cache)`, one per config."""
    module = DeltaAttention(config, settings)
    return jax.jit(lambda params, x, pos, cache: module.apply({"params": params}, x, pos, cache))


@functools.cache
def _decoder(config):
    """(parameters, jitted apply) of `Decoder(config)`, shared across tests."""
    model = Decoder(config)
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(1), tokens))
    return _fill(shapes, std=0.1), jax.jit(model.apply)


# --------------------------------------------------------------------------------------------
# Forms, caches, causality


@pytest.mark.parametrize("config", [KDA, GDN], ids=["kda", "gdn"])
def test_chunked_layer_equals_recurrent_layer(config):
    params = _params(config)
    x, pos = _inputs()
    y, cache = _apply(config)(params, x, pos, None)
    assert cache is None
    recurrent = dataclasses.replace(config, implementation="recurrent")
    y_rec, _ = _apply(recurrent)(params, x, pos, None)
    assert float(jnp.std(y)) > 0.05  # a non-trivial output
    np.testing.assert_allclose(y, y_rec, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("config", [KDA, GDN], ids=["kda", "gdn"])
def test_prefill_then_decode_equals_full_forward(config):
    """Chunked prefill (3 + 2 tokens: the second chunk continues the state and the conv window
    of the first), then token-by-token decode == one full forward; the cache holds the state
    and the last W - 1 pre-conv projections."""
    params = _params(config)
    x, pos = _inputs()
    full, _ = _apply(config)(params, x, pos, None)
    cache = DeltaAttention.init_cache(config, SETTINGS, B, 16, jnp.float32)
    outs = []
    for start, stop in [(0, 3), (3, 5)] + [(t, t + 1) for t in range(5, T)]:
        y, cache = _apply(config)(params, x[:, start:stop], pos[:, start:stop], cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-6, rtol=1e-5)
    assert isinstance(cache, DeltaCache) and int(cache.index) == T
    assert cache.state.dtype == jnp.float32 and float(jnp.abs(cache.state).max()) > 0.01
    k_proj = jnp.einsum("BTD,DNH->BTNH", x, params["k_proj"]["kernel"])
    np.testing.assert_allclose(cache.k_conv, k_proj[:, T - 3 :], atol=1e-6)
    v_proj = jnp.einsum("BTD,DNH->BTNH", x, params["v_proj"]["kernel"])
    np.testing.assert_allclose(cache.v_conv, v_proj[:, T - 3 :], atol=1e-6)


def test_cache_has_constant_size_whatever_the_length():
    """The cache is the fp32 state [B, N, H, J] plus 3 conv inputs per channel of q, k, v: the
    same for a 16-token and a 1M-token context (an MLA cache grows with it)."""
    for config in (KDA, GDN):
        shapes = [
            jax.eval_shape(
                lambda n=n, c=config: DeltaAttention.init_cache(c, SETTINGS, B, n, jnp.bfloat16)
            )
            for n in (16, 1 << 20)
        ]
        assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes[0]) == jax.tree.map(
            lambda s: (s.shape, s.dtype), shapes[1]
        )
        arrays = [a for a in jax.tree.leaves(shapes[0]) if a.ndim > 0]
        nbytes = sum(a.size * a.dtype.itemsize for a in arrays)
        assert nbytes == B * (2 * 8 * 6 * 4 + 3 * 2 * (8 + 8 + 6) * 2)  # fp32 state + bf16 windows
    # Kimi-Linear-48B: 32 heads of 128 -> a 2 MiB fp32 state per layer and sequence (§8.6).
    kimi = REFERENCE_CONFIGS["kimi-linear"]
    state = jax.eval_shape(lambda: DeltaAttention.init_cache(kimi, SETTINGS, 1, 1, jnp.bfloat16))
    assert state.state.size == 524_288 and state.state.dtype == jnp.float32


def test_causality_gradient_from_later_input_is_zero():
    """(KDA; GDN differs only in a per-token gate projection.)"""
    config = KDA
    params = _params(config)
    x, pos = _inputs()
    module = DeltaAttention(config, SETTINGS)
    t = 4
    grad = jax.jit(jax.grad(lambda x: module.apply({"params": params}, x, pos)[0][:, t].sum()))(x)
    assert jnp.all(grad[:, t + 1 :] == 0.0)
    assert jnp.all(jnp.any(grad[:, : t + 1] != 0.0, axis=-1))
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_bf16_activations_keep_an_fp32_state():
    settings = dataclasses.replace(SETTINGS, dtype=jnp.bfloat16)
    params = _params(KDA)
    x, pos = _inputs()
    y32, _ = _apply(KDA)(params, x, pos, None)
    cache = DeltaAttention.init_cache(KDA, settings, B, 16, jnp.bfloat16)
    y16, cache = _apply(KDA, settings)(params, x, pos, cache)
    assert y16.dtype == jnp.bfloat16 and cache.state.dtype == jnp.float32
    assert cache.q_conv.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(y32)))
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=3e-2 * scale)


# --------------------------------------------------------------------------------------------
# Pieces: short conv, gates, initialisation (reference §5.3, §8.6)


def test_short_conv_is_a_causal_depthwise_convolution_with_a_carried_window():
    """Against numpy's full convolution, per channel: y_t = sum_i w[i] x[t - 3 + i]; splitting
    the sequence and carrying the window gives the same outputs."""
    x = np.asarray(_normal((B, 7, 2, 3), 1))
    w = np.asarray(_normal((4, 2, 3), 2))
    expected = np.zeros_like(x)
    for b in range(B):
        for n in range(2):
            for h in range(3):
                expected[b, :, n, h] = np.convolve(x[b, :, n, h], w[::-1, n, h])[:7]
    zeros = jnp.zeros((B, 3, 2, 3))
    y, window = short_conv(x, w, zeros)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    np.testing.assert_array_equal(window, x[:, 4:])
    y1, w1 = short_conv(x[:, :2], w, zeros)  # shorter than the window
    y2, _ = short_conv(x[:, 2:], w, w1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), expected, atol=1e-5)


def test_short_conv_gradients_equal_those_of_a_grouped_lax_convolution():
    """Gradients of `short_conv` (with respect to the inputs, the kernel and the carried window;
    its backward pass materialises the gradients of its output and input once) == autodiff of
    the same causal depthwise convolution written as `lax.conv_general_dilated` with one group
    per channel."""
    x = _normal((B, 9, 2, 3), 4)
    w = _normal((4, 2, 3), 5)
    window = _normal((B, 3, 2, 3), 6)
    cotangent = _normal((B, 9, 2, 3), 7)

    def ours(x, w, window):
        y, _ = short_conv(x, w, window)
        return jnp.sum(jax.nn.silu(y) * cotangent)

    def grouped(x, w, window):
        padded = jnp.concatenate([window, x], axis=1).reshape(B, 12, 6)
        y = jax.lax.conv_general_dilated(
            padded,
            w.reshape(4, 1, 6),
            (1,),
            "VALID",
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=6,
        )
        return jnp.sum(jax.nn.silu(y.reshape(B, 9, 2, 3)) * cotangent)

    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, w, window)
    want = jax.grad(grouped, argnums=(0, 1, 2))(x, w, window)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_forget_gate_formula_and_range():
    """g = -exp(A_log) softplus(f + dt_bias) <= 0, so alpha = exp(g) is in (0, 1] (§8.6)."""
    f = np.asarray(_normal((B, 3, 2, 4), 3, scale=10.0))
    a_log = np.array([0.5, 2.0], np.float32)
    dt_bias = np.asarray(_normal((2, 4), 4))
    g = forget_gate(f, a_log, dt_bias)
    expected = -np.exp(a_log)[:, None] * np.logaddexp(0.0, f + dt_bias)
    np.testing.assert_allclose(g, expected, rtol=1e-5)
    assert g.dtype == jnp.float32 and float(g.max()) <= 0.0
    scalar = forget_gate(f[..., 0], a_log, dt_bias[:, 0])  # GDN: [B, T, N]
    np.testing.assert_allclose(scalar, expected[..., 0], rtol=1e-5)


def test_gate_initialisations_follow_fla():
    """A_log = log U(1, 16) (KDA) / log U(0, 16) (GDN); softplus(dt_bias) = dt in [1e-3, 1e-1],
    log-uniform (FLA `fla/layers/kda.py`, `gated_deltanet.py`); conv kernels U(-1/2, 1/2) for
    W = 4 (torch `Conv1d`). One module initialisation (KDA, 512 heads); GDN's initialisers are
    the same functions with its own range."""
    x = jnp.zeros((1, 1, 8))
    settings = BlockSettings(hidden_size=8)
    init = jax.jit(DeltaAttention(KDAConfig(num_heads=512, head_dim=8), settings).init)
    params = nn.meta.unbox(init(jax.random.key(0), x, jnp.zeros((1, 1), jnp.int32)))["params"]
    gdn_a_log = a_log_init(*GDNConfig.a_log_init_range)(jax.random.key(1), (512,))
    gdn_dt_bias = dt_bias_init(jax.random.key(2), (512,))
    for a_log, dt_bias, low in [
        (params["A_log"], params["dt_bias"], 1.0),
        (gdn_a_log, gdn_dt_bias, 0.0),
    ]:
        rate = np.exp(np.asarray(a_log))
        assert a_log.dtype == dt_bias.dtype == jnp.float32
        assert low <= rate.min() < low + 0.5 and 15.5 < rate.max() <= 16.0
        dt = np.logaddexp(0.0, np.asarray(dt_bias, np.float64))
        assert 1e-3 * 0.999 <= dt.min() < 1.5e-3 and 0.09 < dt.max() <= 0.1001
        assert 0.7e-2 < np.median(dt) < 1.4e-2  # log-uniform: median near the geometric mean
    assert params["A_log"].shape == (512,) and params["dt_bias"].shape == (512 * 8,)
    conv = np.abs(np.asarray(params["q_conv1d"]["kernel"]))
    assert 0.45 < conv.max() <= 0.5 and 0.2 < conv.mean() < 0.3
    # The two kinds' forget-gate parameters (shapes only: no initialiser compiled).
    assert "f_a_proj" in _params(KDA) and "a_proj" in _params(GDN)
    assert "a_proj" not in _params(KDA) and "f_b_proj" not in _params(GDN)
    assert _params(GDN)["dt_bias"].shape == (2,) and _params(KDA)["dt_bias"].shape == (16,)


def test_muon_orthogonalises_the_projections_and_adamw_takes_gates_norms_and_convs():
    from optimizers.labels import muon_labels

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the depthwise convs are routed by name, not guessed
        labels = muon_labels({"params": _params(KDA)})["params"]
    adam = {"A_log", "dt_bias", "o_norm", "q_conv1d", "k_conv1d", "v_conv1d"}
    for name, label in labels.items():
        leaf = label if isinstance(label, str) else next(iter(label.values()))
        assert leaf == ("adam" if name in adam else "muon"), name


# --------------------------------------------------------------------------------------------
# Decoders: the Kimi Linear hybrid


MLA_NOPE = MLAConfig(
    num_heads=2,
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    use_nope=True,
    rope=RopeConfig(layout="half"),
)
HYBRID = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=5,  # one 3:1 group, then a tail KDA layer
    layer_pattern=("kda", "kda", "kda", "mla"),
    init_std=0.1,
    attention={"kda": KDA, "mla": MLA_NOPE},
)


def test_hybrid_decoder_prefill_then_decode_equals_full_forward():
    config = HYBRID
    tokens = _tokens((B, T), config.vocab_size)
    params, apply = _decoder(config)
    full, _ = apply(params, tokens)
    caches = init_caches(config, batch_size=B, max_length=12)
    prefill = 5
    positions = jnp.broadcast_to(jnp.arange(prefill), (B, prefill))
    logits, caches = apply(params, tokens[:, :prefill], positions, caches)
    outs = [logits]
    for t in range(prefill, T):
        logits, caches = apply(params, tokens[:, t : t + 1], jnp.full((B, 1), t), caches)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=2e-5)
    group = caches["groups"][0]
    assert [type(c) for c in group] == [DeltaCache] * 3 + [MLALatentCache]
    assert isinstance(caches["tail"][0], DeltaCache) and int(caches["tail"][0].index) == T


def test_hybrid_greedy_generation_matches_the_full_forward():
    """`generate` (prefill, then a scan of one-token decode steps through KDA and MLA caches)
    picks at every step the argmax of a full forward over the sequence so far."""
    config = HYBRID
    prompt = _tokens((B, 4), config.vocab_size, seed=3)
    params, apply = _decoder(config)
    new = generate(
        params, prompt, jax.random.key(0), config=config, max_new_tokens=5, temperature=0.0
    )
    sequence = jnp.concatenate([prompt, new], axis=1)  # 9 tokens: the shape compiled above
    logits, _ = apply(params, sequence)
    np.testing.assert_array_equal(jnp.argmax(logits[:, 3:-1], axis=-1), new)


def test_kimi_linear_preset_is_three_kda_to_one_nope_mla():
    from experiments.presets import get_preset

    model = get_preset("kimi-linear").model
    kinds = [a.kind for a in model.layer_attention]
    assert kinds == ["kda", "kda", "kda", "mla"]
    assert model.attention["mla"].use_nope and not model.attention["mla"].has_q_lora
    # Only the MLA layer's cache grows with the context.
    sizes = {}
    for length in (128, 4096):
        caches = jax.eval_shape(lambda n=length: init_caches(model, 1, n))
        sizes[length] = [
            sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(c) if a.ndim)
            for c in caches["groups"][0]
        ]
    assert sizes[128][:3] == sizes[4096][:3]
    assert sizes[4096][3] == 32 * sizes[128][3]


# --------------------------------------------------------------------------------------------
# Sharding


SHARD_CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    scan_layers=True,
    layer_pattern=("kda", "gdn"),
    attention={
        "kda": KDAConfig(num_heads=4, head_dim=8, chunk_size=4),
        "gdn": GDNConfig(num_heads=4, head_dim=8, v_head_dim=4, chunk_size=4),
    },
)


def _train(mesh_spec: str, steps: int = 2):
    """Two SGD steps from the same (numpy) parameters, placed per the mesh's shardings."""
    devices = jax.devices()[:1] if mesh_spec == "data=1" else None
    mesh = sharding.make_mesh(mesh_spec, devices=devices)
    optimizer = optax.sgd(0.1)
    tokens = np.random.default_rng(0).integers(0, 64, (8, 9)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    abstract, shardings = training.abstract_train_state(SHARD_CONFIG, optimizer, mesh, seq_len=8)
    params = jax.device_put(_fill(abstract.params, std=0.1), shardings.params)
    state = training.train_state_from_params(params, optimizer, shardings, mesh)
    step = training.build_trainer(SHARD_CONFIG, optimizer, mesh, shardings, batch)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def single_device_run():
    return _train("data=1")


def test_sharded_train_step_equals_single_device(single_device_run):
    """KDA and GDN train steps on (data 2, fsdp 2, tensor 2) == one device; heads over tensor."""
    ref_state, ref_losses = single_device_run
    state, losses = _train("data=2,fsdp=2,tensor=2")
    assert ref_losses[1] < ref_losses[0]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    attention = state.params["params"]["layers"]["layer_0"]["attention"]
    assert attention["q_proj"]["kernel"].sharding.spec == jax.P(None, "fsdp", "tensor", None)
    assert attention["f_b_proj"]["kernel"].sharding.spec == jax.P(None, None, "tensor")
    assert attention["dt_bias"].sharding.spec == jax.P(None, "tensor")


def test_sharded_decode_equals_unsharded_full_forward(single_device_run):
    """Prefill + decode of the scanned KDA/GDN decoder on (fsdp 2, tensor 4), states and conv
    windows sharded over batch and heads, == the unsharded full forward."""
    config = SHARD_CONFIG
    mesh = sharding.make_mesh("fsdp=2,tensor=4")
    model = Decoder(config)
    tokens = _tokens((B, 6), config.vocab_size)
    trained = jax.device_get(single_device_run[0].params)
    with jax.set_mesh(mesh):
        boxed = jax.eval_shape(model.init, jax.random.key(1), tokens)
    params = {
        "params": jax.device_put(trained["params"], sharding.tree_shardings(boxed, mesh)["params"])
    }
    caches = init_caches(config, B, 8)
    cache_shardings = sharding.axes_tree_shardings(cache_logical_axes(config), caches, mesh)
    apply = jax.jit(model.apply)
    with jax.set_mesh(mesh):
        caches = jax.device_put(caches, cache_shardings)
        logits, caches = apply(
            params, tokens[:, :4], jnp.broadcast_to(jnp.arange(4), (B, 4)), caches
        )
        outs = [logits]
        for t in (4, 5):
            logits, caches = apply(params, tokens[:, t : t + 1], jnp.full((B, 1), t), caches)
            outs.append(logits)
    full, _ = jax.jit(model.apply)(trained, tokens)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=2e-5)
    state = caches["groups"][0].state  # [layers, B, N, H, J]
    assert tuple(state.sharding.spec)[:3] == (None, "fsdp", "tensor")


# --------------------------------------------------------------------------------------------
# Configuration


def test_bad_configs_give_clear_errors():
    cases = [
        (KDAConfig, dict(num_heads=0), "kda.num_heads=0 must be a positive integer"),
        (GDNConfig, dict(head_dim=-8), "gdn.head_dim=-8 must be a positive integer"),
        (KDAConfig, dict(conv_kernel_size=0), "kda.conv_kernel_size=0 must be a positive"),
        (KDAConfig, dict(chunk_size=0), "kda.chunk_size=0 must be a positive integer"),
        (KDAConfig, dict(v_head_dim=0), "kda.v_head_dim=0 must be a positive integer, or None"),
        (
            GDNConfig,
            dict(implementation="fused"),
            "gdn.implementation='fused' is not one of \\['chunked', 'recurrent'\\]",
        ),
    ]
    for cls, kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            cls(**kwargs)
    params = _params(KDA)
    x, pos = _inputs(T=1)
    mla_cache = MLALatentCache(c_kv=jnp.zeros((B, 4, 16)), k_rope=jnp.zeros((B, 4, 4)), index=0)
    with pytest.raises(TypeError, match="kda needs a DeltaCache, got MLALatentCache"):
        DeltaAttention(KDA, SETTINGS).apply({"params": params}, x, pos, mla_cache)


def test_model_config_with_kda_round_trips_through_plain_dicts():
    from jaxmodels.config import from_dict, to_dict

    config = dataclasses.replace(HYBRID, attention={**HYBRID.attention, "gdn": GDN})
    again = from_dict(ModelConfig, json.loads(json.dumps(to_dict(config))))
    assert again == config and isinstance(again.attention["gdn"], GDNConfig)
    assert to_dict(KDAConfig())["v_head_dim"] is None


# --------------------------------------------------------------------------------------------
# Hugging Face `kimi_linear` weights


def _random_hf_state_dict(config: KDAConfig, D=32, seed=0):
    """A checkpoint-layout KDA layer with realistic gate parameters."""
    rng = np.random.default_rng(seed)
    N, H, J, W = config.num_heads, config.head_dim, config.value_dim, config.conv_kernel_size
    shapes = {
        "q_proj.weight": (N * H, D),
        "k_proj.weight": (N * H, D),
        "v_proj.weight": (N * J, D),
        "q_conv1d.weight": (N * H, 1, W),
        "k_conv1d.weight": (N * H, 1, W),
        "v_conv1d.weight": (N * J, 1, W),
        "f_a_proj.weight": (H, D),
        "f_b_proj.weight": (N * H, H),
        "b_proj.weight": (N, D),
        "g_a_proj.weight": (H, D),
        "g_b_proj.weight": (N * J, H),
        "o_norm.weight": (J,),
        "o_proj.weight": (D, N * J),
    }
    state = {k: rng.normal(0.0, 0.3, s).astype(np.float32) for k, s in shapes.items()}
    state["o_norm.weight"] += 1.0
    state["A_log"] = np.log(rng.uniform(1, 16, (1, 1, N, 1))).astype(np.float32)
    state["dt_bias"] = rng.normal(-3.0, 1.0, (N * H,)).astype(np.float32)
    return state


def test_import_export_round_trip_in_both_layouts():
    state = _random_hf_state_dict(KDA)
    params = kda_params_from_hf(state, KDA)
    for layout in ("checkpoint", "transformers"):
        exported = kda_params_to_hf(params, KDA, prefix="x.", layout=layout)
        again = kda_params_from_hf(exported, KDA, prefix="x.")
        jax.tree.map(np.testing.assert_array_equal, again, params)
    back = kda_params_to_hf(params, KDA)
    assert back.keys() == state.keys()
    for name in state:
        np.testing.assert_array_equal(back[name], state[name])
    transformers = kda_params_to_hf(params, KDA, layout="transformers")
    assert transformers["conv1d.weight"].shape == (
        2 * (8 + 8 + 6),
        1,
        4,
    ) and "forget_gate.A_log" in (transformers)
    # The imported tree has exactly the module's parameter shapes, and the layer runs on it.
    expected = jax.tree.map(lambda a: a.shape, _params(KDA))
    assert jax.tree.map(lambda a: a.shape, params) == expected
    x, pos = _inputs()
    assert float(jnp.std(_apply(KDA)(params, x, pos, None)[0])) > 0.01


def test_imported_conv_and_gate_weights_mean_what_the_checkpoint_says():
    """Channel c = n H + h of `k_conv1d.weight[c, 0, i]` is our kernel[i, n, h], with tap W - 1
    on the current token: a unit impulse at the last tap makes the conv the identity; A_log
    [1, 1, N, 1] -> [N] per head."""
    state = _random_hf_state_dict(KDA)
    state["k_conv1d.weight"] = np.zeros_like(state["k_conv1d.weight"])
    state["k_conv1d.weight"][:, 0, -1] = 1.0
    params = kda_params_from_hf(state, KDA)
    x = np.asarray(_normal((B, 5, 2, 8), 5))
    y, _ = short_conv(x, params["k_conv1d"]["kernel"], jnp.zeros((B, 3, 2, 8)))
    np.testing.assert_allclose(y, x, atol=1e-6)
    np.testing.assert_array_equal(params["A_log"], state["A_log"].reshape(2))
    np.testing.assert_array_equal(
        params["q_conv1d"]["kernel"][:, 1, 3], state["q_conv1d.weight"][11, 0]
    )


def test_importer_errors_name_the_weight():
    state = _random_hf_state_dict(KDA)
    with pytest.raises(ValueError, match="'v_proj.weight' has shape \\(12, 32\\), expected"):
        kda_params_from_hf(state, dataclasses.replace(KDA, v_head_dim=8))
    del state["g_b_proj.weight"]
    with pytest.raises(KeyError, match="'g_b_proj.weight' is missing"):
        kda_params_from_hf(state, KDA)
    state = _random_hf_state_dict(KDA)
    with pytest.raises(ValueError, match="biases are not supported"):
        kda_params_from_hf({**state, "g_b_proj.bias": np.zeros(12)}, KDA)
    with pytest.raises(ValueError, match="layout='fla' is not one of"):
        kda_params_to_hf(kda_params_from_hf(state, KDA), KDA, layout="fla")


def test_load_kda_layers_into_the_hybrid_decoder():
    config = HYBRID
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(Decoder(config).init, jax.random.key(1), tokens))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), shapes)
    kda_layers = [i for i, a in enumerate(config.layer_attention) if a.kind == "kda"]
    assert kda_layers == [0, 1, 2, 4]
    state = {}
    for i in kda_layers:
        layer = _random_hf_state_dict(KDA, seed=i)
        state.update({f"model.layers.{i}.self_attn.{k}": v for k, v in layer.items()})
    before = jax.tree.map(np.array, params)
    loaded = load_kda_layers(params, state, config)
    for i in kda_layers:
        expected = kda_params_from_hf(state, KDA, prefix=f"model.layers.{i}.self_attn.")
        where = ("group_0", f"layer_{i}") if i < 4 else ("tail", "layer_0")
        got = loaded["params"][where[0]][where[1]]["attention"]
        jax.tree.map(np.testing.assert_array_equal, got, expected)
    mla = ("group_0", "layer_3", "attention")
    jax.tree.map(
        np.testing.assert_array_equal,
        loaded["params"][mla[0]][mla[1]][mla[2]],
        params["params"][mla[0]][mla[1]][mla[2]],
    )
    jax.tree.map(np.testing.assert_array_equal, params, before)  # input not modified


def test_config_from_hf_config_json():
    hub = {"linear_attn_config": {"num_heads": 32, "head_dim": 128, "short_conv_kernel_size": 4}}
    assert kda_config_from_hf(hub) == REFERENCE_CONFIGS["kimi-linear"]
    transformers = {"linear_num_heads": 2, "linear_head_dim": 8, "linear_conv_kernel_dim": 3}
    config = kda_config_from_hf(transformers, chunk_size=16)
    assert (config.num_heads, config.head_dim, config.conv_kernel_size) == (2, 8, 3)
    assert config.chunk_size == 16 and config.value_dim == 8
