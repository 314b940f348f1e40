"""DeepSeek Sparse Attention as an MLA layer option: reference/attention.md §8.2 oracles,
caches, gradient isolation of the indexer, sharding."""

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
from jaxmodels.attention.dsa import (
    DSACache,
    DSAConfig,
    DSAttention,
    cache_bytes_per_token,
    dsa_freeze,
    dsa_trainable_mask,
    indexer_loss,
)
from jaxmodels.attention.gqa import GQAConfig
from jaxmodels.attention.mla import MLAConfig, MLAttention
from jaxmodels.config import BlockSettings, ConfigError, ModelConfig, from_dict, to_dict
from jaxmodels.model import Decoder, init_caches

TINY = DSAConfig(
    num_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
    v_head_dim=6, index_n_heads=3, index_head_dim=8, index_topk=3, index_block_q=4,
    index_prefix_chunks=2,
)  # fmt: skip
SETTINGS = BlockSettings(hidden_size=32, init_std=0.2)
B, T = 2, 9
FAST = {"xla_backend_optimization_level": 0}  # compile time dominates these tiny shapes


def _inputs(T=T, seed=0):
    x = np.random.default_rng(seed).standard_normal((B, T, SETTINGS.hidden_size))
    x = jnp.asarray(x, jnp.float32)
    return x, jnp.broadcast_to(jnp.arange(T), (B, T))


@functools.cache
def _params():
    x, pos = _inputs()
    variables = jax.jit(DSAttention(TINY, SETTINGS).init, compiler_options=FAST)(
        jax.random.key(1), x, pos
    )
    return nn.meta.unbox(variables)["params"]


@functools.cache
def _apply(config, module_cls=DSAttention, collections=()):
    """Jitted `(params, x, positions, cache) -> ((y, cache), collections)`."""
    module = module_cls(config, SETTINGS)

    def run(params, x, positions, cache):
        return module.apply({"params": params}, x, positions, cache, mutable=list(collections))

    return jax.jit(run, compiler_options=FAST)


def _forward(config, params, x, pos, cache=None):
    return _apply(config)(params, x, pos, cache)[0]


def _mla_params(params):
    return {k: v for k, v in params.items() if k != "indexer"}


# --------------------------------------------------------------------------------------------
# Equivalences


@pytest.mark.parametrize("form", ["mha", "absorbed"])
def test_topk_at_least_visible_is_dense_causal_mla(form):
    """top-k >= visible tokens: the sparse layer is exactly the MLA layer it extends (§8.2);
    the dense warm-up stage is MLA for any top-k."""
    params = _params()
    x, pos = _inputs()
    mla = dataclasses.replace(TINY.mla, form=form)
    want, _ = _apply(mla, MLAttention)(_mla_params(params), x, pos, None)[0]
    assert float(jnp.max(jnp.abs(want))) > 0.1
    for config in (
        dataclasses.replace(TINY, index_topk=T),
        dataclasses.replace(TINY, index_topk=T + 7, sparse_implementation="reference"),
        dataclasses.replace(TINY, indexer_stage="dense_warmup", form=form),
    ):
        y, _ = _forward(config, params, x, pos)
        np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-5)


def test_sparse_layer_gather_equals_reference_and_is_sparse():
    params = _params()
    x, pos = _inputs()
    gather, _ = _forward(TINY, params, x, pos)
    ref, _ = _forward(dataclasses.replace(TINY, sparse_implementation="reference"), params, x, pos)
    np.testing.assert_allclose(gather, ref, atol=2e-5, rtol=2e-5)
    dense, _ = _forward(dataclasses.replace(TINY, index_topk=T), params, x, pos)
    # the first top-k tokens see all their keys; later ones attend over a strict subset
    k = TINY.index_topk
    np.testing.assert_allclose(gather[:, :k], dense[:, :k], atol=2e-5, rtol=2e-5)
    assert float(jnp.max(jnp.abs(gather[:, k:] - dense[:, k:]))) > 1e-3


