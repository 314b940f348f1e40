"""Baseline decoder: causality, prefill + decode == forward, jit == no-jit, generation, configs."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.attention.gqa import GQAConfig
from jaxmodels.config import ConfigError, ModelConfig, RopeConfig
from jaxmodels.generate import generate, sample_logits
from jaxmodels.model import Decoder, init_caches

TINY = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=3,
    layer_pattern=("gqa",),
    attention={"gqa": GQAConfig(num_heads=4, num_kv_heads=2, head_dim=8)},
)


def _init(config, T=8):
    tokens = jax.random.randint(jax.random.key(0), (2, T), 0, config.vocab_size)
    params = nn.meta.unbox(jax.jit(Decoder(config).init)(jax.random.key(1), tokens))
    return params, tokens


@pytest.mark.parametrize("scan_layers", [False, True])
def test_causality_gradient_from_later_input_is_zero(scan_layers):
    config = dataclasses.replace(TINY, scan_layers=scan_layers, num_layers=2)
    params, tokens = _init(config)
    model = Decoder(config)
    x_BTD = jnp.take(params["params"]["embed"]["embedding"], tokens, axis=0)

    def output_at(t, x_BTD):
        logits, _ = _apply_with_embeddings(model, params, x_BTD)
        return logits[:, t].sum()

    t = 3
    grad = jax.jit(jax.grad(lambda x: output_at(t, x)))(x_BTD)
    assert jnp.all(grad[:, t + 1 :] == 0.0)
    assert jnp.any(grad[:, : t + 1] != 0.0)


def _apply_with_embeddings(model, params, x_BTD):
    """Runs the decoder with the embedding lookup replaced by `x_BTD`."""

    def interceptor(next_fun, args, kwargs, context):
        if context.module.name == "embed" and context.method_name == "__call__":
            return x_BTD
        return next_fun(*args, **kwargs)

    tokens = jnp.zeros(x_BTD.shape[:2], jnp.int32)
    with nn.intercept_methods(interceptor):
        return model.apply(params, tokens)


@pytest.mark.parametrize(
    "scan_layers,num_layers,pattern",
    [
        (False, 3, ("gqa",)),
        (True, 3, ("gqa",)),
        (False, 3, ("gqa", "swa")),
        (True, 4, ("gqa", "swa")),
    ],
)
def test_prefill_then_decode_equals_full_forward(scan_layers, num_layers, pattern):
    config = dataclasses.replace(
        TINY,
        scan_layers=scan_layers,
        num_layers=num_layers,
        layer_pattern=pattern,
        attention={
            **TINY.attention,
            "swa": GQAConfig(num_heads=4, num_kv_heads=1, head_dim=8, sliding_window=3),
        },
    )
    params, tokens = _init(config, T=9)
    model = Decoder(config)
    apply = jax.jit(model.apply)
    full, _ = apply(params, tokens)
    caches = init_caches(config, batch_size=2, max_length=12)
    prefill = 5
    positions = jnp.broadcast_to(jnp.arange(prefill), (2, prefill))
    logits, caches = apply(params, tokens[:, :prefill], positions, caches)
    outs = [logits]
    for t in range(prefill, tokens.shape[1]):
        positions = jnp.full((2, 1), t)
        logits, caches = apply(params, tokens[:, t : t + 1], positions, caches)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=2e-5)


def test_scan_and_unrolled_models_compute_the_same_function():
    params, tokens = _init(TINY)
    scanned = dataclasses.replace(TINY, scan_layers=True)
    groups = [params["params"][f"group_{g}"] for g in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *groups)
    scan_params = {"params": {k: v for k, v in params["params"].items() if "group" not in k}}
    scan_params["params"]["layers"] = stacked
    a, _ = jax.jit(Decoder(TINY).apply)(params, tokens)
    b, _ = jax.jit(Decoder(scanned).apply)(scan_params, tokens)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_values_and_gradients(remat):
    config = dataclasses.replace(TINY, scan_layers=True)
    params, tokens = _init(config)

    def loss(p, cfg):
        return jnp.mean(Decoder(cfg).apply(p, tokens)[0] ** 2)

    g0 = jax.jit(jax.grad(loss), static_argnums=1)(params, config)
    g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, dataclasses.replace(config, remat=remat))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_jit_equals_no_jit_and_bf16_is_close():
    params, tokens = _init(TINY)
    model = Decoder(TINY)
    eager, _ = model.apply(params, tokens)
    jitted, _ = jax.jit(model.apply)(params, tokens)
    np.testing.assert_allclose(eager, jitted, atol=1e-5)
    bf16, _ = Decoder(dataclasses.replace(TINY, dtype="bfloat16")).apply(params, tokens)
    assert bf16.dtype == jnp.float32  # logits always float32
    np.testing.assert_allclose(bf16, eager, atol=5e-2)  # bf16 activations: ~3 significant digits


def test_tied_embeddings_use_the_embedding_matrix():
    config = dataclasses.replace(TINY, tie_word_embeddings=True)
    params, tokens = _init(config)
    assert "lm_head" not in params["params"]
    scaled = jax.tree.map(lambda x: x, params)
    scaled["params"]["embed"]["embedding"] = params["params"]["embed"]["embedding"] * 0
    logits, _ = Decoder(config).apply(scaled, tokens)
    np.testing.assert_allclose(logits, 0.0)


def test_greedy_generation_matches_argmax_of_full_forward():
    params, tokens = _init(TINY, T=4)
    out = generate(
        params, tokens, jax.random.key(0), config=TINY, max_new_tokens=5, temperature=0.0
    )
    seq = tokens
    apply = jax.jit(Decoder(TINY).apply)
    for _ in range(5):
        logits, _ = apply(params, seq)
        seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1:], axis=-1)], axis=1)
    np.testing.assert_array_equal(out, seq[:, 4:])


def test_sampling_rules():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)
    draw = jax.vmap(lambda k, **kw: sample_logits(logits, k, **kw)[0], in_axes=0)
    top2 = {int(x) for x in jax.vmap(lambda k: sample_logits(logits, k, top_k=2)[0])(keys)}
    assert top2 == {0, 1}
    top_p = {int(x) for x in jax.vmap(lambda k: sample_logits(logits, k, top_p=0.7)[0])(keys)}
    assert top_p == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert {int(x) for x in draw(keys)} == {0, 1, 2, 3}
    assert int(sample_logits(logits, keys[0], temperature=0.0)[0]) == 0
    with pytest.raises(ValueError, match="top_p=1.5"):
        sample_logits(logits, keys[0], top_p=1.5)


def test_config_validation_messages():
    with pytest.raises(
        ConfigError, match="gqa.num_heads=12 is not divisible by gqa.num_kv_heads=5"
    ):
        GQAConfig(num_heads=12, num_kv_heads=5)
    with pytest.raises(ConfigError, match="head_dim=7 must be even"):
        GQAConfig(head_dim=7)
    with pytest.raises(ConfigError, match="names 'mla', which is not a key"):
        ModelConfig(layer_pattern=("mla",))
    with pytest.raises(ConfigError, match="model.hidden_size=0 must be a positive integer"):
        ModelConfig(hidden_size=0)
    with pytest.raises(ConfigError, match="model.dtype='fp8' is not one of"):
        ModelConfig(dtype="fp8")
    with pytest.raises(ConfigError, match="num_layers=3 must be a multiple of"):
        ModelConfig(num_layers=3, layer_pattern=("gqa", "gqa"), scan_layers=True)
    with pytest.raises(ConfigError, match="rope.layout='zigzag'"):
        RopeConfig(layout="zigzag")


def test_config_round_trips_through_plain_dicts():
    import json

    from jaxmodels.config import from_dict, to_dict

    config = dataclasses.replace(TINY, scan_layers=True, remat="dots")
    again = from_dict(ModelConfig, json.loads(json.dumps(to_dict(config))))
    assert again == config
