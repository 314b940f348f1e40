"""MoBA and NSA as attention kinds ("moba", "nsa"): reference/attention.md §8.4-8.5 oracles
through the Linen modules, caches (chunked prefill + decode), causality, sharding, configs."""

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
from jaxmodels.attention.gqa import GQAConfig, GQAttention
from jaxmodels.attention.moba import MoBACache, MoBAConfig, MoBAttention, layerwise_hybrid
from jaxmodels.attention.nsa import NSACache, NSAConfig, NSAttention
from jaxmodels.config import BlockSettings, ConfigError, ModelConfig, from_dict, to_dict
from jaxmodels.model import Decoder, init_caches

MOBA = MoBAConfig(num_heads=4, num_kv_heads=2, head_dim=8, block_size=4, top_k=2)
NSA = NSAConfig(
    num_heads=4, num_kv_heads=2, head_dim=8, cmp_block=4, cmp_stride=2, compress_hidden=16,
    slc_block=4, num_selected=3, num_init=1, num_local=1, window=5, query_chunk=8,
)  # fmt: skip
SETTINGS = BlockSettings(hidden_size=32, init_std=0.2)
B, T = 2, 21
FAST = {"xla_backend_optimization_level": 0}  # compile time dominates these tiny shapes
MODULES = {"moba": MoBAttention, "nsa": NSAttention, "gqa": GQAttention}
CONFIGS = {"moba": MOBA, "nsa": NSA}


def _inputs(seed=0):
    x = np.random.default_rng(seed).standard_normal((B, T, SETTINGS.hidden_size))
    return jnp.asarray(x, jnp.float32), jnp.broadcast_to(jnp.arange(T), (B, T))


@functools.cache
def _params(kind):
    x, pos = _inputs()
    init = jax.jit(MODULES[kind](CONFIGS[kind], SETTINGS).init, compiler_options=FAST)
    return nn.meta.unbox(init(jax.random.key(1), x, pos))["params"]


def _run(config, collections=()):
    """`(params, x, positions, cache) -> ((y, cache), collections)`."""
    module = MODULES[config.kind](config, SETTINGS)

    def run(params, x, positions, cache):
        return module.apply({"params": params}, x, positions, cache, mutable=list(collections))

    return run


@functools.cache
def _apply(config, collections=()):
    return jax.jit(_run(config, collections), compiler_options=FAST)


def _forward(config, params, x, pos, cache=None):
    return _apply(config)(params, x, pos, cache)[0]


def _branch_as_gqa(params, branch):
    """GQA parameters from one NSA branch: q_proj, that branch's k/v projections, o_proj."""
    return {
        "q_proj": params["q_proj"],
        "k_proj": params[f"{branch}_k_proj"],
        "v_proj": params[f"{branch}_v_proj"],
        "o_proj": params["o_proj"],
    }


def _max_diff(a, b):
    return float(jnp.max(jnp.abs(a - b)))


# --------------------------------------------------------------------------------------------
# MoBA oracles (§8.5)