@pytest.mark.parametrize("stage", ["sparse", "dense_warmup"])
def test_prefill_then_decode_equals_full_forward(stage):
    """Chunked prefill (5 + 2 tokens) then token-by-token decode == one full forward; the
    indexer key cache sits beside the MLA latent cache."""
    config = dataclasses.replace(TINY, indexer_stage=stage)
    params = _params()
    x, pos = _inputs()
    full, _ = _forward(config, params, x, pos)
    cache = DSAttention.init_cache(config, SETTINGS, B, 12, jnp.float32)
    outs = []
    for start, stop in [(0, 5), (5, 7)] + [(t, t + 1) for t in range(7, T)]:
        y, cache = _forward(config, params, x[:, start:stop], pos[:, start:stop], cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=2e-5)
    assert isinstance(cache, DSACache) and int(cache.index) == T
    assert cache.latent.c_kv.shape == (B, 12, 16) and cache.index_k.shape == (B, 12, 8)
    assert jnp.all(cache.index_k[:, T:] == 0) and jnp.all(jnp.any(cache.index_k[:, :T] != 0, -1))


# --------------------------------------------------------------------------------------------
# Indexer training: losses and gradient isolation


@functools.cache
def _grads(stage):
    """Gradients of the LM-like loss and of the indexer loss w.r.t. params and x."""
    config = dataclasses.replace(TINY, indexer_stage=stage)
    module = DSAttention(config, SETTINGS)
    probe = jnp.asarray(
        np.random.default_rng(7).standard_normal((B, T, SETTINGS.hidden_size)), jnp.float32
    )

    def losses(params, x, pos):
        (y, _), cols = module.apply({"params": params}, x, pos, mutable=["losses"])
        return jnp.sum(y * probe), indexer_loss(cols["losses"])

    def run(params, x, pos):
        lm = jax.grad(lambda p, x: losses(p, x, pos)[0], argnums=(0, 1))(params, x)
        idx = jax.grad(lambda p, x: losses(p, x, pos)[1], argnums=(0, 1))(params, x)
        return lm, idx, losses(params, x, pos)[1]

    return jax.jit(run, compiler_options=FAST)(_params(), *_inputs())


def _split(grads):
    indexer = jax.tree.leaves(grads["indexer"])
    main = jax.tree.leaves({k: v for k, v in grads.items() if k != "indexer"})
    return indexer, main


@pytest.mark.parametrize("stage", ["sparse", "dense_warmup"])
def test_gradient_isolation(stage):
    """∂L_LM/∂indexer = 0 and ∂L_I/∂(main params, x) = 0 exactly; each loss does reach its own
    side (V3.2 §2.1: indexer input detached, target stopped, selection discrete)."""
    (lm_p, lm_x), (idx_p, idx_x), kl = _grads(stage)
    lm_indexer, lm_main = _split(lm_p)
    idx_indexer, idx_main = _split(idx_p)
    assert float(kl) > 1e-3
    assert all(np.all(np.asarray(g) == 0) for g in lm_indexer)
    assert all(np.all(np.asarray(g) == 0) for g in idx_main)
    np.testing.assert_array_equal(idx_x, 0.0)
    assert all(np.any(np.asarray(g) != 0) for g in idx_indexer)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in lm_main) > 0
    assert np.any(np.asarray(lm_x) != 0)


def test_loss_collection_name_shape_and_off_stage():
    params = _params()
    x, pos = _inputs()
    for stage, expect in [("sparse", True), ("dense_warmup", True), ("off", False)]:
        config = dataclasses.replace(TINY, indexer_stage=stage, index_loss_weight=2.0)
        (_, _), cols = _apply(config, collections=("losses",))(params, x, pos, None)
        if not expect:
            assert not jax.tree.leaves(cols.get("losses", {}))
            continue
        (value,) = cols["losses"]["indexer_kl"]
        assert value.shape == () and value.dtype == jnp.float32 and float(value) > 0
        np.testing.assert_allclose(indexer_loss(cols["losses"]), value)
        np.testing.assert_allclose(training.auxiliary_loss(cols["losses"]), value)
    # without a mutable "losses" collection nothing is computed or stored
    _, cols = _apply(TINY)(params, x, pos, None)
    assert "losses" not in cols


