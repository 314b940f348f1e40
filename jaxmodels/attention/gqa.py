"""Baseline multi-head / grouped-query attention with RoPE and a KV cache.

MHA when num_kv_heads == num_heads, MQA when 1 (Ainslie et al. 2023, GQA). Projections are
per-head: q_proj [D, N, H], k_proj / v_proj [D, K, H], o_proj [N, H, D].
"""

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxmodels import registry
from jaxmodels.config import AttentionConfig, BlockSettings, RopeConfig, check, check_positive
from jaxmodels.layers import dense
from jaxmodels.ops import attention as attention_ops
from jaxmodels.ops import rope as rope_ops
from sharding.rules import constrain


@dataclasses.dataclass(frozen=True)
class GQAConfig(AttentionConfig):
    """Grouped-query attention (HF `num_attention_heads`, `num_key_value_heads`, `head_dim`).

    Attributes:
      implementation: "xla" (jax.nn.dot_product_attention), "reference" or "cudnn".
      sliding_window: if set, each query sees only the last `sliding_window` positions.
    """

    kind = "gqa"
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 64
    rope: RopeConfig = RopeConfig()
    implementation: str = "xla"
    sliding_window: int | None = None

    def __post_init__(self):
        check_positive("gqa", num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)
        check_positive("gqa", head_dim=self.head_dim)
        check(
            self.num_heads % self.num_kv_heads == 0,
            f"gqa.num_heads={self.num_heads} is not divisible by "
            f"gqa.num_kv_heads={self.num_kv_heads}",
        )
        check(self.head_dim % 2 == 0, f"gqa.head_dim={self.head_dim} must be even for RoPE")
        check(
            self.implementation in attention_ops.IMPLEMENTATIONS,
            f"gqa.implementation={self.implementation!r} is not one of "
            f"{list(attention_ops.IMPLEMENTATIONS)}",
        )
        check(
            self.sliding_window is None or self.sliding_window > 0,
            f"gqa.sliding_window={self.sliding_window!r} must be None or positive",
        )


@flax.struct.dataclass
class KVCache:
    """Per-head keys and values of the tokens seen so far.

    Attributes:
      k, v: [B, S, K, H] (S = max length); slot s holds position s.
      index: int32 [] number of filled slots (the position of the next token).
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array


def write_cache(buffer_BS: jax.Array, new_BT: jax.Array, index: jax.Array) -> jax.Array:
    """Writes `new_BT` (leading dims B, T) into `buffer_BS` at slot `index` along axis 1."""
    start = (0, index) + (0,) * (buffer_BS.ndim - 2)
    return jax.lax.dynamic_update_slice(buffer_BS, new_BT.astype(buffer_BS.dtype), start)


def cache_mask(positions_BT: jax.Array, index: jax.Array, max_length: int, window=None):
    """Mask [B, T, S] of cache slots visible to the new tokens (filled, not after the query)."""
    batch, new = positions_BT.shape
    slots_BS = jnp.broadcast_to(jnp.arange(max_length), (batch, max_length))
    valid_BS = slots_BS < index + new
    return attention_ops.causal_mask(positions_BT, slots_BS, kv_valid_BS=valid_BS, window=window)


class GQAttention(nn.Module):
    config: GQAConfig
    settings: BlockSettings

    @classmethod
    def init_cache(cls, config: GQAConfig, settings, batch_size: int, max_length: int, dtype):
        shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
        return KVCache(
            k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), index=jnp.zeros((), jnp.int32)
        )

    @classmethod
    def cache_logical_axes(cls, config: GQAConfig):
        axes = ("cache_batch", "cache_length", "cache_heads", "head_dim")
        return KVCache(k=axes, v=axes, index=())

    @nn.compact
    def __call__(self, x_BTD, positions_BT, cache: KVCache | None = None):
        cfg, s = self.config, self.settings
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_BTNH = dense((N, H), ("embed", "heads", "head_dim"), s, name="q_proj")(x_BTD)
        k_BTKH = dense((K, H), ("embed", "kv_heads", "head_dim"), s, name="k_proj")(x_BTD)
        v_BTKH = dense((K, H), ("embed", "kv_heads", "head_dim"), s, name="v_proj")(x_BTD)
        q_BTNH = constrain(q_BTNH, ("batch", "length", "act_heads", "head_dim"))
        k_BTKH = constrain(k_BTKH, ("batch", "length", "act_kv_heads", "head_dim"))
        v_BTKH = constrain(v_BTKH, ("batch", "length", "act_kv_heads", "head_dim"))

        rope = cfg.rope
        if rope.yarn_factor is None:
            inv_freq = rope_ops.rope_inv_freq(H, rope.theta)
        else:
            inv_freq = rope_ops.yarn_inv_freq(
                H,
                rope.theta,
                rope.yarn_factor,
                rope.original_max_position_embeddings,
                rope.beta_fast,
                rope.beta_slow,
            )
        q_BTNH = rope_ops.apply_rope(q_BTNH, positions_BT, inv_freq, layout=rope.layout)
        k_BTKH = rope_ops.apply_rope(k_BTKH, positions_BT, inv_freq, layout=rope.layout)
        scale = rope_ops.softmax_scale(
            H, yarn_factor=rope.yarn_factor, mscale_all_dim=rope.mscale_all_dim
        )

        if cache is None:
            keys_BSKH, values_BSKH = k_BTKH, v_BTKH
            mask_BTS = attention_ops.causal_mask(
                positions_BT, positions_BT, window=cfg.sliding_window
            )
            new_cache = None
        else:
            keys_BSKH = write_cache(cache.k, k_BTKH, cache.index)
            values_BSKH = write_cache(cache.v, v_BTKH, cache.index)
            mask_BTS = cache_mask(
                positions_BT, cache.index, keys_BSKH.shape[1], window=cfg.sliding_window
            )
            new_cache = KVCache(k=keys_BSKH, v=values_BSKH, index=cache.index + x_BTD.shape[1])
            keys_BSKH = keys_BSKH.astype(q_BTNH.dtype)
            values_BSKH = values_BSKH.astype(q_BTNH.dtype)

        if self.is_mutable_collection("attn_stats"):
            self.sow(
                "attn_stats",
                "max_logits",
                attention_ops.max_logits_per_head(q_BTNH, keys_BSKH, mask_BTS, scale=scale),
                init_fn=lambda: jnp.full((N,), -jnp.inf, jnp.float32),
                reduce_fn=jnp.maximum,
            )
        out_BTNH = attention_ops.dot_product_attention(
            q_BTNH,
            keys_BSKH,
            values_BSKH,
            mask_BTS,
            scale=scale,
            implementation=cfg.implementation,
        )
        out_BTNH = constrain(out_BTNH, ("batch", "length", "act_heads", "head_dim"))
        y_BTD = dense(
            s.hidden_size, ("heads", "head_dim", "embed"), s, axis=(-2, -1), name="o_proj"
        )(out_BTNH)
        return constrain(y_BTD, ("batch", "length", "act_embed")), new_cache


registry.register_attention(GQAConfig, GQAttention)
