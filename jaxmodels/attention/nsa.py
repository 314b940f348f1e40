"""NSA — Native Sparse Attention (DeepSeek, arXiv 2502.11089) as the attention kind "nsa".

Three attention branches over **independent keys and values** (paper §3.2, "to prevent shortcut
learning across branches"; fla's layer shares one k/v), combined per query head by sigmoid gates
computed from the layer input (`jaxmodels/ops/nsa.py`; facts in reference/attention.md §3,
oracles §8.4):

    o_t = g_cmp · Attn(q_t, φ(K_cmp), φ(V_cmp)) + g_slc · Attn(q_t, K_slc[top-n blocks])
          + g_win · Attn(q_t, K_win[t-w+1 .. t])

* compression: blocks of `cmp_block` (l) tokens every `cmp_stride` (d), compressed by a learned
  MLP φ with an intra-block position bias (`ops.nsa.init_compression_params`; one φ for keys,
  one for values, per kv head);
* selection: blocks of `slc_block` (l') ranked by the compression branch's attention mass
  (summed over a GQA group, so the group shares its blocks), top `num_selected` (n) with
  `num_init` initial and `num_local` local blocks forced;
* sliding window of `window` (w) tokens.
Defaults are the paper's l=32, d=16, l'=64, n=16 (1 initial + 2 local), w=512.

Parameters: q_proj [D, N, H]; {cmp,slc,win}_k_proj, {cmp,slc,win}_v_proj [D, K, H]; k_compress /
v_compress {pos [K, l, H], w1 [K, l·H, F], b1 [K, F], w2 [K, F, H], b2 [K, H]}; g_proj
[D, N, 3] (gates cmp, slc, win); o_proj [N, H, D].

RoPE: queries and the selection / window keys are rotated at their positions. Compressed keys are
φ of the raw (unrotated) keys, rotated at the position of the block's last token
(``i·d + l - 1``), so compression scores depend on the distance to the block, not on the absolute
query position. (The paper does not say how RoPE meets φ; this is our choice.)

Cache (`NSACache`): selection keys/values [B, S, K, H] (all positions: any block may be
selected), window ring buffers [B, w, K, H], compression-branch ring buffers of the last l raw
keys/values [B, l, K, H] and the compressed entries [B, M, K, H], M = ⌊(S - l)/d⌋ + 1. A decode
step reads M compressed entries, at most n·l' selected tokens and w window tokens (paper Table 4,
`NSAConfig.decode_tokens`). Cached calls run the chunk token by token (`jax.lax.scan` of
`nsa_update_compressed_cache` + `nsa_decode`, projections batched), which equals the full
forward exactly.

This layer does not sow ``attn_stats/max_logits`` (three key sets; QK-Clip has no NSA targets).
"""

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxmodels import registry
from jaxmodels.attention.gqa import write_cache
from jaxmodels.attention.moba import rope_frequencies
from jaxmodels.config import (
    AttentionConfig,
    BlockSettings,
    RopeConfig,
    check,
    check_choice,
    check_positive,
)
from jaxmodels.layers import dense
from jaxmodels.ops import nsa as nsa_ops
from jaxmodels.ops import rope as rope_ops
from sharding.rules import constrain

IMPLEMENTATIONS = ("efficient", "reference")
BRANCHES = ("cmp", "slc", "win")
COMPRESSION_PARAM_AXES = {
    "pos": ("kv_heads", None, "head_dim"),
    "w1": ("kv_heads", None, None),
    "b1": ("kv_heads", None),
    "w2": ("kv_heads", None, "head_dim"),
    "b2": ("kv_heads", "head_dim"),
}


