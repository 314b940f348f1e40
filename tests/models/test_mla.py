"""Multi-head Latent Attention: forms, caches, causality, sharding, oracles (reference §8.1)."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharding
from jaxmodels import training
from jaxmodels.attention.gqa import GQAConfig
from jaxmodels.attention.mla import (
    REFERENCE_CONFIGS,
    MLAConfig,
    MLAHeadCache,
    MLALatentCache,
    MLAttention,
    cache_bytes_per_token,
    mla_softmax_scale,
    rope_frequencies,
)
from jaxmodels.config import BlockSettings, ConfigError, ModelConfig, RopeConfig
from jaxmodels.model import Decoder, cache_logical_axes, init_caches
from jaxmodels.ops import attention as attention_ops
from jaxmodels.ops import mla as mla_ops
from jaxmodels.ops import rope as rope_ops
from jaxmodels.weights import load_mla_layers, mla_params_from_hf, mla_params_to_hf

TINY = MLAConfig(
    num_heads=4,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
)
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


@functools.cache
def _params():
    """Parameters of TINY; the forms, caches and NoPE do not change their shapes."""
    x, pos = _inputs()
    init = jax.jit(MLAttention(TINY, SETTINGS).init)
    return nn.meta.unbox(init(jax.random.key(1), x, pos))["params"]


@functools.cache
def _decoder(config):
    """(jitted init, jitted apply) of `Decoder(config)`, shared across tests."""
    model = Decoder(config)
    return jax.jit(lambda key, tokens: nn.meta.unbox(model.init(key, tokens))), jax.jit(model.apply)


@functools.cache
def _apply(config, settings=SETTINGS):
    """Jitted `(params, x, positions, cache) -> ((y, cache), attn_stats)`, one per config."""
    module = MLAttention(config, settings)

    def run(params, x, positions, cache):
        out, state = module.apply({"params": params}, x, positions, cache, mutable=["attn_stats"])
        return out, state["attn_stats"]

    return jax.jit(run)


def _forward(config, params, x, pos, cache=None, settings=SETTINGS):
    (y, cache), _ = _apply(config, settings)(params, x, pos, cache)
    return y, cache


# --------------------------------------------------------------------------------------------
# The two forms


def test_absorbed_form_equals_mha_form_fp32():
    """(The direct query projection, q_lora_rank None, runs in the importer and parity tests.)"""
    config = TINY
    params = _params()
    x, pos = _inputs()
    (y_mha, _), stats_mha = _apply(config)(params, x, pos, None)
    absorbed = dataclasses.replace(config, form="absorbed")
    (y_abs, _), stats_abs = _apply(absorbed)(params, x, pos, None)
    assert float(jnp.max(jnp.abs(y_mha))) > 0.1  # a non-trivial output
    np.testing.assert_allclose(y_abs, y_mha, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(stats_abs["max_logits"], stats_mha["max_logits"], rtol=1e-5)
    # The reference attention core agrees too.
    reference = dataclasses.replace(config, implementation="reference")
    np.testing.assert_allclose(_forward(reference, params, x, pos)[0], y_mha, atol=1e-5)


def test_absorbed_form_equals_mha_form_bf16():
    """bf16 activations: both forms round differently (the absorbed query q·W_UK and the latent
    output are bf16 products), so they agree to bf16 precision: 3e-2 of the output scale."""
    settings = dataclasses.replace(SETTINGS, dtype=jnp.bfloat16)
    params = _params()
    x, pos = _inputs()
    y32, _ = _forward(TINY, params, x, pos)
    y_mha, _ = _forward(TINY, params, x, pos, settings=settings)
    y_abs, _ = _forward(
        dataclasses.replace(TINY, form="absorbed"), params, x, pos, settings=settings
    )
    assert y_mha.dtype == y_abs.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(y32)))
    y_mha, y_abs = np.asarray(y_mha, np.float32), np.asarray(y_abs, np.float32)
    np.testing.assert_allclose(y_abs, y_mha, atol=3e-2 * scale)
    np.testing.assert_allclose(y_abs, y32, atol=3e-2 * scale)


@jax.jit
def _ops_cases(q_nope, q_rope, c_kv, k_rope, kv_b, mask):
    H = q_nope.shape[-1]
    out = mla_ops.absorbed_attention(
        q_nope, q_rope, c_kv, k_rope, kv_b, mask, scale=0.3, qk_nope_head_dim=H
    )
    w_uk, w_uv = mla_ops.split_kv_b(kv_b, H)
    q_mqa = jnp.concatenate([mla_ops.absorb_query(q_nope, w_uk), q_rope], -1)
    k_mqa = jnp.concatenate([c_kv, k_rope], -1)[:, :, None]
    latent = attention_ops.attention_reference(q_mqa, k_mqa, c_kv[:, :, None], mask, scale=0.3)
    mqa = jnp.einsum("BTNC,CNH->BTNH", latent, w_uv)
    k, v = mla_ops.mha_keys_values(c_kv, k_rope, kv_b, H)
    q = jnp.concatenate([q_nope, q_rope], -1)
    ref = mla_ops.mha_attention(q, k, v, mask, scale=0.3, implementation="reference")
    xla = mla_ops.mha_attention(q, k, v, mask, scale=0.3)
    wide_v = jnp.concatenate([v, v, v], -1)  # value dim 18 > key dim 12: q and k are padded
    wide_xla = mla_ops.mha_attention(q, k, wide_v, mask, scale=0.3)
    wide_ref = mla_ops.mha_attention(q, k, wide_v, mask, scale=0.3, implementation="reference")
    return out, mqa, ref, xla, wide_xla, wide_ref


def test_ops_absorbed_is_mqa_over_latents_and_padding_is_exact():
    """Absorbed attention == MQA (one kv head, key [c_kv; k_rope], value c_kv) then W_UV; and the
    padded xla MHA core == the reference core (unequal key/value dims)."""
    N, H, R, C, Hv, S = 4, 8, 4, 16, 6, 11
    q_nope, q_rope = _normal((B, 3, N, H), 1), _normal((B, 3, N, R), 2)
    c_kv, k_rope = _normal((B, S, C), 3), _normal((B, S, R), 4)
    kv_b = _normal((C, N, H + Hv), 5, scale=0.3)
    mask = np.arange(S)[None, None, :] <= np.arange(S - 3, S)[None, :, None]
    mask = np.broadcast_to(mask, (B, 3, S)).copy()
    mask[1, :, :2] = False  # some invisible slots
    out, mqa, ref, xla, wide_xla, wide_ref = _ops_cases(q_nope, q_rope, c_kv, k_rope, kv_b, mask)
    assert float(jnp.max(jnp.abs(out))) > 0.1
    np.testing.assert_allclose(out, mqa, atol=1e-5)
    np.testing.assert_allclose(ref, out, atol=1e-5)
    np.testing.assert_allclose(xla, ref, atol=1e-5)
    np.testing.assert_allclose(wide_xla, wide_ref, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Caches


@pytest.mark.parametrize(
    "form,decode_form", [("mha", "absorbed"), ("absorbed", "absorbed"), ("mha", "mha")]
)
def test_prefill_then_decode_equals_full_forward(form, decode_form):
    """Chunked prefill (2 + 2 + 2 tokens: later chunks attend to earlier ones in the cache),
    then token-by-token decode == one full forward."""
    config = dataclasses.replace(TINY, form=form, decode_form=decode_form)
    params = _params()
    x, pos = _inputs()
    full, _ = _forward(TINY, params, x, pos)
    cache = MLAttention.init_cache(config, SETTINGS, B, 12, jnp.float32)
    outs = []
    for start, stop in [(0, 2), (2, 4), (4, 6)] + [(t, t + 1) for t in range(6, T)]:
        y, cache = _forward(config, params, x[:, start:stop], pos[:, start:stop], cache)
        outs.append(y)
    assert int(cache.index) == T
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=2e-5)
    if decode_form == "absorbed":
        assert isinstance(cache, MLALatentCache) and cache.c_kv.shape == (B, 12, 16)
        assert jnp.all(cache.c_kv[:, T:] == 0)  # nothing written past the filled slots
    else:
        assert isinstance(cache, MLAHeadCache) and cache.k.shape == (B, 12, 4, 12)


def test_absorbed_decode_equals_mha_decode_against_a_prefilled_cache():
    """One decode step: latent cache + absorbed form == per-head cache + MHA form, the latent
    cache holds exactly the normed c_kv and rotated k_rope, and the sown max logits agree."""
    params = _params()
    x, pos = _inputs()
    latent_cfg = TINY
    head_cfg = dataclasses.replace(TINY, decode_form="mha")
    latent = MLAttention.init_cache(latent_cfg, SETTINGS, B, 12, jnp.float32)
    heads = MLAttention.init_cache(head_cfg, SETTINGS, B, 12, jnp.float32)
    for start in range(0, 8, 2):  # prefill 8 tokens (same shapes as above: shared compiles)
        chunk = slice(start, start + 2)
        _, latent = _forward(latent_cfg, params, x[:, chunk], pos[:, chunk], latent)
        _, heads = _forward(head_cfg, params, x[:, chunk], pos[:, chunk], heads)
    (y_abs, latent), s_abs = _apply(latent_cfg)(params, x[:, 8:], pos[:, 8:], latent)
    (y_mha, heads), s_mha = _apply(head_cfg)(params, x[:, 8:], pos[:, 8:], heads)
    np.testing.assert_allclose(y_abs, y_mha, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(s_abs["max_logits"], s_mha["max_logits"], rtol=1e-5)
    # The per-head keys are the up-projected latents: c_kv and k_rope are all the cache needs.
    k, v = mla_ops.mha_keys_values(latent.c_kv, latent.k_rope, params["kv_b_proj"]["kernel"], 8)
    np.testing.assert_allclose(k[:, :9], heads.k[:, :9], atol=1e-5)
    np.testing.assert_allclose(v[:, :9], heads.v[:, :9], atol=1e-5)
    rms = jnp.sqrt(jnp.mean(latent.c_kv[:, :9] ** 2 / params["kv_a_norm"]["scale"] ** 2, -1))
    np.testing.assert_allclose(rms, 1.0, atol=1e-3)  # stored after kv_a_norm


def test_cache_type_must_match_the_decode_form():
    params = _params()
    x, pos = _inputs(T=1)
    heads = MLAttention.init_cache(
        dataclasses.replace(TINY, decode_form="mha"), SETTINGS, B, 4, jnp.float32
    )
    with pytest.raises(TypeError, match="decode_form='absorbed' needs a MLALatentCache"):
        MLAttention(TINY, SETTINGS).apply({"params": params}, x, pos, heads)


def test_decoder_prefill_then_decode_equals_full_forward():
    """A hybrid ("mla", "gqa") unrolled decoder: latent and GQA caches side by side. (The
    scanned decoder is checked by the sharded decode test below.)"""
    config = _hybrid(False, 2)
    tokens = _tokens((B, T), config.vocab_size)
    init, apply = _decoder(config)
    params = init(jax.random.key(1), tokens)
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
    mla_cache = caches["groups"][0][0]
    assert isinstance(mla_cache, MLALatentCache) and mla_cache.c_kv.shape == (B, 12, 16)
    assert int(mla_cache.index) == T


def _hybrid(scan_layers, num_layers, mla=TINY):
    return ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=num_layers,
        layer_pattern=("mla", "gqa"),
        scan_layers=scan_layers,
        init_std=0.1,
        attention={"mla": mla, "gqa": GQAConfig(num_heads=4, num_kv_heads=2, head_dim=8)},
    )


# --------------------------------------------------------------------------------------------
# Causality and position handling


@pytest.mark.parametrize("form", ["mha", "absorbed"])
def test_causality_gradient_from_later_input_is_zero(form):
    config = dataclasses.replace(TINY, form=form)
    params = _params()
    x, pos = _inputs()
    module = MLAttention(config, SETTINGS)
    t = 4
    grad = jax.jit(jax.grad(lambda x: module.apply({"params": params}, x, pos)[0][:, t].sum()))(x)
    assert jnp.all(grad[:, t + 1 :] == 0.0)
    assert jnp.all(jnp.any(grad[:, : t + 1] != 0.0, axis=-1))


def test_nope_ignores_token_order_and_rope_does_not():
    """Kimi-Linear's MLA (use_nope): the last output is a function of the set of earlier tokens;
    with RoPE, reversing the earlier tokens changes it."""
    x, pos = _inputs()
    order = jnp.concatenate([jnp.arange(T - 2, -1, -1), jnp.array([T - 1])])
    for use_nope, same in [(True, True), (False, False)]:
        config = dataclasses.replace(TINY, use_nope=use_nope)
        params = _params()
        y, _ = _forward(config, params, x, pos)
        y_perm, _ = _forward(config, params, x[:, order], pos)
        close = np.allclose(y[:, -1], y_perm[:, -1], atol=1e-5)
        assert close == same, (use_nope, np.abs(y[:, -1] - y_perm[:, -1]).max())


# --------------------------------------------------------------------------------------------
# Sharding


MLA8 = MLAConfig(
    num_heads=8,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
)
SHARD_CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    scan_layers=True,
    layer_pattern=("mla",),
    attention={"mla": MLA8},
)


def _train(mesh_spec: str, steps: int = 2):
    devices = jax.devices()[:1] if mesh_spec == "data=1" else None
    mesh = sharding.make_mesh(mesh_spec, devices=devices)
    optimizer = optax.sgd(0.1)
    tokens = np.random.default_rng(0).integers(0, 64, (8, 9)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    state, shardings = training.init_train_state(
        SHARD_CONFIG, optimizer, jax.random.key(0), mesh, seq_len=8
    )
    step = training.build_trainer(SHARD_CONFIG, optimizer, mesh, shardings, batch)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses, step


@pytest.fixture(scope="module")
def single_device_mla_run():
    return _train("data=1")


def test_sharded_mla_train_step_equals_single_device(single_device_mla_run):
    """Train steps on (data 2, fsdp 2, tensor 2) == one device. (The decode test below uses a
    second mesh shape, (fsdp 2, tensor 4).)"""
    mesh_spec = "data=2,fsdp=2,tensor=2"
    ref_state, ref_losses, _ = single_device_mla_run
    state, losses, step = _train(mesh_spec)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    attention = state.params["params"]["layers"]["layer_0"]["attention"]
    q_b = attention["q_b_proj"]["kernel"]  # [layers, Cq, N, H + R]: heads over tensor
    kv_a = attention["kv_a_proj"]["kernel"]  # [layers, D, C + R]: latent replicated
    assert q_b.sharding.spec == jax.P(None, None, "tensor", None)
    assert kv_a.sharding.spec[2] is None
    assert step.jitted._cache_size() == 1


def test_sharded_decode_equals_unsharded_full_forward(single_device_mla_run):
    """Prefill + absorbed decode of a scanned MLA decoder with parameters and latent caches
    sharded on (fsdp 2, tensor 4): heads over tensor, the latent cache over the batch axes and
    replicated over tensor; equal to the unsharded full forward."""
    config = SHARD_CONFIG
    mesh = sharding.make_mesh("fsdp=2,tensor=4")
    model = Decoder(config)
    tokens = _tokens((B, 6), config.vocab_size)
    trained = jax.device_get(single_device_mla_run[0].params)  # any parameters will do
    with jax.set_mesh(mesh):
        boxed = jax.eval_shape(model.init, jax.random.key(1), tokens)
    shardings = sharding.tree_shardings(boxed["params"], mesh)
    params = {"params": jax.device_put(trained["params"], shardings)}
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
    full, _ = jax.jit(model.apply)(jax.device_get(params), tokens)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=2e-5)
    c_kv = caches["groups"][0].c_kv  # [layers, B, S, C]
    spec = tuple(c_kv.sharding.spec) + (None,) * (c_kv.ndim - len(c_kv.sharding.spec))
    assert spec == (None, "fsdp", None, None)
    q_b = params["params"]["layers"]["layer_0"]["attention"]["q_b_proj"]["kernel"]
    assert q_b.sharding.spec[2] == "tensor"


# --------------------------------------------------------------------------------------------
# Oracles (reference/attention.md §8.1)


def test_softmax_scales_of_published_models():
    expected = {
        "deepseek-v3": 0.1352338,
        "deepseek-v2": 0.1147214,
        "kimi-k2": 0.1308608,
        "kimi-linear": 0.0721688,
    }
    for name, value in expected.items():
        assert mla_softmax_scale(REFERENCE_CONFIGS[name]) == pytest.approx(value, abs=1e-6), name
    no_yarn = dataclasses.replace(REFERENCE_CONFIGS["deepseek-v3"], rope=RopeConfig())
    assert mla_softmax_scale(no_yarn) == pytest.approx(0.0721688, abs=1e-6)


def test_yarn_correction_range_and_frequencies():
    assert rope_ops.yarn_correction_range(64, 1e4, 4096, 32, 1) == (10, 23)
    assert rope_ops.yarn_correction_range(64, 5e4, 4096, 1, 1) == (19, 20)
    inv_freq, cos_scale = rope_frequencies(REFERENCE_CONFIGS["deepseek-v3"])
    base = rope_ops.rope_inv_freq(64, 1e4)
    np.testing.assert_allclose(inv_freq[:11], base[:11], rtol=1e-12)
    np.testing.assert_allclose(inv_freq[23:], base[23:] / 40, rtol=1e-12)
    assert np.all((inv_freq[11:23] < base[11:23]) & (inv_freq[11:23] > base[11:23] / 40))
    assert cos_scale == 1.0  # mscale == mscale_all_dim


def test_cache_bytes_per_token_at_deepseek_v3_dims():
    v3 = REFERENCE_CONFIGS["deepseek-v3"]
    assert cache_bytes_per_token(v3, jnp.bfloat16) * 61 == 70_272
    assert cache_bytes_per_token(REFERENCE_CONFIGS["kimi-k2"], jnp.bfloat16) * 61 == 70_272
    per_head = dataclasses.replace(v3, decode_form="mha")
    assert cache_bytes_per_token(per_head, jnp.bfloat16) * 61 == 4_997_120
    # The caches really are that size (abstractly: no memory is allocated).
    for config, shapes in [
        (v3, [(1, 7, 512), (1, 7, 64)]),
        (per_head, [(1, 7, 128, 192), (1, 7, 128, 128)]),
    ]:
        cache = jax.eval_shape(
            lambda c=config: MLAttention.init_cache(c, SETTINGS, 1, 7, jnp.bfloat16)
        )
        arrays = [x for x in jax.tree.leaves(cache) if x.ndim > 0]
        assert [x.shape for x in arrays] == shapes
        assert sum(x.size * x.dtype.itemsize for x in arrays) == 7 * cache_bytes_per_token(
            config, jnp.bfloat16
        )


@pytest.mark.parametrize("name,count", [("deepseek-v3", 187_107_328), ("kimi-k2", 101_124_096)])
def test_parameter_count_per_layer(name, count):
    config = REFERENCE_CONFIGS[name]
    settings = BlockSettings(hidden_size=7168)
    x = jax.ShapeDtypeStruct((1, 1, 7168), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(MLAttention(config, settings).init, jax.random.key(0), x, pos)
    params = nn.meta.unbox(shapes["params"])
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == count
    assert params["q_b_proj"]["kernel"].shape == (1536, config.num_heads, 192)
    assert params["kv_b_proj"]["kernel"].shape == (512, config.num_heads, 256)
    assert params["o_proj"]["kernel"].shape == (config.num_heads, 128, 7168)


def _random_hf_state_dict(config: MLAConfig, D=32, seed=0):
    rng = np.random.default_rng(seed)
    N, H, R = config.num_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    shapes = {
        "kv_a_proj_with_mqa.weight": (config.kv_lora_rank + R, D),
        "kv_a_layernorm.weight": (config.kv_lora_rank,),
        "kv_b_proj.weight": (N * (H + config.v_head_dim), config.kv_lora_rank),
        "o_proj.weight": (D, N * config.v_head_dim),
    }
    if config.has_q_lora:
        shapes["q_a_proj.weight"] = (config.q_lora_rank, D)
        shapes["q_a_layernorm.weight"] = (config.q_lora_rank,)
        shapes["q_b_proj.weight"] = (N * (H + R), config.q_lora_rank)
    else:
        shapes["q_proj.weight"] = (N * (H + R), D)
    return {
        k: rng.normal(1.0 if "norm" in k else 0.0, 0.3, s).astype(np.float32)
        for k, s in shapes.items()
    }


@pytest.mark.parametrize("q_lora_rank", [24, None])
@pytest.mark.parametrize("rope_interleave", [True, False])
def test_interleaved_and_half_split_rope_are_equivalent_through_the_importer(
    q_lora_rank, rope_interleave
):
    """The same checkpoint imported for layout "interleaved" and "half" computes the same
    function; the rope columns were really permuted for one of them; export inverts import."""
    interleaved = dataclasses.replace(TINY, q_lora_rank=q_lora_rank)
    half = dataclasses.replace(interleaved, rope=RopeConfig(layout="half"))
    state = _random_hf_state_dict(interleaved)
    x, pos = _inputs()
    outs = []
    for config in (interleaved, half):
        params = mla_params_from_hf(state, config, rope_interleave=rope_interleave)
        back = mla_params_to_hf(params, config, rope_interleave=rope_interleave)
        assert back.keys() == state.keys()
        for name in state:
            np.testing.assert_array_equal(back[name], state[name])
        outs.append((params, _forward(config, params, x, pos)[0]))
    (p_int, y_int), (p_half, y_half) = outs
    np.testing.assert_allclose(y_half, y_int, atol=1e-5)
    kv_a_int, kv_a_half = p_int["kv_a_proj"]["kernel"], p_half["kv_a_proj"]["kernel"]
    np.testing.assert_array_equal(kv_a_int[:, :16], kv_a_half[:, :16])  # latent untouched
    assert not np.array_equal(kv_a_int[:, 16:], kv_a_half[:, 16:])  # rope columns permuted
    # Reading the checkpoint with the wrong rope_interleave flag is a different function.
    wrong = mla_params_from_hf(state, interleaved, rope_interleave=not rope_interleave)
    assert np.abs(_forward(interleaved, wrong, x, pos)[0] - y_int).max() > 1e-3


@pytest.mark.parametrize("scan_layers,num_layers", [(False, 3), (True, 4)])
def test_load_mla_layers_into_a_decoder(scan_layers, num_layers):
    config = _hybrid(scan_layers, num_layers)
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(Decoder(config).init, jax.random.key(1), tokens))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), shapes)
    state = {}
    mla_layers = [i for i, a in enumerate(config.layer_attention) if a.kind == "mla"]
    for i in mla_layers:
        layer = _random_hf_state_dict(TINY, seed=i)
        state.update({f"model.layers.{i}.self_attn.{k}": v for k, v in layer.items()})
    before = jax.tree.map(np.array, params)
    loaded = load_mla_layers(params, state, config)
    for i in mla_layers:
        expected = mla_params_from_hf(state, TINY, prefix=f"model.layers.{i}.self_attn.")
        if scan_layers:
            got = jax.tree.map(
                lambda a, i=i: a[i // 2], loaded["params"]["layers"]["layer_0"]["attention"]
            )
        elif i // 2 < num_layers // 2:
            got = loaded["params"][f"group_{i // 2}"]["layer_0"]["attention"]
        else:
            got = loaded["params"]["tail"]["layer_0"]["attention"]
        jax.tree.map(np.testing.assert_array_equal, got, expected)
    # Everything else is untouched, and the input tree was not modified.
    np.testing.assert_array_equal(
        loaded["params"]["embed"]["embedding"], params["params"]["embed"]["embedding"]
    )
    jax.tree.map(np.testing.assert_array_equal, params, before)


def test_qk_clip_targets_scale_the_mla_logits_of_one_head():
    """QK-Clip's `mla_targets` (q nope by sqrt(γ), q rope by γ, k nope by sqrt(γ), shared rope
    key untouched) scale every logit of the clipped head by exactly γ in both forms."""
    from optimizers.qk_clip import mla_targets, qk_clip

    params = _params()
    x, pos = _inputs()
    _, stats = _apply(TINY)(params, x, pos, None)
    s = stats["max_logits"]
    threshold = float(s[2]) * 0.5
    gamma = jnp.where(s > threshold, threshold / s, 1.0)
    tx = qk_clip({(): mla_targets(8, 4, has_q_lora=True)}, threshold=threshold)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params, max_logits={(): s})
    clipped = optax.apply_updates(params, updates)
    for form in ("mha", "absorbed"):
        _, after = _apply(dataclasses.replace(TINY, form=form))(clipped, x, pos, None)
        np.testing.assert_allclose(after["max_logits"], s * gamma, rtol=1e-4)
    assert float(jnp.max(after["max_logits"])) <= threshold * (1 + 1e-4)


# --------------------------------------------------------------------------------------------
# Configuration


def test_bad_configs_give_clear_errors():
    cases = [
        (dict(qk_rope_head_dim=7), "mla.qk_rope_head_dim=7 must be even"),
        (dict(kv_lora_rank=0), "mla.kv_lora_rank=0 must be a positive integer"),
        (dict(kv_lora_rank=-4), "mla.kv_lora_rank=-4 must be a positive integer"),
        (dict(q_lora_rank=-1), "mla.q_lora_rank=-1 must be a positive integer, or 0/None"),
        (dict(num_heads=0), "mla.num_heads=0 must be a positive integer"),
        (dict(v_head_dim=0), "mla.v_head_dim=0 must be a positive integer"),
        (dict(form="naive"), "mla.form='naive' is not one of \\['mha', 'absorbed'\\]"),
        (dict(decode_form="flash"), "mla.decode_form='flash' is not one of"),
        (dict(implementation="triton"), "mla.implementation='triton' is not one of"),
        (dict(use_nope=True, rope=RopeConfig(yarn_factor=4.0)), "use_nope=True applies no"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            MLAConfig(**kwargs)
    assert not MLAConfig(q_lora_rank=0).has_q_lora and not MLAConfig(q_lora_rank=None).has_q_lora


def test_importer_errors_name_the_weight():
    state = _random_hf_state_dict(TINY)
    with pytest.raises(ValueError, match="'kv_b_proj.weight' has shape \\(56, 16\\), expected"):
        mla_params_from_hf(state, dataclasses.replace(TINY, v_head_dim=8))
    with pytest.raises(KeyError, match="'q_proj.weight' is missing"):
        mla_params_from_hf(state, dataclasses.replace(TINY, q_lora_rank=None))
    with pytest.raises(ValueError, match="attention biases"):
        mla_params_from_hf({**state, "o_proj.bias": np.zeros(32)}, TINY)


def test_model_config_with_mla_round_trips_through_plain_dicts():
    from jaxmodels.config import from_dict, to_dict

    config = _hybrid(True, 4, mla=dataclasses.replace(TINY, q_lora_rank=None, use_nope=True))
    again = from_dict(ModelConfig, json.loads(json.dumps(to_dict(config))))
    assert again == config and again.attention["mla"].q_lora_rank is None


def test_config_from_hf_config_json():
    from jaxmodels.weights import mla_config_from_hf

    v3_json = {
        "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "rope_theta": 10000, "max_position_embeddings": 163840,
        "rope_scaling": {
            "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        },
    }  # fmt: skip
    assert mla_config_from_hf(v3_json) == REFERENCE_CONFIGS["deepseek-v3"]
    kimi_linear = {**v3_json, "num_attention_heads": 32, "q_lora_rank": None}
    kimi_linear = {**kimi_linear, "mla_use_nope": True, "rope_scaling": None}
    config = mla_config_from_hf(kimi_linear)
    assert config.use_nope and not config.has_q_lora
    assert mla_softmax_scale(config) == pytest.approx(0.0721688, abs=1e-6)
    with pytest.raises(ValueError, match="mscale_all_dim without mscale"):
        mla_config_from_hf({**v3_json, "rope_scaling": {**v3_json["rope_scaling"], "mscale": 0}})