def test_moba_all_blocks_is_the_gqa_layer_and_fewer_blocks_are_sparse():
    """top_k >= n_blocks: exactly the GQA layer with the same weights (both forms); top_k = 2:
    efficient == reference, different from dense after the first two blocks only."""
    params = _params("moba")
    x, pos = _inputs()
    dense, _ = _forward(MOBA.full_attention(), params, x, pos)
    n_blocks = -(-T // MOBA.block_size)
    for implementation in ("efficient", "reference"):
        cfg = dataclasses.replace(MOBA, top_k=n_blocks, implementation=implementation)
        y, _ = _forward(cfg, params, x, pos)
        np.testing.assert_allclose(y, dense, atol=2e-5, rtol=2e-5)
    sparse, _ = _forward(MOBA, params, x, pos)
    ref, _ = _forward(dataclasses.replace(MOBA, implementation="reference"), params, x, pos)
    np.testing.assert_allclose(sparse, ref, atol=2e-5, rtol=2e-5)
    seen_all = MOBA.top_k * MOBA.block_size  # queries before this see every past block
    np.testing.assert_allclose(sparse[:, :seen_all], dense[:, :seen_all], atol=2e-5, rtol=2e-5)
    assert _max_diff(sparse[:, seen_all:], dense[:, seen_all:]) > 1e-2


def test_moba_max_logits_are_those_of_the_selected_blocks():
    """Sown attn_stats/max_logits: GQA's with all blocks; never above it with top_k = 2."""
    params = _params("moba")
    x, pos = _inputs()
    cols = {}
    for name, cfg in [
        ("gqa", MOBA.full_attention()),
        ("all", dataclasses.replace(MOBA, top_k=99)),
        ("moba", MOBA),
    ]:
        cols[name] = _apply(cfg, ("attn_stats",))(params, x, pos, None)[1]["attn_stats"]
        cols[name] = cols[name]["max_logits"][0]
    np.testing.assert_allclose(cols["all"], cols["gqa"], rtol=1e-6)
    assert np.all(np.asarray(cols["moba"]) <= np.asarray(cols["gqa"]) + 1e-6)
    assert np.all(np.isfinite(np.asarray(cols["moba"])))


# --------------------------------------------------------------------------------------------
# NSA oracles (§8.4)


class _ForceGates:
    """`nn.intercept_methods` hook replacing g_proj's logits so that sigmoid gives exactly
    (0 or 1) per branch."""

    def __init__(self, gates):
        self.logits = jnp.asarray([1e4 if g else -1e4 for g in gates], jnp.float32)

    def __call__(self, next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name == "g_proj" and context.method_name == "__call__":
            return jnp.broadcast_to(self.logits, out.shape)
        return out


@pytest.mark.parametrize(
    "gates,branch,change",
    [((0, 0, 1), "win", dict(window=T)), ((0, 1, 0), "slc", dict(num_selected=6, num_init=1))],
)
def test_nsa_single_branch_is_dense_causal_gqa(gates, branch, change):
    """Gates (0,0,1) with w >= T, and (0,1,0) with n·l' >= T: the layer is the dense causal
    GQA layer built from q_proj, that branch's k/v projections and o_proj."""
    params = _params("nsa")
    x, pos = _inputs()
    cfg = dataclasses.replace(NSA, **change)

    def forced(params, x, pos):
        with nn.intercept_methods(_ForceGates(gates)):
            return NSAttention(cfg, SETTINGS).apply({"params": params}, x, pos)[0]

    y = jax.jit(forced, compiler_options=FAST)(params, x, pos)
    gqa = GQAConfig(num_heads=4, num_kv_heads=2, head_dim=8, rope=NSA.rope)
    want, _ = _forward(gqa, _branch_as_gqa(params, branch), x, pos)
    assert float(jnp.max(jnp.abs(want))) > 0.1
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-5)


def test_nsa_efficient_equals_reference_and_uses_all_branches():
    params = _params("nsa")
    x, pos = _inputs()
    y, _ = _forward(NSA, params, x, pos)
    ref, _ = _forward(dataclasses.replace(NSA, implementation="reference"), params, x, pos)
    np.testing.assert_allclose(y, ref, atol=2e-5, rtol=2e-5)
    # dropping a branch's projections changes the output: each branch contributes
    for branch in ("cmp", "slc", "win"):
        zeroed = dict(
            params, **{f"{branch}_v_proj": jax.tree.map(jnp.zeros_like, params[f"{branch}_v_proj"])}
        )
        assert _max_diff(_forward(NSA, zeroed, x, pos)[0], y) > 1e-3, branch


def test_nsa_decode_tokens_formula():
    """Paper Table 4 at the default l, d, l', n, w (§8.4)."""
    cfg = NSAConfig()
    assert [cfg.decode_tokens(s) for s in (8192, 16384, 32768, 65536)] == [2047, 2559, 3583, 5631]


# --------------------------------------------------------------------------------------------
# Both kinds: caches, causality


@pytest.mark.parametrize("kind", ["moba", "nsa"])
def test_chunked_prefill_then_decode_equals_full_forward(kind):
    """Chunks of 3, 5, 1, 5 tokens then single tokens (crossing block, stride and window
    boundaries) through the cache == one full forward."""
    cfg, params = CONFIGS[kind], _params(kind)
    x, pos = _inputs()
    full, _ = _forward(cfg, params, x, pos)
    cache = MODULES[kind].init_cache(cfg, SETTINGS, B, 24, jnp.float32)
    outs = []
    for start, stop in [(0, 3), (3, 8), (8, 9), (9, 14)] + [(t, t + 1) for t in range(14, T)]:
        y, cache = _forward(cfg, params, x[:, start:stop], pos[:, start:stop], cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=3e-5, rtol=3e-5)
    assert int(cache.index) == T
    if kind == "moba":
        assert isinstance(cache, MoBACache) and cache.means.shape == (B, 6, 2, 8)
        # complete blocks hold the mean of their cached keys
        blocks = np.asarray(cache.k[:, :20]).reshape(B, 5, 4, 2, 8).mean(axis=2)
        np.testing.assert_allclose(cache.means[:, :5], blocks, atol=1e-6)
    else:
        assert isinstance(cache, NSACache)
        assert cache.k_win.shape == (B, NSA.window, 2, 8) and cache.k_raw.shape == (B, 4, 2, 8)
        assert cache.k_cmp.shape == (B, 11, 2, 8)  # floor((24 - 4) / 2) + 1


@functools.cache
def _output_grads(kind):
    """d(sum_j y[:, t, j] p_j)/dx for every t: [T, B, T, D]."""
    cfg, params = CONFIGS[kind], _params(kind)
    x, pos = _inputs()
    probe = jnp.asarray(np.random.default_rng(3).standard_normal(SETTINGS.hidden_size))

    def grad_at(t):
        return jax.grad(lambda x: jnp.sum(_run(cfg)(params, x, pos, None)[0][0][:, t] @ probe))(x)

    return jax.jit(jax.vmap(grad_at), compiler_options=FAST)(jnp.arange(T))


@pytest.mark.parametrize("kind", ["moba", "nsa"])
def test_causality_by_gradients(kind):
    """No gradient from a later input to an earlier output; every earlier input matters for
    some later output (x is mixed at least by the current block / window)."""
    g = np.abs(np.asarray(_output_grads(kind))).sum(axis=(1, 3))  # [t, s]
    future = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(g[future] == 0)
    assert np.all(np.diag(g) > 0)
    assert np.mean(g[np.tril_indices(T, -1)] > 0) > 0.5


# --------------------------------------------------------------------------------------------
# Decoder, sharding


# The dense-mask forms compile several times faster; the efficient ones are checked against
# them above, and the cached path is the same for both.
HYBRID = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, scan_layers=True,
    layer_pattern=("moba", "nsa"), init_std=0.2,
    attention={
        "moba": dataclasses.replace(MOBA, implementation="reference"),
        "nsa": dataclasses.replace(NSA, implementation="reference"),
    },
)  # fmt: skip