def test_trainable_mask_and_dense_warmup_trains_only_the_indexer():
    """dsa_freeze(adam, "dense_warmup"): a few steps lower the indexer KL, every non-indexer
    parameter stays bit-identical."""
    params = _params()
    mask = dsa_trainable_mask(params, "dense_warmup")
    assert all(jax.tree.leaves(mask["indexer"]))
    assert not any(jax.tree.leaves(_mla_params(mask)))
    assert all(jax.tree.leaves(dsa_trainable_mask(params, "sparse")))
    off = dsa_trainable_mask(params, "off")
    assert not any(jax.tree.leaves(off["indexer"])) and all(jax.tree.leaves(_mla_params(off)))
    with pytest.raises(ConfigError, match="stage"):
        dsa_trainable_mask(params, "warmup")

    config = dataclasses.replace(TINY, indexer_stage="dense_warmup")
    module = DSAttention(config, SETTINGS)
    x, pos = _inputs()
    opt = dsa_freeze(optax.adam(3e-2), "dense_warmup")

    def loss(p):
        (y, _), cols = module.apply({"params": p}, x, pos, mutable=["losses"])
        return jnp.mean(y**2) + indexer_loss(cols["losses"]), indexer_loss(cols["losses"])

    @functools.partial(jax.jit, compiler_options=FAST)
    def step(p, s):
        (_, kl), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, kl

    p, s = params, opt.init(params)
    kls = []
    for _ in range(15):
        p, s, kl = step(p, s)
        kls.append(float(kl))
    assert kls[-1] < 0.7 * kls[0], kls
    for a, b in zip(
        jax.tree.leaves(_mla_params(p)), jax.tree.leaves(_mla_params(params)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert any(
        np.any(a != b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params), strict=True)
    )


# --------------------------------------------------------------------------------------------
# Decoder, sharding


DSA8 = DSAConfig(
    num_heads=8, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
    v_head_dim=8, index_n_heads=4, index_head_dim=8, index_topk=3, index_block_q=4,
)  # fmt: skip
SHARD_CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, scan_layers=True,
    layer_pattern=("dsa",), attention={"dsa": DSA8}, init_std=0.2,
)  # fmt: skip


def _train(mesh_spec: str, steps: int = 2):
    devices = jax.devices()[:1] if mesh_spec == "data=1" else None
    mesh = sharding.make_mesh(mesh_spec, devices=devices)
    optimizer = optax.sgd(0.3)  # (Adam would amplify rounding in near-zero gradients)
    tokens = np.random.default_rng(0).integers(0, 64, (8, 9)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    state, shardings = training.init_train_state(
        SHARD_CONFIG, optimizer, jax.random.key(0), mesh, seq_len=8
    )
    step = training.build_trainer(SHARD_CONFIG, optimizer, mesh, shardings, batch)
    metrics = []
    for _ in range(steps):
        state, m = step(state, batch)
        metrics.append((float(m["loss"]), float(m["aux_loss"])))
    return state, metrics


@pytest.fixture(scope="module")
def single_device_dsa_run():
    return _train("data=1")


@pytest.mark.parametrize("mesh_spec", ["data=2,fsdp=2,tensor=2", "tensor=8"])
def test_sharded_train_step_equals_single_device(mesh_spec, single_device_dsa_run):
    """Train steps (LM + sown indexer KL of both scanned layers) on a mesh == one device."""
    ref_state, ref_metrics = single_device_dsa_run
    state, metrics = _train(mesh_spec)
    assert all(aux > 1e-3 for _, aux in metrics)
    np.testing.assert_allclose(metrics, ref_metrics, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    q_b = state.params["params"]["layers"]["layer_0"]["attention"]["q_b_proj"]["kernel"]
    tensor = "tensor" if "tensor" in mesh_spec else None
    assert q_b.sharding.spec == jax.P(None, None, tensor, None)


def test_decoder_hybrid_prefill_then_decode_equals_full_forward():
    """A scanned ("dsa", "gqa") decoder: DSA caches (latent + indexer keys) beside GQA caches."""
    config = ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, scan_layers=True,
        layer_pattern=("dsa", "gqa"), init_std=0.1,
        attention={"dsa": TINY, "gqa": GQAConfig(num_heads=4, num_kv_heads=2, head_dim=8)},
    )  # fmt: skip
    model = Decoder(config)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (B, T)), jnp.int32)
    init = jax.jit(model.init, compiler_options=FAST)
    params = {"params": nn.meta.unbox(init(jax.random.key(1), tokens))["params"]}
    apply = jax.jit(model.apply, compiler_options=FAST)
    full, _ = apply(params, tokens)
    caches = init_caches(config, batch_size=B, max_length=12)
    logits, caches = apply(params, tokens[:, :5], jnp.broadcast_to(jnp.arange(5), (B, 5)), caches)
    outs = [logits]
    for t in range(5, T):
        logits, caches = apply(params, tokens[:, t : t + 1], jnp.full((B, 1), t), caches)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=2e-5)
    first = caches["groups"][0]
    assert isinstance(first, DSACache) and first.index_k.shape == (2, B, 12, 8)


