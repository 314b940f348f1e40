"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2): MLA plus a lightning indexer and top-k.

DeepSeek-V3.2 (DeepSeek_V3_2.pdf §1–2, arXiv 2512.02556) and class `Indexer` / `MLA` of
deepseek-ai/DeepSeek-V3.2-Exp `inference/model.py` (indexer RoPE non-interleaved per the
2025-11-17 erratum); facts in reference/attention.md §2.1–2.2, oracles §8.2. The math lives in
`jaxmodels/ops/dsa.py` (indexer, selection, gather attention, losses) and
`jaxmodels/ops/mla.py` (absorbed form).

A DSA layer is an MLA layer (`DSAConfig` extends `MLAConfig`; same parameters, same names,
same latent cache) with an indexer beside it. Parameters (Hugging Face `deepseek_v32` names):

    MLA:      q_a_proj, q_a_norm, q_b_proj, kv_a_proj, kv_a_norm, kv_b_proj, o_proj
    indexer/  wq_b [Cq, J, Ih]   indexer queries from the normed query latent c^Q
              wk [D, Ih]         one indexer key per token, from the layer input
              k_norm             LayerNorm with bias over Ih (scale, bias)
              weights_proj [D, J] per-head weights from the layer input

The indexer scores every visible token, the ``index_topk`` best are selected once per token
(shared by all heads) and the main attention runs in the absorbed MQA form over the gathered
latent entries ``[c_kv ; k_rope]`` (`ops.dsa.dsa_attention`, no [T, S] score matrix).

Training stages (`indexer_stage`, V3.2 §2.1):
  * "dense_warmup": the main attention is dense MLA; the indexer learns
    ``KL(p || softmax(I))`` with p the head-summed, L1-normalised main attention over all
    visible tokens. The paper freezes everything else: `dsa_trainable_mask(params,
    "dense_warmup")` / `dsa_freeze(optimizer, "dense_warmup")`.
  * "sparse": top-k sparse attention; the indexer learns the KL restricted to the selected set.
  * "off": top-k sparse attention and no indexer loss (inference, or a frozen indexer).
In every stage the indexer's inputs (x and c^Q) and the KL target are detached, and the
selection is discrete: the LM loss never reaches the indexer and the indexer loss never reaches
the main model (∂L_LM/∂indexer = 0, ∂L_I/∂main = 0).

Indexer loss: sown as ``("losses", "indexer_kl")`` — a float32 scalar per layer, the KL averaged
over batch and query tokens times ``index_loss_weight``, only when the "losses" collection is
mutable and the stage has a loss; scanned layer stacks hold one value per layer ([L]).
`jaxmodels.training.auxiliary_loss` (or `indexer_loss`) sums them.

