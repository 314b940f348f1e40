"""DeepSeek-V4 hybrid attention: sliding window + compressed sparse (CSA) / heavily compressed
(HCA) attention, as one attention kind ("v4") whose `compress_ratio` picks the layer type.

DeepSeek-V4 (README; deepseek-ai/DeepSeek-V4-Flash `inference/model.py` `Attention`,
`Compressor`, `Indexer`; Hugging Face `transformers/models/deepseek_v4` `DeepseekV4Attention`).
Facts: reference/attention.md §2.4. Per layer:

  q:  c = q_a_norm(q_a_proj(x)) [B,T,C] -> q_b_proj [B,T,N,H] -> parameter-free RMS norm per
      head -> interleaved RoPE on the last R dims;
  kv: kv_norm(kv_proj(x)) [B,T,H], one head used as key AND value, RoPE on the last R dims;
  candidates: sliding window (last `sliding_window` tokens incl. self) + compressed entries
      (ratio 0: none; HCA: every complete entry; CSA: the indexer's top `index_topk`);
  softmax scale H^-0.5 (no YaRN mscale) and a learned per-head sink;
  out: inverse RoPE on the last R dims of o, then the grouped low-rank projection
      (`o_groups` groups -> `o_lora_rank` each -> D).

Per-layer ratios are data: V4-Flash's `compress_ratios` [0, 0, 4, 128, 4, 128, ...] is

    ModelConfig(layer_pattern=("v4_window", "v4_window") + ("v4_csa", "v4_hca") * 20 + ...,
                attention={"v4_window": V4Config(compress_ratio=0, ...),
                           "v4_csa": V4Config(compress_ratio=4, ...),
                           "v4_hca": V4Config(compress_ratio=128, ...)})

(`layer_pattern_from_ratios` builds both from such a list.)

Indexer training (CSA): the top-k selection is discrete, so the language-model loss never
reaches the indexer; it learns from DeepSeek-V3.2's indexer KL (§2.1, `ops.dsa.indexer_kl`),
sown as ``("losses", "indexer_kl")`` exactly as a DSA layer does (`jaxmodels.attention.dsa`):
a float32 scalar per CSA layer, the KL averaged over batch and queries times
`index_loss_weight`, added to the loss by `jaxmodels.training.make_train_step`. Target: the
main attention's probabilities (window and sink included) at the indexer's entries, summed over
heads and L1-normalised. `indexer_stage`:
  * "sparse" (default): top-k attention; KL over the selected entries;
  * "dense_warmup": every visible compressed entry is attended (no top-k); KL over all of them
    (the paper then freezes everything but the indexer: `dsa.dsa_freeze(opt, "dense_warmup")`,
    whose mask covers the `indexer/` parameters of V4 layers too);
  * "off": top-k attention, no loss.
The indexer reads a detached x and query latent and the target is stopped, so
∂L_LM/∂indexer = 0 and ∂L_I/∂(everything else) = 0. Only the full forward (no cache) sows.

Decode cache (`V4Cache`): the window ring buffer (last `sliding_window` keys), and per
compressor (main, and the CSA indexer's) the compressed entries plus a ring of the raw
projections of the partial block not yet compressed (and, for the overlapping CSA form, the
previous block, whose first-half channels the next entry pools).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels import registry
from jaxmodels.attention.dsa import LOSS_COLLECTION, check_indexer_training, sow_indexer_loss
from jaxmodels.config import (
    AttentionConfig,
    BlockSettings,
    RopeConfig,
    check,
    check_choice,
    check_positive,
)
from jaxmodels.layers import RMSNorm, dense
from jaxmodels.ops import dsa as dsa_ops
from jaxmodels.ops import rope as rope_ops
from jaxmodels.ops import v4_attention as ops
from jaxmodels.ops.norms import rms_norm
from sharding.rules import constrain


@dataclasses.dataclass(frozen=True)
class V4Config(AttentionConfig):
    """One DeepSeek-V4 attention layer (field names: the HF `DeepseekV4Config` keys).

    Attributes:
      num_attention_heads: N query heads.
      head_dim: H, the width of every query head and of the single shared KV head.
      qk_rope_head_dim: R rotary dims at the end of every head (HF `partial_rotary_factor` *
        head_dim; V4-Flash 64 of 512). The indexer rotates the last R of its heads too.
      q_lora_rank: C, the query latent.
      o_groups: G groups of N/G heads in the grouped output projection.
      o_lora_rank: O, each group's output width (G*O are then mixed to D).
      sliding_window: window incl. the query itself (V4: 128).
      compress_ratio: 0/None window only; r > 0 pools every r tokens into one entry (V4: 4 for
        CSA, 128 for HCA; the official config's per-layer `compress_ratios`).
      csa: overlapping two-window compression + indexer top-k (CSA); None: compress_ratio == 4,
        V4's rule. False with a ratio gives HCA (dense over every complete entry).
      index_n_heads: CSA lightning-indexer heads.
      index_head_dim: CSA lightning-indexer head dim (its compressed keys are this wide).
      index_topk: compressed entries each query keeps (CSA).
      indexer_stage: "sparse", "dense_warmup" or "off": how the CSA indexer trains (module
        docstring; the same field as `DSAConfig`'s).
      index_loss_weight: multiplies the sown indexer KL (CSA).
      rope_theta: RoPE base of window-only layers (no YaRN, as V4).
      compress_rope_theta: RoPE base of compressed layers (every rotation in them: q, window kv,
        entries, indexer).
      yarn_factor: YaRN factor of compressed layers' RoPE (HF `rope_scaling.factor`; None: no
        YaRN); frequencies only, never mscale (as V4).
      original_max_position_embeddings: YaRN's original context (compressed layers).
      beta_fast: YaRN beta_fast (compressed layers).
      beta_slow: YaRN beta_slow (compressed layers).
      implementation: "blocked" (window banded, compressed in query chunks, CSA gathers its
        top-k) or "reference" (one dense masked softmax); see `ops.v4_attention`.
      query_chunk: query chunk of the blocked compressed branch.
    """

    kind = "v4"
    num_attention_heads: int = 8
    head_dim: int = 64
    qk_rope_head_dim: int = 16
    q_lora_rank: int = 64
    o_groups: int = 2
    o_lora_rank: int = 64
    sliding_window: int = 128
    compress_ratio: int | None = 0
    csa: bool | None = None
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 512
    indexer_stage: str = "sparse"
    index_loss_weight: float = 1.0
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn_factor: float | None = None
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    implementation: str = "blocked"
    query_chunk: int = 256

    def __post_init__(self):
        check_positive(
            "v4",
            num_attention_heads=self.num_attention_heads,
            head_dim=self.head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            q_lora_rank=self.q_lora_rank,
            o_groups=self.o_groups,
            o_lora_rank=self.o_lora_rank,
            sliding_window=self.sliding_window,
            query_chunk=self.query_chunk,
        )
        check(
            self.qk_rope_head_dim % 2 == 0 and self.qk_rope_head_dim <= self.head_dim,
            f"v4.qk_rope_head_dim={self.qk_rope_head_dim} must be even and <= "
            f"v4.head_dim={self.head_dim}",
        )
        check(
            self.num_attention_heads % self.o_groups == 0,
            f"v4.num_attention_heads={self.num_attention_heads} is not divisible by "
            f"v4.o_groups={self.o_groups}",
        )
        ratio = self.compress_ratio
        check(
            ratio is None or (isinstance(ratio, int) and ratio >= 0 and ratio != 1),
            f"v4.compress_ratio={ratio!r} must be 0/None (window only) or an integer >= 2",
        )
        check(
            not (self.csa and not ratio),
            f"v4.csa=True needs a compress_ratio (got {ratio!r}); CSA pools blocks of r tokens",
        )
        if self.is_csa:
            check_positive(
                "v4",
                index_n_heads=self.index_n_heads,
                index_head_dim=self.index_head_dim,
                index_topk=self.index_topk,
            )
            check(
                self.qk_rope_head_dim <= self.index_head_dim,
                f"v4.qk_rope_head_dim={self.qk_rope_head_dim} must be <= "
                f"v4.index_head_dim={self.index_head_dim} (the indexer rotates its last R dims)",
            )
        check(self.rope_theta > 1, f"v4.rope_theta={self.rope_theta!r} must be > 1")
        check(
            self.compress_rope_theta > 1,
            f"v4.compress_rope_theta={self.compress_rope_theta!r} must be > 1",
        )
        check(
            self.yarn_factor is None or self.yarn_factor >= 1,
            f"v4.yarn_factor={self.yarn_factor!r} must be None or >= 1",
        )
        check_choice("v4", "implementation", self.implementation, ops.IMPLEMENTATIONS)
        check_indexer_training("v4", self.indexer_stage, self.index_loss_weight)

    @property
    def ratio(self) -> int:
        return self.compress_ratio or 0

    @property
    def is_csa(self) -> bool:
        return bool(self.ratio) and (self.ratio == 4 if self.csa is None else self.csa)

    @property
    def rope(self) -> RopeConfig:
        """The layer's RoPE: `rope_theta` for window-only layers, the compress RoPE otherwise."""
        if not self.ratio:
            return RopeConfig(theta=self.rope_theta, layout="interleaved")
        return RopeConfig(
            theta=self.compress_rope_theta,
            layout="interleaved",
            yarn_factor=self.yarn_factor,
            original_max_position_embeddings=self.original_max_position_embeddings,
            beta_fast=self.beta_fast,
            beta_slow=self.beta_slow,
        )

    def inv_freq(self) -> np.ndarray:
        rope, R = self.rope, self.qk_rope_head_dim
        if rope.yarn_factor is None:
            return rope_ops.rope_inv_freq(R, rope.theta)
        return rope_ops.yarn_inv_freq(
            R,
            rope.theta,
            rope.yarn_factor,
            rope.original_max_position_embeddings,
            rope.beta_fast,
            rope.beta_slow,
        )


def layer_pattern_from_ratios(
    compress_ratios, base: V4Config, *, labels: dict[int, str] | None = None
) -> tuple[tuple[str, ...], dict[str, V4Config]]:
    """(layer_pattern, attention) for a V4 per-layer `compress_ratios` list.

    Labels default to "v4_window" (0), "v4_csa" (4), "v4_hca" (128) and "v4_r{r}" otherwise.
    """
    names = {0: "v4_window", 4: "v4_csa", 128: "v4_hca"}
    names.update(labels or {})
    pattern, attention = [], {}
    for r in compress_ratios:
        r = r or 0
        label = names.get(r, f"v4_r{r}")
        pattern.append(label)
        attention[label] = dataclasses.replace(base, compress_ratio=r)
    return tuple(pattern), attention


# --------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class CompressorState:
    """One compressor's decode state.

    Attributes:
      entries: [B, P, H] compressed entries (normalised, rotated); slot e = block e
        (P = max_length // r + 2: two spare slots for not-yet-complete candidates).
      kv, gate: [B, L, X] raw projections of the latest L tokens (L = r, or 2r for the
        overlapping form), slot = position mod L: the partial block (and the previous block).
    """

    entries: jax.Array
    kv: jax.Array
    gate: jax.Array


@flax.struct.dataclass
class V4Cache:
    """Decode state of one V4 layer.

    Attributes:
      index: int32 [] tokens seen (position of the next token).
      window: [B, W, H] ring buffer of the last W = sliding_window keys (= values), slot =
        position mod W.
      compressor: main compressed KV entries (None for window-only layers).
      indexer: the CSA indexer's compressed keys (None unless CSA).
    """

    index: jax.Array
    window: jax.Array
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None


def _compressor_state(batch, max_length, ratio, overlap, head_dim, dtype):
    width = head_dim * (2 if overlap else 1)
    ring = ratio * (2 if overlap else 1)
    return CompressorState(
        entries=jnp.zeros((batch, max_length // ratio + 2, head_dim), dtype),
        kv=jnp.zeros((batch, ring, width), dtype),
        gate=jnp.zeros((batch, ring, width), jnp.float32),
    )


def cache_bytes(config: V4Config, batch_size: int, max_length: int, dtype=jnp.bfloat16) -> int:
    """Bytes of one layer's `V4Cache` (what `init_cache` allocates)."""
    cache = jax.eval_shape(
        lambda: V4Attention.init_cache(config, None, batch_size, max_length, dtype)
    )
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class V4Compressor(nn.Module):
    """Learned gated pooling of every r tokens (`Compressor` / `DeepseekV4*Compressor`).

    Parameters (HF names): kv_proj, gate_proj [D, X], position_bias [r, X] (float32, zeros),
    kv_norm [H]. X = H, or 2H for the overlapping form.
    """

    config: V4Config
    settings: BlockSettings
    head_dim: int

    def setup(self):
        cfg, s = self.config, self.settings
        width = self.head_dim * (2 if cfg.is_csa else 1)
        self.kv_proj = dense(width, ("embed", "head_dim"), s)
        self.gate_proj = dense(width, ("embed", "head_dim"), s)
        self.position_bias = self.param(
            "position_bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, "head_dim")),
            (cfg.ratio, width),
            jnp.float32,
        )
        self.kv_norm = RMSNorm(eps=s.norm_eps, param_dtype=s.param_dtype)

    def __call__(self, x_BTD):
        """Per-token projections (kv [B,T,X] in the compute dtype, gate [B,T,X] float32)."""
        return self.kv_proj(x_BTD), self.gate_proj(x_BTD).astype(jnp.float32)

    def finish(self, pooled_BPH, positions_BP):
        """RMSNorm, then RoPE at each entry's first-token position."""
        normed = self.kv_norm(pooled_BPH.astype(jnp.float32)).astype(self.settings.dtype)
        return ops.apply_partial_rope(normed, positions_BP, self.config.inv_freq())

    def entries(self, kv_BTX, gate_BTX, positions_BT):
        """Entries of the complete blocks of a sequence, with first/last positions [B, P]."""
        r = self.config.ratio
        pooled = ops.compress_tokens(
            kv_BTX, gate_BTX, self.position_bias, ratio=r, overlap=self.config.is_csa
        )
        P = pooled.shape[1]
        first = positions_BT[:, : P * r : r]
        last = positions_BT[:, r - 1 : P * r : r]
        return self.finish(pooled, first), last

    def step(self, state: CompressorState, kv_BTX, gate_BTX, index):
        """Cache update for new tokens at index .. index + T - 1; returns the new state."""
        cfg = self.config
        r = cfg.ratio
        pooled, first = ops.compress_step(
            state.kv,
            state.gate,
            kv_BTX,
            gate_BTX,
            index,
            self.position_bias,
            ratio=r,
            overlap=cfg.is_csa,
        )
        B, n = pooled.shape[:2]
        positions = jnp.broadcast_to((first + jnp.arange(n)) * r, (B, n))
        new = self.finish(pooled, positions).astype(state.entries.dtype)
        return CompressorState(
            entries=jax.lax.dynamic_update_slice(state.entries, new, (0, first, 0)),
            kv=ops.ring_write(state.kv, kv_BTX, index),
            gate=ops.ring_write(state.gate, gate_BTX, index),
        )


class V4Indexer(V4Compressor):
    """CSA's lightning indexer: its own overlapping compressor (index_head_dim wide) for keys,
    queries from the query latent, per-head weights from x (`Indexer` / `DeepseekV4Indexer`;
    the official Hadamard rotation and FP4 simulation are omitted: without quantisation the
    orthonormal rotation leaves the scores unchanged, reference/attention.md §8.2)."""

    def setup(self):
        super().setup()
        cfg, s = self.config, self.settings
        # "index_heads" is not in the rules table: the few indexer heads stay replicated.
        self.q_b_proj = dense(
            (cfg.index_n_heads, cfg.index_head_dim), ("q_lora", "index_heads", "head_dim"), s
        )
        self.weights_proj = dense(cfg.index_n_heads, ("embed", "index_heads"), s)

    def queries(self, q_latent_BTC, x_BTD, positions_BT):
        """Rotated indexer queries [B,T,n,I] and head weights [B,T,n] (× n^-0.5)."""
        cfg = self.config
        q_BTnI = ops.apply_partial_rope(self.q_b_proj(q_latent_BTC), positions_BT, cfg.inv_freq())
        w_BTn = self.weights_proj(x_BTD).astype(jnp.float32) * cfg.index_n_heads**-0.5
        return q_BTnI, w_BTn


class GroupedDense(nn.Module):
    """The block-diagonal first half of V4's output projection (`o_a_proj`): kernel [N, H, O],
    group g = heads g N/G .. (g + 1) N/G - 1; [B,T,N,H] -> [B,T,G,O]."""

    config: V4Config
    settings: BlockSettings

    @nn.compact
    def __call__(self, o_BTNH):
        cfg, s = self.config, self.settings
        kernel_NHO = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=s.init_std), ("heads", "head_dim", "o_lora")
            ),
            (cfg.num_attention_heads, cfg.head_dim, cfg.o_lora_rank),
            s.param_dtype,
        )
        return ops.grouped_projection(o_BTNH, kernel_NHO, cfg.o_groups)


