"""Dense attention: reference einsum form == jax.nn.dot_product_attention; masks; sinks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops import attention


def _qkv(key, B=2, T=6, S=6, N=4, K=2, H=8, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    return (
        jax.random.normal(kq, (B, T, N, H), dtype),
        jax.random.normal(kk, (B, S, K, H), dtype),
        jax.random.normal(kv, (B, S, K, H), dtype),
    )


def _positions(B, T, start=0):
    return jnp.broadcast_to(jnp.arange(start, start + T), (B, T))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_reference_equals_xla(dtype, tol):
    q, k, v = _qkv(jax.random.key(0), dtype=dtype)
    pos = _positions(2, 6)
    mask = attention.causal_mask(pos, pos)
    ref = attention.dot_product_attention(q, k, v, mask, implementation="reference")
    fast = attention.dot_product_attention(q, k, v, mask, implementation="xla")
    np.testing.assert_allclose(
        np.asarray(ref, np.float32), np.asarray(fast, np.float32), atol=tol, rtol=tol
    )


def test_gqa_equals_mha_with_repeated_kv_heads():
    q, k, v = _qkv(jax.random.key(1))
    pos = _positions(2, 6)
    mask = attention.causal_mask(pos, pos)
    gqa = attention.attention_reference(q, k, v, mask, scale=0.3)
    mha = attention.attention_reference(
        q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), mask, scale=0.3
    )
    np.testing.assert_allclose(gqa, mha, atol=1e-6)


def test_first_query_copies_first_value_and_window_limits_keys():
    q, k, v = _qkv(jax.random.key(2), N=2, K=2)
    pos = _positions(2, 6)
    out = attention.attention_reference(q, k, v, attention.causal_mask(pos, pos), scale=1.0)
    np.testing.assert_allclose(out[:, 0], v[:, 0], atol=1e-6)
    windowed = attention.attention_reference(
        q, k, v, attention.causal_mask(pos, pos, window=1), scale=1.0
    )
    np.testing.assert_allclose(windowed, v, atol=1e-6)  # window 1 = attend only to self


def test_sink_rescales_ordinary_attention():
    """Oracle §8.3: out_sink = out * 1 / (1 + exp(sink - LSE))."""
    q, k, v = _qkv(jax.random.key(3), N=2, K=1)
    pos = _positions(2, 6)
    mask = attention.causal_mask(pos, pos)
    sink = jnp.array([0.5, -1.0])
    plain = attention.attention_reference(q, k, v, mask, scale=0.5)
    with_sink = attention.attention_reference(q, k, v, mask, scale=0.5, sink_N=sink)
    logits = attention.attention_logits(q, k, scale=0.5)  # [B, K, G, T, S]
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    lse_BTN = jnp.moveaxis(jax.nn.logsumexp(logits, axis=-1).reshape(2, 2, 6), 1, 2)
    factor = 1.0 / (1.0 + jnp.exp(sink - lse_BTN))
    np.testing.assert_allclose(with_sink, plain * factor[..., None], atol=1e-5)


def test_max_logits_per_head_ignores_masked_entries():
    q = jnp.zeros((1, 2, 2, 4)).at[0, 0, 1, 0].set(10.0)
    k = jnp.zeros((1, 2, 1, 4)).at[0, 1, 0, 0].set(1.0)  # only the masked pair (t=0, s=1) is big
    pos = _positions(1, 2)
    got = attention.max_logits_per_head(q, k, attention.causal_mask(pos, pos), scale=1.0)
    np.testing.assert_allclose(got, [0.0, 0.0])
    got_full = attention.max_logits_per_head(q, k, jnp.ones((1, 2, 2), bool), scale=1.0)
    np.testing.assert_allclose(got_full, [0.0, 10.0])


def test_bad_arguments_raise_clear_errors():
    q, k, v = _qkv(jax.random.key(4), N=3, K=2)
    with pytest.raises(ValueError, match="query heads 3 are not divisible by kv heads 2"):
        attention.dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="implementation='flash'"):
        attention.dot_product_attention(q, k[:, :, :1], v[:, :, :1], implementation="flash")