Cache: `DSACache` = the MLA latent cache (c_kv [B, S, C], k_rope [B, S, R], index) plus the
indexer key cache index_k [B, S, Ih] (V3.2's ``k_cache``, unquantised). Decode steps score the
new token against every cached indexer key, select top-k and attend over the selected latents.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxmodels import registry
from jaxmodels.attention.gqa import cache_mask, write_cache
from jaxmodels.attention.mla import (
    MLAConfig,
    MLALatentCache,
    MLAttention,
    mla_projections,
    mla_softmax_scale,
    rope_frequencies,
)
from jaxmodels.config import BlockSettings, check, check_choice, check_positive
from jaxmodels.layers import dense
from jaxmodels.ops import attention as attention_ops
from jaxmodels.ops import dsa as dsa_ops
from jaxmodels.ops import mla as mla_ops
from jaxmodels.ops import norms
from sharding.rules import constrain

STAGES = ("dense_warmup", "sparse", "off")
INDEXER_NORM_EPS = 1e-6  # V3.2-Exp Indexer.k_norm: LayerNorm(eps=1e-6)
LOSS_COLLECTION, LOSS_NAME = "losses", "indexer_kl"


def check_indexer_training(owner: str, stage: str, loss_weight: float) -> None:
    """Validates the indexer-training fields `indexer_stage` (one of `STAGES`) and
    `index_loss_weight` (a number >= 0) of a config named `owner` (DSA; V4's CSA layers)."""
    check_choice(owner, "indexer_stage", stage, STAGES)
    check(
        isinstance(loss_weight, int | float) and loss_weight >= 0,
        f"{owner}.index_loss_weight={loss_weight!r} must be a number >= 0",
    )


def sow_indexer_loss(module: nn.Module, kl_BT: jax.Array, weight: float) -> None:
    """Sows ``mean(kl_BT) * weight`` as the float32 scalar ``("losses", "indexer_kl")``.

    The per-query indexer KL [B, T] (`ops.dsa.indexer_kl`) averaged over batch and queries;
    `jaxmodels.training.auxiliary_loss` (or `indexer_loss`) adds every layer's value to the loss.
    """
    module.sow(LOSS_COLLECTION, LOSS_NAME, jnp.mean(kl_BT).astype(jnp.float32) * weight)


@dataclasses.dataclass(frozen=True)
class DSAConfig(MLAConfig):
    """MLA with DeepSeek Sparse Attention (Hugging Face `deepseek_v32` config keys).

    Attributes (beyond `MLAConfig`'s):
      index_n_heads: indexer heads J (V3.2: 64).
      index_head_dim: indexer head dim Ih (V3.2: 128); its first `qk_rope_head_dim` dims are
        rotated (half-split layout).
      index_topk: tokens selected per query (V3.2: 2048).
      indexer_stage: "dense_warmup", "sparse" or "off" (see the module docstring).
      index_loss_weight: multiplies the sown indexer KL.
      sparse_implementation: "gather" (query blocks, gathered latents) or "reference" (dense
        [T, S] masks) — `ops.dsa.dsa_attention`.
      index_block_q: queries per block of the gather form.
      index_prefix_chunks: causal key-prefix chunks of the gather form (training / prefill).
    """

    kind = "dsa"
    q_lora_rank: int | None = 32
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 64
    indexer_stage: str = "sparse"
    index_loss_weight: float = 1.0
    sparse_implementation: str = "gather"
    index_block_q: int = 128
    index_prefix_chunks: int = 8

    def __post_init__(self):
        super().__post_init__()
        check_positive(
            "dsa",
            index_n_heads=self.index_n_heads,
            index_head_dim=self.index_head_dim,
            index_topk=self.index_topk,
            index_block_q=self.index_block_q,
            index_prefix_chunks=self.index_prefix_chunks,
        )
        check(
            self.decode_implementation == "xla",
            f"dsa.decode_implementation={self.decode_implementation!r}: DSA decodes over the "
            "top-k selected latents with its own gather; only 'xla' is supported",
        )
        check(
            self.has_q_lora,
            f"dsa.q_lora_rank={self.q_lora_rank!r}: the indexer's queries come from the query "
            "latent (V3.2 wq_b), so DSA needs q_lora_rank > 0",
        )
        check(
            self.index_head_dim >= self.qk_rope_head_dim,
            f"dsa.index_head_dim={self.index_head_dim} must be >= "
            f"dsa.qk_rope_head_dim={self.qk_rope_head_dim} (the indexer rotates its first "
            "qk_rope_head_dim dims)",
        )
        check(
            self.decode_form == "absorbed",
            f"dsa.decode_form={self.decode_form!r}: DSA attends over the latent cache, use "
            "decode_form='absorbed'",
        )
        check_indexer_training("dsa", self.indexer_stage, self.index_loss_weight)
        check_choice(
            "dsa", "sparse_implementation", self.sparse_implementation, dsa_ops.IMPLEMENTATIONS
        )

    @classmethod
    def from_mla(cls, mla: MLAConfig, **fields: Any) -> "DSAConfig":
        """`mla`'s layer plus an indexer: every MLA field copied, `fields` set the indexer's
        (and may override MLA ones). The inverse of `DSAConfig.mla`."""
        base = {f.name: getattr(mla, f.name) for f in dataclasses.fields(MLAConfig)}
        return cls(**{**base, **fields})

    @property
    def mla(self) -> MLAConfig:
        """The MLA part alone (same parameters as this layer without `indexer/`)."""
        names = {f.name for f in dataclasses.fields(MLAConfig)}
        return MLAConfig(**{n: getattr(self, n) for n in names})


@flax.struct.dataclass
class DSACache:
    """MLA latent cache plus the indexer key cache.

    Attributes:
      latent: `MLALatentCache` (c_kv [B, S, C], k_rope [B, S, R], index).
      index_k: [B, S, Ih] indexer keys (LayerNorm'd, rotated); slot s holds position s.
    """

    latent: MLALatentCache
    index_k: jax.Array

    @property
    def index(self) -> jax.Array:
        return self.latent.index


def cache_bytes_per_token(config: DSAConfig, dtype: Any = jnp.bfloat16) -> int:
    """Cache bytes per token per layer: latent (C + R) plus indexer key (Ih) values."""
    values = config.kv_lora_rank + config.qk_rope_head_dim + config.index_head_dim
    return values * jnp.dtype(dtype).itemsize


class LayerNormBias(nn.Module):
    """LayerNorm with gain `scale` (ones) and `bias` (zeros), float32 statistics."""

    eps: float = INDEXER_NORM_EPS
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1],)
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            shape,
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
            shape,
            self.param_dtype,
        )
        return norms.layer_norm(x, scale, bias, eps=self.eps)