@dataclasses.dataclass(frozen=True)
class NSAConfig(AttentionConfig):
    """Native Sparse Attention (names follow the paper's l, d, l', n, w; fla: block_size,
    block_counts, window_size).

    Attributes:
      num_heads, num_kv_heads, head_dim, rope: as `GQAConfig` (the paper: 64 query heads in 4
        kv groups).
      cmp_block, cmp_stride: compression block l and stride d (32, 16).
      compress_hidden: hidden width F of φ; None = l · head_dim.
      slc_block: selection block l' (64).
      num_selected: selected blocks n per query and kv group, forced ones included (16).
      num_init, num_local: forced initial blocks and local blocks (the query's own and the ones
        before it) (1, 2).
      window: sliding window w, the query included (512).
      implementation: full-forward form, "efficient" (chunked scoring, gathered blocks, banded
        window) or "reference" (dense masks).
      query_chunk: queries per chunk of the efficient compression / scoring pass.
    """

    kind = "nsa"
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 64
    rope: RopeConfig = RopeConfig()
    cmp_block: int = nsa_ops.CMP_BLOCK
    cmp_stride: int = nsa_ops.CMP_STRIDE
    compress_hidden: int | None = None
    slc_block: int = nsa_ops.SLC_BLOCK
    num_selected: int = nsa_ops.NUM_SELECTED
    num_init: int = 1
    num_local: int = 2
    window: int = nsa_ops.WINDOW
    implementation: str = "efficient"
    query_chunk: int = 512

    def __post_init__(self):
        check_positive(
            "nsa",
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            cmp_block=self.cmp_block,
            cmp_stride=self.cmp_stride,
            slc_block=self.slc_block,
            num_selected=self.num_selected,
            window=self.window,
            query_chunk=self.query_chunk,
        )
        if self.compress_hidden is not None:
            check_positive("nsa", compress_hidden=self.compress_hidden)
        check(
            self.num_heads % self.num_kv_heads == 0,
            f"nsa.num_heads={self.num_heads} is not divisible by "
            f"nsa.num_kv_heads={self.num_kv_heads}",
        )
        check(self.head_dim % 2 == 0, f"nsa.head_dim={self.head_dim} must be even for RoPE")
        check(
            self.cmp_stride <= self.cmp_block,
            f"nsa.cmp_stride={self.cmp_stride} must be <= nsa.cmp_block={self.cmp_block} "
            "(a larger stride would skip tokens)",
        )
        for name in ("num_init", "num_local"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                f"nsa.{name}={value!r} must be an integer >= 0",
            )
        check(
            self.num_init + self.num_local <= self.num_selected,
            f"nsa.num_selected={self.num_selected} must be >= nsa.num_init + nsa.num_local = "
            f"{self.num_init + self.num_local} (the forced blocks count towards it)",
        )
        check_choice("nsa", "implementation", self.implementation, IMPLEMENTATIONS)

    def decode_tokens(self, context_len: int) -> int:
        """Key tokens one decode step loads at context length ``s`` (paper Table 4):
        ``⌊(s - l)/d⌋ + 1 + n·l' + w`` (8K: 2,047 at the defaults)."""
        return nsa_ops.nsa_decode_tokens(
            context_len,
            cmp_block=self.cmp_block,
            cmp_stride=self.cmp_stride,
            slc_block=self.slc_block,
            num_selected=self.num_selected,
            window=self.window,
        )

    @property
    def branch_args(self) -> dict:
        """The branches' block, selection and window arguments of `nsa_attention` and
        `nsa_decode`."""
        return dict(
            cmp_block=self.cmp_block,
            cmp_stride=self.cmp_stride,
            slc_block=self.slc_block,
            num_selected=self.num_selected,
            num_init=self.num_init,
            num_local=self.num_local,
            window=self.window,
        )


@flax.struct.dataclass
class NSACache:
    """Caches of the three branches.

    Attributes:
      k_slc, v_slc: selection keys/values [B, S, K, H], slot s = position s.
      k_win, v_win: window ring buffers [B, w, K, H], position p at slot p % w.
      k_raw, v_raw: ring buffers of the last l raw compression-branch keys/values [B, l, K, H].
      k_cmp, v_cmp: compressed entries φ(block i) [B, M, K, H] (keys unrotated); entry i is
        valid once position ``i·d + l - 1`` has been written.
      index: int32 [] positions written so far.
    """

    k_slc: jax.Array
    v_slc: jax.Array
    k_win: jax.Array
    v_win: jax.Array
    k_raw: jax.Array
    v_raw: jax.Array
    k_cmp: jax.Array
    v_cmp: jax.Array
    index: jax.Array