def test_load_dsa_layers_imports_mla_and_indexer_weights_into_a_scanned_decoder():
    from jaxmodels.weights.hf_deepseek_v32 import dsa_params_to_hf, load_dsa_layers

    config = SHARD_CONFIG
    init = jax.jit(Decoder(config).init, compiler_options=FAST)
    params = {
        "params": nn.meta.unbox(init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    }
    stacked = params["params"]["layers"]["layer_0"]["attention"]
    rng = np.random.default_rng(3)
    layers = [
        jax.tree.map(lambda a: rng.standard_normal(a.shape[1:]).astype(np.float32), stacked)
        for _ in range(config.num_layers)
    ]
    state = {}
    for i, layer in enumerate(layers):
        state.update(dsa_params_to_hf(layer, DSA8, prefix=f"model.layers.{i}.self_attn."))
    assert "model.layers.1.self_attn.indexer.k_norm.bias" in state
    loaded = load_dsa_layers(params, state, config)["params"]["layers"]["layer_0"]["attention"]
    for i, layer in enumerate(layers):
        got = jax.tree.map(lambda a, i=i: np.asarray(a[i]), loaded)
        jax.tree.map(np.testing.assert_array_equal, got, layer)
    # the input tree is not modified
    assert not np.array_equal(
        np.asarray(stacked["indexer"]["wk"]["kernel"][0]), layers[0]["indexer"]["wk"]["kernel"]
    )


# --------------------------------------------------------------------------------------------
# Config


def test_bad_configs_give_clear_errors():
    with pytest.raises(ConfigError, match="q_lora_rank"):
        DSAConfig(q_lora_rank=None)
    with pytest.raises(ConfigError, match="index_head_dim=2 must be >="):
        DSAConfig(index_head_dim=2, qk_rope_head_dim=4)
    with pytest.raises(ConfigError, match="indexer_stage"):
        DSAConfig(indexer_stage="warmup")
    with pytest.raises(ConfigError, match="decode_form"):
        DSAConfig(decode_form="mha")
    with pytest.raises(ConfigError, match="index_topk"):
        DSAConfig(index_topk=0)
    with pytest.raises(ConfigError, match="dsa.decode_implementation='pallas'"):
        DSAConfig(decode_implementation="pallas")


def test_config_is_an_mla_config_and_round_trips():
    assert isinstance(TINY, MLAConfig) and TINY.kind == "dsa"
    assert type(TINY.mla) is MLAConfig and TINY.mla.kv_lora_rank == TINY.kv_lora_rank
    indexer = {f: getattr(TINY, f) for f in ("index_n_heads", "index_head_dim", "index_topk")}
    assert DSAConfig.from_mla(TINY.mla, **indexer) == dataclasses.replace(
        TINY,
        **{
            f.name: f.default
            for f in dataclasses.fields(DSAConfig)
            if f.name not in {g.name for g in dataclasses.fields(MLAConfig)} | set(indexer)
        },
    )
    assert DSAConfig.from_mla(TINY.mla, index_topk=3, q_lora_rank=8).q_lora_rank == 8
    model = ModelConfig(layer_pattern=("dsa",), attention={"dsa": TINY})
    assert from_dict(ModelConfig, to_dict(model)) == model
    # V3.2 dims: latent 576 + indexer key 128 values per token per layer
    v32 = DSAConfig(
        num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, index_n_heads=64, index_head_dim=128,
        index_topk=2048,
    )  # fmt: skip
    assert cache_bytes_per_token(v32) == (576 + 128) * 2