class Indexer(nn.Module):
    """The lightning indexer's projections: `(x_BTD, c_q_BTQ, positions_BT) -> (q, w, k)`.

    Returns indexer queries [B, T, J, Ih] and keys [B, T, Ih] (partial RoPE on the first R dims,
    half-split layout) and scaled head weights [B, T, J] float32 (V3.2: · J^-0.5 · Ih^-0.5).
    Inputs are detached by the caller.
    """

    config: DSAConfig
    settings: BlockSettings

    @nn.compact
    def __call__(self, x_BTD, c_q_BTQ, positions_BT):
        cfg, s = self.config, self.settings
        J, I = cfg.index_n_heads, cfg.index_head_dim
        q_BTJI = dense((J, I), ("q_lora", "index_heads", "head_dim"), s, name="wq_b")(c_q_BTQ)
        k_BTI = dense(I, ("embed", "head_dim"), s, name="wk")(x_BTD)
        k_BTI = LayerNormBias(param_dtype=s.param_dtype, name="k_norm")(k_BTI)
        w_BTJ = dense(J, ("embed", "index_heads"), s, name="weights_proj")(x_BTD)
        if not cfg.use_nope:
            inv_freq, scaling = rope_frequencies(cfg)
            q_BTJI = dsa_ops.indexer_partial_rope(
                q_BTJI, positions_BT, inv_freq, attention_scaling=scaling
            )
            k_BTI = dsa_ops.indexer_partial_rope(
                k_BTI, positions_BT, inv_freq, attention_scaling=scaling
            )
        return q_BTJI, dsa_ops.indexer_head_weights(w_BTJ, I), k_BTI