class Compressor(nn.Module):
    """The parameters of one compression MLP φ (`ops.nsa.init_compression_params`, per kv
    head), returned as the dict the ops take."""

    config: NSAConfig
    settings: BlockSettings

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        cfg = self.config

        def initializer(name):
            def init(key, dtype):
                return nsa_ops.init_compression_params(
                    key,
                    cmp_block=cfg.cmp_block,
                    head_dim=cfg.head_dim,
                    hidden=cfg.compress_hidden,
                    num_kv_heads=cfg.num_kv_heads,
                    dtype=dtype,
                )[name]

            return nn.with_logical_partitioning(init, COMPRESSION_PARAM_AXES[name])

        return {
            name: self.param(name, initializer(name), self.settings.param_dtype)
            for name in COMPRESSION_PARAM_AXES
        }


class NSAttention(nn.Module):
    """NSA layer: `(x_BTD, positions_BT, cache) -> (y_BTD, cache)` (see `registry`)."""

    config: NSAConfig
    settings: BlockSettings

    @classmethod
    def init_cache(cls, config: NSAConfig, settings, batch_size: int, max_length: int, dtype):
        K, H = config.num_kv_heads, config.head_dim
        M = max(1, nsa_ops.nsa_num_compressed(max_length, config.cmp_block, config.cmp_stride))

        def zeros(length):
            return jnp.zeros((batch_size, length, K, H), dtype)

        return NSACache(
            k_slc=zeros(max_length),
            v_slc=zeros(max_length),
            k_win=zeros(config.window),
            v_win=zeros(config.window),
            k_raw=zeros(config.cmp_block),
            v_raw=zeros(config.cmp_block),
            k_cmp=zeros(M),
            v_cmp=zeros(M),
            index=jnp.zeros((), jnp.int32),
        )

    @classmethod
    def cache_logical_axes(cls, config: NSAConfig):
        axes = ("cache_batch", "cache_length", "cache_heads", "head_dim")
        fields = [f.name for f in dataclasses.fields(NSACache) if f.name != "index"]
        return NSACache(**{name: axes for name in fields}, index=())

    @nn.compact
    def __call__(self, x_BTD, positions_BT, cache: NSACache | None = None):
        cfg, s = self.config, self.settings
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if cache is not None and not isinstance(cache, NSACache):
            raise TypeError(
                f"an nsa layer needs an NSACache, got {type(cache).__name__}; build caches with "
                "NSAttention.init_cache (or jaxmodels.model.init_caches)"
            )
        inv_freq = rope_frequencies(cfg.rope, H)

        def rotate(x, positions):
            return rope_ops.apply_rope(x, positions, inv_freq, layout=cfg.rope.layout)

        q_BTNH = dense((N, H), ("embed", "heads", "head_dim"), s, name="q_proj")(x_BTD)
        q_BTNH = constrain(
            rotate(q_BTNH, positions_BT), ("batch", "length", "act_heads", "head_dim")
        )
        kv = {}
        for branch in BRANCHES:
            for part in ("k", "v"):
                y_BTKH = dense(
                    (K, H), ("embed", "kv_heads", "head_dim"), s, name=f"{branch}_{part}_proj"
                )(x_BTD)
                if part == "k" and branch != "cmp":
                    y_BTKH = rotate(y_BTKH, positions_BT)
                kv[part + "_" + branch] = constrain(
                    y_BTKH, ("batch", "length", "act_kv_heads", "head_dim")
                )
        g_BTN3 = dense((N, 3), ("embed", "heads", None), s, name="g_proj")(x_BTD)
        gates_BTN3 = jax.nn.sigmoid(g_BTN3.astype(jnp.float32))
        phi_k = Compressor(cfg, s, name="k_compress")()
        phi_v = Compressor(cfg, s, name="v_compress")()
        scale = rope_ops.softmax_scale(
            H, yarn_factor=cfg.rope.yarn_factor, mscale_all_dim=cfg.rope.mscale_all_dim
        )

        def rotate_compressed(k_BMKH):
            """RoPE of compressed key i at its block's last position i·d + l - 1."""
            B, M = k_BMKH.shape[:2]
            ends_M = jnp.arange(M) * cfg.cmp_stride + cfg.cmp_block - 1
            return rotate(k_BMKH, jnp.broadcast_to(ends_M, (B, M)))

        if cache is None:
            compress = dict(cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride)
            k_cmp = nsa_ops.nsa_compress(kv.pop("k_cmp"), params=phi_k, **compress)
            v_cmp = nsa_ops.nsa_compress(kv.pop("v_cmp"), params=phi_v, **compress)
            out_BTNH = nsa_ops.nsa_attention(
                q_BTNH,
                k_cmp_BMKH=rotate_compressed(k_cmp),
                v_cmp_BMKH=v_cmp,
                k_slc_BSKH=kv["k_slc"],
                v_slc_BSKH=kv["v_slc"],
                k_win_BSKH=kv["k_win"],
                v_win_BSKH=kv["v_win"],
                gates_BTN3=gates_BTN3,
                scale=scale,
                implementation=cfg.implementation,
                query_chunk=cfg.query_chunk,
                **cfg.branch_args,
            )
            new_cache = None
        else:
            out_BTNH, new_cache = self._cached(
                cache, q_BTNH, kv, gates_BTN3, phi_k, phi_v, rotate_compressed, scale
            )
        out_BTNH = constrain(out_BTNH, ("batch", "length", "act_heads", "head_dim"))
        y_BTD = dense(
            s.hidden_size, ("heads", "head_dim", "embed"), s, axis=(-2, -1), name="o_proj"
        )(out_BTNH)
        return constrain(y_BTD, ("batch", "length", "act_embed")), new_cache

    def _cached(self, cache, q_BTNH, kv, gates_BTN3, phi_k, phi_v, rotate_compressed, scale):
        """Writes the chunk's tokens one at a time and attends each with `nsa_decode`."""
        cfg = self.config
        compress = dict(cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride, ring_buffer=True)

        def step(c: NSACache, new):
            q_BNH, g_BN3, x = new
            i = c.index
            c = c.replace(
                k_slc=write_cache(c.k_slc, x["k_slc"][:, None], i),
                v_slc=write_cache(c.v_slc, x["v_slc"][:, None], i),
                k_win=write_cache(c.k_win, x["k_win"][:, None], i % cfg.window),
                v_win=write_cache(c.v_win, x["v_win"][:, None], i % cfg.window),
                k_raw=write_cache(c.k_raw, x["k_cmp"][:, None], i % cfg.cmp_block),
                v_raw=write_cache(c.v_raw, x["v_cmp"][:, None], i % cfg.cmp_block),
                index=i + 1,
            )
            c = c.replace(
                k_cmp=nsa_ops.nsa_update_compressed_cache(
                    c.k_cmp, c.k_raw, c.index, params=phi_k, **compress
                ),
                v_cmp=nsa_ops.nsa_update_compressed_cache(
                    c.v_cmp, c.v_raw, c.index, params=phi_v, **compress
                ),
            )
            dtype = q_BNH.dtype
            out_BNH = nsa_ops.nsa_decode(
                q_BNH,
                k_cmp_BMKH=rotate_compressed(c.k_cmp.astype(dtype)),
                v_cmp_BMKH=c.v_cmp.astype(dtype),
                k_slc_BSKH=c.k_slc.astype(dtype),
                v_slc_BSKH=c.v_slc.astype(dtype),
                k_win_BSKH=c.k_win.astype(dtype),
                v_win_BSKH=c.v_win.astype(dtype),
                gates_BN3=g_BN3,
                cache_len_B=c.index,
                scale=scale,
                window_ring_buffer=True,
                **cfg.branch_args,
            )
            return c, out_BNH

        chunk = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), (q_BTNH, gates_BTN3, kv))
        new_cache, out_TBNH = jax.lax.scan(step, cache, chunk)
        return jnp.swapaxes(out_TBNH, 0, 1), new_cache


registry.register_attention(NSAConfig, NSAttention)
