"""MoBA — Mixture of Block Attention (Moonshot AI, arXiv 2502.13189) as the attention kind "moba".

A GQA layer (same parameters and names as `GQAttention`: q_proj [D, N, H], k_proj / v_proj
[D, K, H], o_proj [N, H, D], RoPE on q and k) whose attention core is MoBA
(`jaxmodels/ops/moba.py`, facts in reference/attention.md §4, oracles §8.5): keys are split into
blocks of `block_size`, each query head scores the blocks entirely in its past by
``<q, mean(K_block)>``, keeps the `top_k - 1` best plus its own block (attended causally) —
`top_k` counts the current block, as the official code — and attends to their tokens only.
The gate has no parameters, so a checkpoint of this layer is a GQA checkpoint and vice versa.

Full forward (training): `moba_attention(implementation="efficient")` (current block by
block-diagonal attention + gathered history blocks, merged by log-sum-exp; paper Algorithm 1)
or the naive masked form with ``implementation="reference"``.

Cache (`MoBACache`): the KV cache plus a float32 cache of block means [B, ceil(S/block), K, H].
A token that completes a block writes that block's mean (`moba_update_block_means`), so a decode
step reads the P block means and ``top_k`` blocks of keys/values — O(S / block + top_k · block)
— instead of recomputing every mean from the whole key cache, which would read all S keys per
step and cost as much memory traffic as dense attention over the keys. The means cost 1/block of
the key cache (2/block in float32 against a bf16 cache). Cached calls (prefill with an empty
cache, then decode) run the chunk's attention token by token (`jax.lax.scan` of `moba_decode`,
projections batched), which equals the full forward exactly; the paper's gate is applied at decode
time too (the official release decodes with full attention).

Layer-wise hybrid (paper §3.3, Llama-8B-1M-MoBA: last 3 of 32 layers full attention): a layer
pattern mixing "moba" and "gqa" labels, e.g. ``ModelConfig(num_layers=8,
**layerwise_hybrid(moba, num_layers=8, num_full_layers=2))``; the GQA layers reuse the MoBA
config's heads and RoPE (`MoBAConfig.full_attention`), so the parameter trees match.
"""

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels import registry
from jaxmodels.attention.gqa import GQAConfig, write_cache
from jaxmodels.config import (
    AttentionConfig,
    BlockSettings,
    RopeConfig,
    check,
    check_choice,
    check_positive,
)
from jaxmodels.layers import dense
from jaxmodels.ops import attention as attention_ops
from jaxmodels.ops import moba as moba_ops
from jaxmodels.ops import rope as rope_ops
from sharding.rules import constrain

IMPLEMENTATIONS = ("efficient", "reference")


@dataclasses.dataclass(frozen=True)
class MoBAConfig(AttentionConfig):
    """GQA projections with MoBA attention (official names: ``moba_chunk_size``, ``moba_topk``).

    Attributes:
      num_heads, num_kv_heads, head_dim, rope: as `GQAConfig`.
      block_size: key block length B (paper: 512 at 8K-32K, 4096 at 1M).
      top_k: blocks attended per query head, the always-selected current block included
        (paper: 3; 12 at 1M).
      implementation: full-forward form, "efficient" (gathered blocks, LSE merge) or
        "reference" (dense [T, S] mask, ``moba_naive.py``).
    """

    kind = "moba"
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 64
    rope: RopeConfig = RopeConfig()
    block_size: int = 512
    top_k: int = 3
    implementation: str = "efficient"

    def __post_init__(self):
        check_positive(
            "moba",
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            block_size=self.block_size,
        )
        check(
            isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 1,
            f"moba.top_k={self.top_k!r} must be an integer >= 1 (it counts the current block)",
        )
        check(
            self.num_heads % self.num_kv_heads == 0,
            f"moba.num_heads={self.num_heads} is not divisible by "
            f"moba.num_kv_heads={self.num_kv_heads}",
        )
        check(self.head_dim % 2 == 0, f"moba.head_dim={self.head_dim} must be even for RoPE")
        check_choice("moba", "implementation", self.implementation, IMPLEMENTATIONS)

    def full_attention(self) -> GQAConfig:
        """The dense GQA layer with the same heads and RoPE (the same parameter tree)."""
        return GQAConfig(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope=self.rope,
        )

    def sparsity(self, seq_len: int) -> float:
        """The paper's sparsity ``1 - block_size * top_k / seq_len`` (§3.1)."""
        return moba_ops.moba_sparsity(seq_len, self.block_size, self.top_k)