class DSAttention(nn.Module):
    """DSA layer: `(x_BTD, positions_BT, cache) -> (y_BTD, cache)` (see `registry`)."""

    config: DSAConfig
    settings: BlockSettings

    @classmethod
    def init_cache(cls, config: DSAConfig, settings, batch_size: int, max_length: int, dtype):
        latent = MLAttention.init_cache(config, settings, batch_size, max_length, dtype)
        index_k = jnp.zeros((batch_size, max_length, config.index_head_dim), dtype)
        return DSACache(latent=latent, index_k=index_k)

    @classmethod
    def cache_logical_axes(cls, config: DSAConfig):
        return DSACache(
            latent=MLAttention.cache_logical_axes(config),
            index_k=("cache_batch", "cache_length", "head_dim"),
        )

    @nn.compact
    def __call__(self, x_BTD, positions_BT, cache: DSACache | None = None):
        cfg, s = self.config, self.settings
        H, C = cfg.qk_nope_head_dim, cfg.kv_lora_rank
        B, T = x_BTD.shape[:2]
        if cache is not None and not isinstance(cache, DSACache):
            raise TypeError(
                f"a dsa layer needs a DSACache, got {type(cache).__name__}; build caches with "
                "DSAttention.init_cache (or jaxmodels.model.init_caches)"
            )

        # MLA projections: the same modules and names as `MLAttention` (q-LoRA is required).
        c_q_BTQ, q_nope_BTNH, q_rope_BTNR, c_kv_BTC, k_rope_BTR, kv_b_CNX = mla_projections(
            cfg, s, x_BTD, positions_BT
        )
        scale = mla_softmax_scale(cfg)
        w_uk_CNH, w_uv_CNH = mla_ops.split_kv_b(kv_b_CNX, H)

        # The lightning indexer, on detached inputs (V3.2 §2.1: it learns from L_I only).
        iq_BTJI, iw_BTJ, ik_BTI = Indexer(cfg, s, name="indexer")(
            jax.lax.stop_gradient(x_BTD), jax.lax.stop_gradient(c_q_BTQ), positions_BT
        )

        # Keys: this chunk's latents (training), or the caches after writing it.
        if cache is None:
            c_kv_BSC, k_rope_BSR, ik_BSI, new_cache = c_kv_BTC, k_rope_BTR, ik_BTI, None
            mask_BTS = attention_ops.causal_mask(positions_BT, positions_BT)
            kv_positions = None
        else:
            latent = cache.latent
            c_kv_BSC = write_cache(latent.c_kv, c_kv_BTC, latent.index)
            k_rope_BSR = write_cache(latent.k_rope, k_rope_BTR, latent.index)
            ik_BSI = dsa_ops.write_indexer_cache(cache.index_k, ik_BTI, latent.index)
            new_cache = DSACache(
                latent=MLALatentCache(c_kv=c_kv_BSC, k_rope=k_rope_BSR, index=latent.index + T),
                index_k=ik_BSI,
            )
            S = c_kv_BSC.shape[1]
            mask_BTS = cache_mask(positions_BT, latent.index, S)
            slots_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
            kv_positions = dict(
                q_positions_BT=positions_BT,
                kv_positions_BS=slots_BS,
                kv_valid_BS=slots_BS < latent.index + T,
            )
            c_kv_BSC, k_rope_BSR = c_kv_BSC.astype(s.dtype), k_rope_BSR.astype(s.dtype)
            ik_BSI = ik_BSI.astype(s.dtype)

        want_loss = self.is_mutable_collection(LOSS_COLLECTION) and cfg.indexer_stage != "off"
        if cfg.indexer_stage == "dense_warmup":
            out_BTNH = self._dense(
                cfg,
                q_nope_BTNH,
                q_rope_BTNR,
                c_kv_BSC,
                k_rope_BSR,
                kv_b_CNX,
                mask_BTS,
                scale,
                cached=cache is not None,
            )
            if want_loss:
                q_latent_BTNC = mla_ops.absorb_query(q_nope_BTNH, w_uk_CNH)
                logits_BNTS = mla_ops.absorbed_logits(
                    q_latent_BTNC, q_rope_BTNR, c_kv_BSC, k_rope_BSR, scale=scale
                )
                target_BTS = dsa_ops.attention_target(mla_ops.masked_softmax(logits_BNTS, mask_BTS))
                scores_BTS = dsa_ops.indexer_scores(iq_BTJI, iw_BTJ, ik_BSI, mask_BTS)
                kl_BT = dsa_ops.indexer_kl(jax.lax.stop_gradient(target_BTS), scores_BTS, mask_BTS)
                sow_indexer_loss(self, kl_BT, cfg.index_loss_weight)
        else:
            q_latent_BTNC = mla_ops.absorb_query(q_nope_BTNH, w_uk_CNH)
            q_mqa_BTNX = jnp.concatenate([q_latent_BTNC, q_rope_BTNR], axis=-1)
            q_mqa_BTNX = constrain(q_mqa_BTNX, ("batch", "length", "act_heads", None))
            kv_BSX = jnp.concatenate([c_kv_BSC, k_rope_BSR], axis=-1)
            latent_BTNC, aux = dsa_ops.dsa_attention(
                q_mqa_BTNX, kv_BSX, iq_BTJI, iw_BTJ, ik_BSI,
                topk=cfg.index_topk, value_dim=C, scale=scale,
                implementation=cfg.sparse_implementation, block_q=cfg.index_block_q,
                num_prefix_chunks=cfg.index_prefix_chunks, return_aux=True,
                **(kv_positions or {}),
            )  # fmt: skip
            latent_BTNC = constrain(
                latent_BTNC.astype(s.dtype), ("batch", "length", "act_heads", None)
            )
            out_BTNH = jnp.einsum("BTNC,CNH->BTNH", latent_BTNC, w_uv_CNH.astype(s.dtype))
            if self.is_mutable_collection("attn_stats"):
                selected_BTS = dsa_ops.indices_to_mask(aux["indices"], kv_BSX.shape[1])
                self._sow_max_logits(
                    mla_ops.absorbed_max_logits(
                        q_nope_BTNH, q_rope_BTNR, c_kv_BSC, k_rope_BSR, kv_b_CNX, selected_BTS,
                        scale=scale, qk_nope_head_dim=H,
                    )
                )  # fmt: skip
            if want_loss:
                valid_BTk = aux["indices"] >= 0
                kl_BT = dsa_ops.indexer_kl(
                    jax.lax.stop_gradient(aux["target"]), aux["scores"], valid_BTk
                )
                sow_indexer_loss(self, kl_BT, cfg.index_loss_weight)

        out_BTNH = constrain(out_BTNH, ("batch", "length", "act_heads", "head_dim"))
        y_BTD = dense(
            s.hidden_size, ("heads", "head_dim", "embed"), s, axis=(-2, -1), name="o_proj"
        )(out_BTNH)
        return constrain(y_BTD, ("batch", "length", "act_embed")), new_cache

    def _dense(self, cfg, q_nope, q_rope, c_kv, k_rope, kv_b, mask, scale, *, cached):
        """Dense causal MLA (the warm-up stage): `cfg.form` for the full forward, the absorbed
        form over the latent cache (as `MLAttention`'s latent-cache path)."""
        H = cfg.qk_nope_head_dim
        if self.is_mutable_collection("attn_stats"):
            self._sow_max_logits(
                mla_ops.absorbed_max_logits(
                    q_nope, q_rope, c_kv, k_rope, kv_b, mask, scale=scale, qk_nope_head_dim=H
                )
            )
        if cfg.form == "mha" and not cached:
            k_BSNX, v_BSNH = mla_ops.mha_keys_values(c_kv, k_rope, kv_b, H)
            q_BTNX = jnp.concatenate([q_nope, q_rope], axis=-1)
            return mla_ops.mha_attention(
                q_BTNX, k_BSNX, v_BSNH, mask, scale=scale, implementation=cfg.implementation
            )
        return mla_ops.absorbed_attention(
            q_nope, q_rope, c_kv, k_rope, kv_b, mask, scale=scale, qk_nope_head_dim=H
        )

    def _sow_max_logits(self, max_logits_N: jax.Array) -> None:
        self.sow(
            "attn_stats",
            "max_logits",
            max_logits_N,
            init_fn=lambda: jnp.full((self.config.num_heads,), -jnp.inf, jnp.float32),
            reduce_fn=jnp.maximum,
        )