def test_decoder_prefill_then_decode_equals_full_forward():
    """A scanned ("moba", "nsa") decoder: prefill 6 tokens, then decode one at a time."""
    model = Decoder(HYBRID)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (B, 11)), jnp.int32)
    init = jax.jit(model.init, compiler_options=FAST)
    params = {"params": nn.meta.unbox(init(jax.random.key(1), tokens))["params"]}
    apply = jax.jit(model.apply, compiler_options=FAST)
    full, _ = apply(params, tokens)
    caches = init_caches(HYBRID, batch_size=B, max_length=16)
    logits, caches = apply(params, tokens[:, :6], jnp.broadcast_to(jnp.arange(6), (B, 6)), caches)
    outs = [logits]
    for t in range(6, 11):
        logits, caches = apply(params, tokens[:, t : t + 1], jnp.full((B, 1), t), caches)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=3e-5, rtol=3e-5)
    moba_cache, nsa_cache = caches["groups"]
    assert isinstance(moba_cache, MoBACache) and isinstance(nsa_cache, NSACache)
    assert moba_cache.k.shape == (1, B, 16, 2, 8) and int(nsa_cache.index[0]) == 11


def _train(mesh_spec: str, steps: int = 2):
    devices = jax.devices()[:1] if mesh_spec == "data=1" else None
    mesh = sharding.make_mesh(mesh_spec, devices=devices)
    optimizer = optax.sgd(0.3)
    tokens = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    state, shardings = training.init_train_state(
        HYBRID, optimizer, jax.random.key(0), mesh, seq_len=16
    )
    step = training.build_trainer(HYBRID, optimizer, mesh, shardings, batch)
    losses = []
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return state, losses