def layerwise_hybrid(moba: MoBAConfig, num_layers: int, num_full_layers: int) -> dict:
    """``layer_pattern`` and ``attention`` for `ModelConfig`: MoBA in the first layers, full
    attention (GQA, same parameters) in the last ``num_full_layers`` (paper §3.3).

    ``ModelConfig(num_layers=L, **layerwise_hybrid(moba, L, 3))``.
    """
    check_positive("moba hybrid", num_layers=num_layers)
    check(
        isinstance(num_full_layers, int) and 0 <= num_full_layers <= num_layers,
        f"num_full_layers={num_full_layers!r} must be an integer in [0, num_layers={num_layers}]",
    )
    pattern = ("moba",) * (num_layers - num_full_layers) + ("gqa",) * num_full_layers
    return dict(layer_pattern=pattern, attention={"moba": moba, "gqa": moba.full_attention()})


def rope_frequencies(rope: RopeConfig, dim: int) -> np.ndarray:
    """Inverse RoPE frequencies [dim / 2] for `rope` (YaRN when ``rope.yarn_factor`` is set)."""
    if rope.yarn_factor is None:
        return rope_ops.rope_inv_freq(dim, rope.theta)
    return rope_ops.yarn_inv_freq(
        dim,
        rope.theta,
        rope.yarn_factor,
        rope.original_max_position_embeddings,
        rope.beta_fast,
        rope.beta_slow,
    )


@flax.struct.dataclass
class MoBACache:
    """KV cache plus MoBA's block means.

    Attributes:
      k, v: [B, S, K, H]; slot s holds position s.
      means: float32 [B, ceil(S / block_size), K, H]; entry p is the mean key of block p once
        that block is complete (incomplete blocks are never read by the gate).
      index: int32 [] number of filled slots.
    """

    k: jax.Array
    v: jax.Array
    means: jax.Array
    index: jax.Array