# --------------------------------------------------------------------------------------------
# Training helpers: the indexer loss and the stage's trainable parameters.


def indexer_loss(losses: Any) -> jax.Array:
    """Sum of every sown ``indexer_kl`` (DSA and V4 CSA layers; scanned stacks summed), float32."""
    total = jnp.zeros((), jnp.float32)
    for path, leaf in jax.tree_util.tree_flatten_with_path(losses)[0]:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if LOSS_NAME in keys:
            total = total + jnp.sum(leaf.astype(jnp.float32))
    return total


def is_indexer_path(path: tuple) -> bool:
    """Whether a parameter path (keys of a params pytree) lies in a DSA indexer."""
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return "indexer" in keys


def dsa_trainable_mask(params: Any, stage: str) -> Any:
    """Boolean pytree like ``params``: which parameters the stage trains (V3.2 §2.1).

    * "dense_warmup": only the indexers (everything else frozen);
    * "sparse": everything (the indexer learns from its KL, the rest from the LM loss — the
      separation is done by the detached indexer input, not by the mask);
    * "off": everything but the indexers.

    Freeze with `dsa_freeze`, or e.g. ``optax.chain(optax.masked(optax.set_to_zero(),
    frozen), opt)`` with ``frozen`` the negated mask. (``optax.masked(opt, mask)`` alone does not
    freeze: it passes the raw gradient through as the update of masked-out parameters.)
    """
    check_choice("dsa", "stage", stage, STAGES)

    def trainable(path, _):
        inside = is_indexer_path(path)
        return {"dense_warmup": inside, "sparse": True, "off": not inside}[stage]

    return jax.tree_util.tree_map_with_path(trainable, params)


def dsa_freeze(optimizer: optax.GradientTransformation, stage: str):
    """``optimizer`` on the parameters `dsa_trainable_mask` marks, zero updates elsewhere."""
    return optax.multi_transform(
        {"train": optimizer, "freeze": optax.set_to_zero()},
        lambda params: jax.tree.map(
            lambda t: "train" if t else "freeze", dsa_trainable_mask(params, stage)
        ),
    )


registry.register_attention(DSAConfig, DSAttention)