def test_sharded_train_step_equals_single_device():
    """Two SGD steps of the ("moba", "nsa") model on data 2 · fsdp 2 · tensor 2 == one device."""
    ref_state, ref_losses = _train("data=1")
    state, losses = _train("data=2,fsdp=2,tensor=2")
    assert losses[1] < losses[0]
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    layers = state.params["params"]["layers"]
    q = layers["layer_0"]["attention"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.P(None, "fsdp", "tensor", None)
    w1 = layers["layer_1"]["attention"]["k_compress"]["w1"]
    assert w1.sharding.spec == jax.P(None, "tensor", None, None)


# --------------------------------------------------------------------------------------------
# Configs


def test_bad_configs_give_clear_errors():
    cases = [
        (MoBAConfig, dict(block_size=0), "moba.block_size=0 must be a positive integer"),
        (MoBAConfig, dict(top_k=0), r"moba.top_k=0 must be an integer >= 1"),
        (MoBAConfig, dict(num_heads=6, num_kv_heads=4), "moba.num_heads=6 is not divisible"),
        (MoBAConfig, dict(implementation="naive"), r"moba.implementation='naive' is not one of"),
        (NSAConfig, dict(cmp_stride=64), "nsa.cmp_stride=64 must be <= nsa.cmp_block=32"),
        (NSAConfig, dict(num_selected=2), r"nsa.num_selected=2 must be >= .* = 3"),
        (NSAConfig, dict(window=0), "nsa.window=0 must be a positive integer"),
        (NSAConfig, dict(num_local=-1), "nsa.num_local=-1 must be an integer >= 0"),
        (NSAConfig, dict(compress_hidden=0), "nsa.compress_hidden=0"),
        (NSAConfig, dict(implementation="fla"), r"nsa.implementation='fla' is not one of"),
    ]
    for cls, kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            cls(**kwargs)
    with pytest.raises(ConfigError, match="num_full_layers=5"):
        layerwise_hybrid(MOBA, num_layers=4, num_full_layers=5)


def test_layerwise_hybrid_and_round_trip():
    """Paper §3.3: the last N layers full attention; the GQA layers share MoBA's heads."""
    hybrid = layerwise_hybrid(MOBA, num_layers=4, num_full_layers=1)
    model = ModelConfig(num_layers=4, **hybrid)
    assert model.layer_pattern == ("moba", "moba", "moba", "gqa")
    assert [a.kind for a in model.layer_attention] == ["moba", "moba", "moba", "gqa"]
    assert model.attention["gqa"] == MOBA.full_attention()
    for attention in (MOBA, NSA):
        config = ModelConfig(layer_pattern=(attention.kind,), attention={attention.kind: attention})
        assert from_dict(ModelConfig, to_dict(config)) == config
    assert MOBA.sparsity(32768) == pytest.approx(1 - 4 * 2 / 32768)