class V4Attention(nn.Module):
    """DeepSeek-V4 attention layer (window-only, CSA or HCA by `config.compress_ratio`)."""

    config: V4Config
    settings: BlockSettings

    @classmethod
    def init_cache(cls, config: V4Config, settings, batch_size: int, max_length: int, dtype):
        H = config.head_dim
        compressor = indexer = None
        if config.ratio:
            compressor = _compressor_state(
                batch_size, max_length, config.ratio, config.is_csa, H, dtype
            )
        if config.is_csa:
            indexer = _compressor_state(
                batch_size, max_length, config.ratio, True, config.index_head_dim, dtype
            )
        return V4Cache(
            index=jnp.zeros((), jnp.int32),
            window=jnp.zeros((batch_size, config.sliding_window, H), dtype),
            compressor=compressor,
            indexer=indexer,
        )

    @classmethod
    def cache_logical_axes(cls, config: V4Config):
        axes = ("cache_batch", "cache_length", "head_dim")
        state = CompressorState(entries=axes, kv=axes, gate=axes)
        return V4Cache(
            index=(),
            window=axes,
            compressor=state if config.ratio else None,
            indexer=state if config.is_csa else None,
        )

    @nn.compact
    def __call__(self, x_BTD, positions_BT, cache: V4Cache | None = None):
        cfg, s = self.config, self.settings
        N, H, C = cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
        inv_freq = cfg.inv_freq()
        B, T, _ = x_BTD.shape

        q_lat_BTC = dense(C, ("embed", "q_lora"), s, name="q_a_proj")(x_BTD)
        q_lat_BTC = RMSNorm(eps=s.norm_eps, param_dtype=s.param_dtype, name="q_a_norm")(q_lat_BTC)
        q_BTNH = dense((N, H), ("q_lora", "heads", "head_dim"), s, name="q_b_proj")(q_lat_BTC)
        q_BTNH = rms_norm(q_BTNH, None, eps=s.norm_eps)
        q_BTNH = ops.apply_partial_rope(q_BTNH, positions_BT, inv_freq)
        q_BTNH = constrain(q_BTNH, ("batch", "length", "act_heads", "head_dim"))

        kv_BTH = dense(H, ("embed", "head_dim"), s, name="kv_proj")(x_BTD)
        kv_BTH = RMSNorm(eps=s.norm_eps, param_dtype=s.param_dtype, name="kv_norm")(kv_BTH)
        kv_BTH = ops.apply_partial_rope(kv_BTH, positions_BT, inv_freq)
        kv_BTH = constrain(kv_BTH, ("batch", "length", "head_dim"))

        sink_N = self.param(
            "sinks",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads",)),
            (N,),
            jnp.float32,
        )

        compressor = indexer = None
        if cfg.ratio:
            compressor = V4Compressor(cfg, s, head_dim=H, name="compressor")
            ckv_BTX, cgate_BTX = compressor(x_BTD)
        if cfg.is_csa:
            # Detached inputs: the indexer learns from its KL only (V3.2 §2.1).
            x_idx_BTD = jax.lax.stop_gradient(x_BTD)
            indexer = V4Indexer(cfg, s, head_dim=cfg.index_head_dim, name="indexer")
            ikv_BTX, igate_BTX = indexer(x_idx_BTD)
            iq_BTnI, iw_BTn = indexer.queries(
                jax.lax.stop_gradient(q_lat_BTC), x_idx_BTD, positions_BT
            )

        cmp_BPH = cmp_end_BP = idx_k_BPI = None
        ring_kv = ring_pos = None
        if cache is None:
            new_cache = None
            if compressor is not None:
                cmp_BPH, cmp_end_BP = compressor.entries(ckv_BTX, cgate_BTX, positions_BT)
            if indexer is not None:
                idx_k_BPI, _ = indexer.entries(ikv_BTX, igate_BTX, positions_BT)
        else:
            index = cache.index
            ring_kv = cache.window
            ring_pos = jnp.broadcast_to(
                ops.ring_positions(index, cfg.sliding_window), (B, cfg.sliding_window)
            )
            comp_state = idx_state = None
            if compressor is not None:
                comp_state = compressor.step(cache.compressor, ckv_BTX, cgate_BTX, index)
                cmp_BPH = comp_state.entries
                P = cmp_BPH.shape[1]
                cmp_end_BP = jnp.broadcast_to((jnp.arange(P) + 1) * cfg.ratio - 1, (B, P))
            if indexer is not None:
                idx_state = indexer.step(cache.indexer, ikv_BTX, igate_BTX, index)
                idx_k_BPI = idx_state.entries
            new_cache = V4Cache(
                index=index + T,
                window=ops.ring_write(cache.window, kv_BTH, index),
                compressor=comp_state,
                indexer=idx_state,
            )

        index_inputs = None
        if indexer is not None:
            dense_warmup = cfg.indexer_stage == "dense_warmup"
            index_inputs = ops.IndexerInputs(
                q_BTnI=iq_BTnI,
                w_BTn=iw_BTn,
                k_BPI=idx_k_BPI.astype(iq_BTnI.dtype),
                topk=idx_k_BPI.shape[1] if dense_warmup else cfg.index_topk,
                scale=cfg.index_head_dim**-0.5,
            )
        want_loss = (
            indexer is not None
            and cache is None
            and cfg.indexer_stage != "off"
            and self.is_mutable_collection(LOSS_COLLECTION)
        )
        result = ops.v4_attention(
            q_BTNH,
            kv_BTH,
            positions_BT,
            window=cfg.sliding_window,
            sink_N=sink_N,
            scale=H**-0.5,
            ring_kv_BWH=ring_kv,
            ring_positions_BW=ring_pos,
            cmp_BPH=cmp_BPH,
            cmp_end_BP=cmp_end_BP,
            indexer=index_inputs,
            implementation=cfg.implementation,
            query_chunk=cfg.query_chunk,
            return_aux=want_loss,
        )
        if want_loss:
            o_BTNH, aux = result
            kl_BT = dsa_ops.indexer_kl(
                jax.lax.stop_gradient(aux["target"]), aux["scores"], aux["indices"] >= 0
            )
            sow_indexer_loss(self, kl_BT, cfg.index_loss_weight)
        else:
            o_BTNH = result
        o_BTNH = ops.apply_partial_rope(o_BTNH, positions_BT, inv_freq, inverse=True)
        o_BTNH = constrain(o_BTNH, ("batch", "length", "act_heads", "head_dim"))
        z_BTGO = GroupedDense(cfg, s, name="o_a_proj")(o_BTNH)
        y_BTD = dense(
            s.hidden_size, ("o_groups", "o_lora", "embed"), s, axis=(-2, -1), name="o_b_proj"
        )(z_BTGO)
        return constrain(y_BTD, ("batch", "length", "act_embed")), new_cache


registry.register_attention(V4Config, V4Attention)