class MoBAttention(nn.Module):
    """MoBA layer: `(x_BTD, positions_BT, cache) -> (y_BTD, cache)` (see `registry`)."""

    config: MoBAConfig
    settings: BlockSettings

    @classmethod
    def init_cache(cls, config: MoBAConfig, settings, batch_size: int, max_length: int, dtype):
        K, H = config.num_kv_heads, config.head_dim
        shape = (batch_size, max_length, K, H)
        blocks = -(-max_length // config.block_size)
        return MoBACache(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            means=jnp.zeros((batch_size, blocks, K, H), jnp.float32),
            index=jnp.zeros((), jnp.int32),
        )

    @classmethod
    def cache_logical_axes(cls, config: MoBAConfig):
        axes = ("cache_batch", "cache_length", "cache_heads", "head_dim")
        return MoBACache(k=axes, v=axes, means=axes, index=())

    @nn.compact
    def __call__(self, x_BTD, positions_BT, cache: MoBACache | None = None):
        cfg, s = self.config, self.settings
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if cache is not None and not isinstance(cache, MoBACache):
            raise TypeError(
                f"a moba layer needs a MoBACache, got {type(cache).__name__}; build caches with "
                "MoBAttention.init_cache (or jaxmodels.model.init_caches)"
            )
        q_BTNH = dense((N, H), ("embed", "heads", "head_dim"), s, name="q_proj")(x_BTD)
        k_BTKH = dense((K, H), ("embed", "kv_heads", "head_dim"), s, name="k_proj")(x_BTD)
        v_BTKH = dense((K, H), ("embed", "kv_heads", "head_dim"), s, name="v_proj")(x_BTD)
        inv_freq = rope_frequencies(cfg.rope, H)
        q_BTNH = rope_ops.apply_rope(q_BTNH, positions_BT, inv_freq, layout=cfg.rope.layout)
        k_BTKH = rope_ops.apply_rope(k_BTKH, positions_BT, inv_freq, layout=cfg.rope.layout)
        q_BTNH = constrain(q_BTNH, ("batch", "length", "act_heads", "head_dim"))
        k_BTKH = constrain(k_BTKH, ("batch", "length", "act_kv_heads", "head_dim"))
        v_BTKH = constrain(v_BTKH, ("batch", "length", "act_kv_heads", "head_dim"))
        scale = rope_ops.softmax_scale(
            H, yarn_factor=cfg.rope.yarn_factor, mscale_all_dim=cfg.rope.mscale_all_dim
        )
        moba = dict(block_size=cfg.block_size, top_k=cfg.top_k, scale=scale)

        if cache is None:
            out_BTNH = moba_ops.moba_attention(
                q_BTNH, k_BTKH, v_BTKH, implementation=cfg.implementation, **moba
            )
            new_cache = None
            if self.is_mutable_collection("attn_stats"):
                self._sow_max_logits(q_BTNH, k_BTKH, scale)
        else:
            out_BTNH, new_cache = self._cached(cache, q_BTNH, k_BTKH, v_BTKH, moba)
        out_BTNH = constrain(out_BTNH, ("batch", "length", "act_heads", "head_dim"))
        y_BTD = dense(
            s.hidden_size, ("heads", "head_dim", "embed"), s, axis=(-2, -1), name="o_proj"
        )(out_BTNH)
        return constrain(y_BTD, ("batch", "length", "act_embed")), new_cache

    def _cached(self, cache: MoBACache, q_BTNH, k_BTKH, v_BTKH, moba):
        """Writes the chunk's tokens one at a time and attends each with `moba_decode`."""

        def step(carry, new):
            k_BSKH, v_BSKH, means_BPKH, index = carry
            q_BNH, k_BKH, v_BKH = new
            k_BSKH = write_cache(k_BSKH, k_BKH[:, None], index)
            v_BSKH = write_cache(v_BSKH, v_BKH[:, None], index)
            length = index + 1
            means_BPKH = moba_ops.moba_update_block_means(
                means_BPKH, k_BSKH, length, block_size=moba["block_size"]
            )
            out_BNH = moba_ops.moba_decode(
                q_BNH,
                k_BSKH.astype(q_BNH.dtype),
                v_BSKH.astype(q_BNH.dtype),
                length,
                block_means_BPKH=means_BPKH,
                **moba,
            )
            return (k_BSKH, v_BSKH, means_BPKH, length), out_BNH

        chunk = tuple(jnp.swapaxes(a, 0, 1) for a in (q_BTNH, k_BTKH, v_BTKH))
        carry = (cache.k, cache.v, cache.means, cache.index)
        (k, v, means, index), out_TBNH = jax.lax.scan(step, carry, chunk)
        return jnp.swapaxes(out_TBNH, 0, 1), MoBACache(k=k, v=v, means=means, index=index)

    def _sow_max_logits(self, q_BTNH, k_BTKH, scale):
        """Per-head max of the logits MoBA actually computes (selected blocks, causal), [N]."""
        B, T, N, _ = q_BTNH.shape
        K = k_BTKH.shape[2]
        mask_BNTS = moba_ops.moba_mask(
            q_BTNH, k_BTKH, block_size=self.config.block_size, top_k=self.config.top_k
        )
        logits_BKGTS = attention_ops.attention_logits(q_BTNH, k_BTKH, scale=scale)
        mask_BKGTS = mask_BNTS.reshape(B, K, N // K, T, T)
        max_N = jnp.max(jnp.where(mask_BKGTS, logits_BKGTS, -jnp.inf), axis=(0, 3, 4))
        self.sow(
            "attn_stats",
            "max_logits",
            max_N.reshape(N).astype(jnp.float32),
            init_fn=lambda: jnp.full((N,), -jnp.inf, jnp.float32),
            reduce_fn=jnp.maximum,
        )


registry.register_attention(MoBAConfig, MoBAttention)
