"""Multi-head Latent Attention (DeepSeek-V2/V3, Kimi K2, Kimi-Linear) with a latent cache.

DeepSeek-V2 §2.1 (arXiv 2405.04434), DeepSeek-V3 §2.1.1 (arXiv 2412.19437), and class `MLA` of
deepseek-ai/DeepSeek-V3 `inference/model.py` (its "naive" and "absorb" branches); facts and
dimensions in reference/attention.md §1. The math lives in `jaxmodels/ops/mla.py`.

Per token the keys and values of all heads come from one latent `c_kv` = RMSNorm(W_DKV x) [C]
plus one rotary key k_rope = RoPE(W_KR x) [R] shared by every head; queries come either from
their own latent (`q_lora_rank`, DeepSeek-V2/V3, Kimi K2) or straight from x (`q_lora_rank`
0/None: DeepSeek-V2-Lite, Kimi-Linear). Parameters (Hugging Face names, our layouts; Muon's
QK-Clip `mla_targets` relies on them):

    q_a_proj [D, Cq], q_a_norm [Cq], q_b_proj [Cq, N, H + R]   (or q_proj [D, N, H + R])
    kv_a_proj [D, C + R], kv_a_norm [C], kv_b_proj [C, N, H + Hv], o_proj [N, Hv, D]

with H = qk_nope_head_dim, R = qk_rope_head_dim, Hv = v_head_dim, C = kv_lora_rank; in each
query/key the rope part is last, as in DeepSeek's checkpoints.

Two computation forms, selected by configuration, compute the same function:
  * "mha": per-head keys/values are up-projected from the latents (training, prefill);
  * "absorbed": W_UK is folded into the query and W_UV into the output; attention runs over the
    latent entries [C + R] shared by all heads (MQA with one kv head), which is how decoding
    reads a latent cache.

Caches (`decode_form`):
  * "absorbed" (default): `MLALatentCache` stores only the normed c_kv [C] and the rotated
    k_rope [R] of each token, (C + R) values per token per layer (576 at DeepSeek-V3 dims:
    70,272 bytes per token over 61 layers in bf16). Decode steps (T == 1) use the absorbed form;
    prefill (T > 1) uses `form` over the cache slots.
  * "mha": `MLAHeadCache` stores the up-projected per-head keys [N, H + R] and values [N, Hv]
    (the DeepSeek demo's `attn_impl="naive"`, MaxText's default `mla_naive_kvcache`), and every
    cached call runs the MHA form. A baseline: N (H + R + Hv) values per token per layer.
"""

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels import registry
from jaxmodels.attention.gqa import cache_mask, write_cache
from jaxmodels.config import (
    AttentionConfig,
    BlockSettings,
    RopeConfig,
    check,
    check_choice,
    check_positive,
)
from jaxmodels.layers import RMSNorm, dense
from jaxmodels.ops import attention as attention_ops
from jaxmodels.ops import mla as mla_ops
from jaxmodels.ops import rope as rope_ops
from sharding.rules import constrain

FORMS = ("mha", "absorbed")
# DeepSeek-V3 inference/model.py and Hugging Face build the latent norms with eps 1e-6 whatever
# the model's rms_norm_eps is.
LATENT_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class MLAConfig(AttentionConfig):
    """Multi-head Latent Attention (Hugging Face `deepseek_v3` config keys).

    Attributes:
      num_heads: query heads N (`num_attention_heads`).
      q_lora_rank: query latent rank Cq; 0 or None projects queries directly from x (`q_proj`).
      kv_lora_rank: key/value latent rank C (what the cache stores, with the rope key).
      qk_nope_head_dim: per-head query/key dims without position (H).
      qk_rope_head_dim: rotary dims R of the query (per head) and the shared key (even).
      v_head_dim: per-head value dims Hv.
      rope: RoPE/YaRN settings; DeepSeek checkpoints use the "interleaved" layout.
      use_nope: no positional encoding at all (Kimi-Linear's MLA layers): the rope slices are
        kept but never rotated, and the softmax scale is (H + R)^-0.5.
      implementation: attention core of the MHA form: "xla", "reference" or "cudnn".
      form: "mha" or "absorbed", the computation of the full forward and of prefill.
      decode_form: "absorbed" (latent cache, absorbed decode) or "mha" (per-head K/V cache).
      decode_implementation: decode steps (T == 1) over the latent cache: "xla" (pure JAX),
        "pallas" (the Pallas TPU kernel `jaxmodels/kernels/mla_decode.py`; TPU only),
        "pallas_interpret" (that kernel in Pallas interpret mode, any backend; slow) or "auto"
        ("pallas" when lowered for TPU, else "xla").
    """

    kind = "mla"
    num_heads: int = 4
    q_lora_rank: int | None = None
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope: RopeConfig = RopeConfig(layout="interleaved")
    use_nope: bool = False
    implementation: str = "xla"
    form: str = "mha"
    decode_form: str = "absorbed"
    decode_implementation: str = "xla"

    def __post_init__(self):
        check_positive("mla", num_heads=self.num_heads, kv_lora_rank=self.kv_lora_rank)
        check_positive(
            "mla",
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
        )
        check(
            self.q_lora_rank is None
            or (
                isinstance(self.q_lora_rank, int)
                and not isinstance(self.q_lora_rank, bool)
                and self.q_lora_rank >= 0
            ),
            f"mla.q_lora_rank={self.q_lora_rank!r} must be a positive integer, or 0/None for a "
            "direct query projection",
        )
        check(
            self.qk_rope_head_dim % 2 == 0,
            f"mla.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)",
        )
        check(
            isinstance(self.rope, RopeConfig),
            f"mla.rope must be a RopeConfig, got {self.rope!r}",
        )
        check(
            not (self.use_nope and self.rope.yarn_factor is not None),
            f"mla.use_nope=True applies no positional encoding, so "
            f"mla.rope.yarn_factor={self.rope.yarn_factor!r} would have no effect; set it to None",
        )
        check_choice("mla", "implementation", self.implementation, attention_ops.IMPLEMENTATIONS)
        check_choice("mla", "form", self.form, FORMS)
        check_choice("mla", "decode_form", self.decode_form, FORMS)
        check_choice(
            "mla",
            "decode_implementation",
            self.decode_implementation,
            mla_ops.DECODE_IMPLEMENTATIONS,
        )
        check(
            self.decode_implementation == "xla" or self.decode_form == "absorbed",
            f"mla.decode_implementation={self.decode_implementation!r} is a kernel over the "
            f"latent cache: it needs decode_form='absorbed', not {self.decode_form!r}",
        )

    @property
    def has_q_lora(self) -> bool:
        return bool(self.q_lora_rank)

    @property
    def qk_head_dim(self) -> int:
        """H + R: the per-head query/key dim of the MHA form."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def mla_softmax_scale(config: MLAConfig) -> float:
    """`(H + R)^-0.5`, times YaRN's mscale(factor, mscale_all_dim)^2 when YaRN is on.

    DeepSeek-V3 (192 dims, factor 40): 0.1352338; Kimi-Linear NoPE: 192^-0.5 = 0.0721688.
    """
    rope = config.rope
    return rope_ops.softmax_scale(
        config.qk_head_dim,
        yarn_factor=None if config.use_nope else rope.yarn_factor,
        mscale_all_dim=rope.mscale_all_dim,
    )


def rope_frequencies(config: MLAConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [R/2], cos/sin scaling) of the decoupled rotary dims.

    YaRN is applied to the R rotary dims only (V2 §3.1.4). The cos/sin scaling is Hugging Face's
    `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` (1 for every DeepSeek config,
    where the two keys are equal), so that together with `mla_softmax_scale` the rope logits are
    scaled by mscale(factor, mscale)^2 as in DeepSeek's demo.
    """
    rope, dim = config.rope, config.qk_rope_head_dim
    if rope.yarn_factor is None:
        return rope_ops.rope_inv_freq(dim, rope.theta), 1.0
    inv_freq = rope_ops.yarn_inv_freq(
        dim,
        rope.theta,
        rope.yarn_factor,
        rope.original_max_position_embeddings,
        rope.beta_fast,
        rope.beta_slow,
    )
    scaling = rope_ops.yarn_mscale(rope.yarn_factor, rope.mscale) / rope_ops.yarn_mscale(
        rope.yarn_factor, rope.mscale_all_dim
    )
    return inv_freq, scaling


def cache_values_per_token(config: MLAConfig) -> int:
    """Cached values per token per layer: C + R (latent) or N (H + R + Hv) (per-head cache)."""
    if config.decode_form == "absorbed":
        return config.kv_lora_rank + config.qk_rope_head_dim
    return config.num_heads * (config.qk_head_dim + config.v_head_dim)


def cache_bytes_per_token(config: MLAConfig, dtype: Any = jnp.bfloat16) -> int:
    """Cache bytes per token per layer in `dtype` (multiply by the MLA layer count).

    DeepSeek-V3 dims in bf16: 576 values = 1,152 bytes, i.e. 70,272 bytes over 61 layers;
    with `decode_form="mha"` 40,960 values (4,997,120 bytes over 61 layers).
    """
    return cache_values_per_token(config) * jnp.dtype(dtype).itemsize


@flax.struct.dataclass
class MLALatentCache:
    """The latent cache of `decode_form="absorbed"`.

    Attributes:
      c_kv: [B, S, C] normed latents (S = max length); slot s holds position s.
      k_rope: [B, S, R] rotated shared rope keys (unrotated with `use_nope`).
      index: int32 [] number of filled slots (the position of the next token).
    """

    c_kv: jax.Array
    k_rope: jax.Array
    index: jax.Array


@flax.struct.dataclass
class MLAHeadCache:
    """The per-head cache of `decode_form="mha"` (the baseline MLA avoids).

    Attributes:
      k: [B, S, N, H + R] up-projected keys with the shared rope key appended.
      v: [B, S, N, Hv] up-projected values.
      index: int32 [] number of filled slots.
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array


class Kernel(nn.Module):
    """A bare projection kernel `kernel` (same name, init and axes as `dense`).

    `kv_b_proj` is applied to activations in the MHA form and folded into the query and output
    in the absorbed form, so the module owns the matrix and the caller writes the einsums.
    """

    shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    settings: BlockSettings

    @nn.compact
    def __call__(self) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=self.settings.init_std), self.kernel_axes
            ),
            self.shape,
            self.settings.param_dtype,
        )
        return jnp.asarray(kernel, self.settings.dtype)


class MLAProjections(NamedTuple):
    """What `mla_projections` returns (shapes as its docstring)."""

    c_q_BTQ: jax.Array | None
    q_nope_BTNH: jax.Array
    q_rope_BTNR: jax.Array
    c_kv_BTC: jax.Array
    k_rope_BTR: jax.Array
    kv_b_CNX: jax.Array


def mla_projections(
    cfg: MLAConfig, s: BlockSettings, x_BTD: jax.Array, positions_BT: jax.Array
) -> MLAProjections:
    """MLA's projections (DeepSeek-V2 §2.1, eqs. 37-44), as submodules of the calling compact
    module (`MLAttention`, and `DSAttention`, which shares MLA's parameter names).

    Queries through the q-LoRA latent (`q_a_proj`, `q_a_norm`, `q_b_proj`) or directly
    (`q_proj`); the joint KV latent and the shared rope key (`kv_a_proj`, `kv_a_norm`); RoPE on
    the rope parts unless `use_nope`; the up-projection kernel `kv_b_proj` [C, N, H + Hv].

    Returns:
      c_q [B, T, Cq] (the normed query latent; None without q-LoRA), q_nope [B, T, N, H],
      q_rope [B, T, N, R], c_kv [B, T, C], k_rope [B, T, R], kv_b [C, N, H + Hv].
    """
    N, H, R, C = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    c_q_BTQ = None
    if cfg.has_q_lora:
        c_q_BTQ = dense(cfg.q_lora_rank, ("embed", "q_lora"), s, name="q_a_proj")(x_BTD)
        c_q_BTQ = RMSNorm(
            eps=LATENT_NORM_EPS, param_dtype=s.param_dtype, axis_name="q_lora", name="q_a_norm"
        )(c_q_BTQ)
        q_BTNX = dense((N, H + R), ("q_lora", "heads", "head_dim"), s, name="q_b_proj")(c_q_BTQ)
    else:
        q_BTNX = dense((N, H + R), ("embed", "heads", "head_dim"), s, name="q_proj")(x_BTD)
    q_BTNX = constrain(q_BTNX, ("batch", "length", "act_heads", "head_dim"))
    q_nope_BTNH, q_rope_BTNR = q_BTNX[..., :H], q_BTNX[..., H:]

    # Joint KV latent and the shared rope key, both from x.
    kv_a_BTX = dense(C + R, ("embed", "kv_lora"), s, name="kv_a_proj")(x_BTD)
    c_kv_BTC = RMSNorm(
        eps=LATENT_NORM_EPS, param_dtype=s.param_dtype, axis_name="kv_lora", name="kv_a_norm"
    )(kv_a_BTX[..., :C])
    k_rope_BTR = kv_a_BTX[..., C:]
    if not cfg.use_nope:
        inv_freq, rope_scaling = rope_frequencies(cfg)
        rotate = dict(layout=cfg.rope.layout, attention_scaling=rope_scaling)
        q_rope_BTNR = rope_ops.apply_rope(q_rope_BTNR, positions_BT, inv_freq, **rotate)
        k_rope_BTR = rope_ops.apply_rope(k_rope_BTR, positions_BT, inv_freq, **rotate)
    kv_b_CNX = Kernel(
        (C, N, H + cfg.v_head_dim), ("kv_lora", "heads", "head_dim"), s, name="kv_b_proj"
    )()
    return MLAProjections(c_q_BTQ, q_nope_BTNH, q_rope_BTNR, c_kv_BTC, k_rope_BTR, kv_b_CNX)


class MLAttention(nn.Module):
    """MLA layer: `(x_BTD, positions_BT, cache) -> (y_BTD, cache)` (see `registry`)."""

    config: MLAConfig
    settings: BlockSettings

    @classmethod
    def init_cache(cls, config: MLAConfig, settings, batch_size: int, max_length: int, dtype):
        index = jnp.zeros((), jnp.int32)
        if config.decode_form == "absorbed":
            return MLALatentCache(
                c_kv=jnp.zeros((batch_size, max_length, config.kv_lora_rank), dtype),
                k_rope=jnp.zeros((batch_size, max_length, config.qk_rope_head_dim), dtype),
                index=index,
            )
        N = config.num_heads
        return MLAHeadCache(
            k=jnp.zeros((batch_size, max_length, N, config.qk_head_dim), dtype),
            v=jnp.zeros((batch_size, max_length, N, config.v_head_dim), dtype),
            index=index,
        )

    @classmethod
    def cache_logical_axes(cls, config: MLAConfig):
        if config.decode_form == "absorbed":  # shared by all heads: replicated over `tensor`
            return MLALatentCache(
                c_kv=("cache_batch", "cache_length", "kv_lora"),
                k_rope=("cache_batch", "cache_length", "head_dim"),
                index=(),
            )
        axes = ("cache_batch", "cache_length", "cache_heads", "head_dim")
        return MLAHeadCache(k=axes, v=axes, index=())

    @nn.compact
    def __call__(self, x_BTD, positions_BT, cache: MLALatentCache | MLAHeadCache | None = None):
        cfg, s = self.config, self.settings
        H = cfg.qk_nope_head_dim
        T = x_BTD.shape[1]
        expected = MLALatentCache if cfg.decode_form == "absorbed" else MLAHeadCache
        if cache is not None and not isinstance(cache, expected):
            raise TypeError(
                f"mla.decode_form={cfg.decode_form!r} needs a {expected.__name__}, got "
                f"{type(cache).__name__}; build caches with init_cache of the same config"
            )

        c_q_BTQ, q_nope_BTNH, q_rope_BTNR, c_kv_BTC, k_rope_BTR, kv_b_CNX = mla_projections(
            cfg, s, x_BTD, positions_BT
        )
        scale = mla_softmax_scale(cfg)

        if cache is None:
            mask_BTS = attention_ops.causal_mask(positions_BT, positions_BT)
            form, new_cache = cfg.form, None
            latents = (c_kv_BTC, k_rope_BTR)
        elif cfg.decode_form == "absorbed":
            c_kv_BSC = write_cache(cache.c_kv, c_kv_BTC, cache.index)
            k_rope_BSR = write_cache(cache.k_rope, k_rope_BTR, cache.index)
            mask_BTS = cache_mask(positions_BT, cache.index, c_kv_BSC.shape[1])
            new_cache = MLALatentCache(c_kv=c_kv_BSC, k_rope=k_rope_BSR, index=cache.index + T)
            form = "absorbed" if T == 1 else cfg.form
            latents = (c_kv_BSC.astype(s.dtype), k_rope_BSR.astype(s.dtype))
        else:
            form, latents = "mha", None

        if form == "mha":
            q_BTNX = jnp.concatenate([q_nope_BTNH, q_rope_BTNR], axis=-1)
            if latents is None:  # per-head cache: write this chunk's keys/values, attend over it
                k_BTNX, v_BTNH = mla_ops.mha_keys_values(c_kv_BTC, k_rope_BTR, kv_b_CNX, H)
                k_BSNX = write_cache(cache.k, k_BTNX, cache.index)
                v_BSNH = write_cache(cache.v, v_BTNH, cache.index)
                mask_BTS = cache_mask(positions_BT, cache.index, k_BSNX.shape[1])
                new_cache = MLAHeadCache(k=k_BSNX, v=v_BSNH, index=cache.index + T)
                k_BSNX, v_BSNH = k_BSNX.astype(s.dtype), v_BSNH.astype(s.dtype)
            else:
                k_BSNX, v_BSNH = mla_ops.mha_keys_values(*latents, kv_b_CNX, H)
            k_BSNX = constrain(k_BSNX, ("batch", "length", "act_heads", "head_dim"))
            v_BSNH = constrain(v_BSNH, ("batch", "length", "act_heads", "head_dim"))
            if self.is_mutable_collection("attn_stats"):
                self._sow_max_logits(
                    attention_ops.max_logits_per_head(q_BTNX, k_BSNX, mask_BTS, scale=scale)
                )
            out_BTNH = mla_ops.mha_attention(
                q_BTNX, k_BSNX, v_BSNH, mask_BTS, scale=scale, implementation=cfg.implementation
            )
        else:
            absorbed_args = (q_nope_BTNH, q_rope_BTNR, *latents, kv_b_CNX, mask_BTS)
            if self.is_mutable_collection("attn_stats"):
                self._sow_max_logits(
                    mla_ops.absorbed_max_logits(*absorbed_args, scale=scale, qk_nope_head_dim=H)
                )
            if cache is not None and T == 1 and cfg.decode_implementation != "xla":
                # A decode step sees the slot prefix [0, min(index, position) + 1) (cache_mask).
                lengths_B = jnp.minimum(cache.index, positions_BT[:, 0]) + 1
                out_BTNH = mla_ops.absorbed_decode_attention(
                    *absorbed_args[:-1],
                    lengths_B,
                    scale=scale,
                    qk_nope_head_dim=H,
                    implementation=cfg.decode_implementation,
                )
            else:
                out_BTNH = mla_ops.absorbed_attention(
                    *absorbed_args, scale=scale, qk_nope_head_dim=H
                )

        out_BTNH = constrain(out_BTNH, ("batch", "length", "act_heads", "head_dim"))
        y_BTD = dense(
            s.hidden_size, ("heads", "head_dim", "embed"), s, axis=(-2, -1), name="o_proj"
        )(out_BTNH)
        return constrain(y_BTD, ("batch", "length", "act_embed")), new_cache

    def _sow_max_logits(self, max_logits_N: jax.Array) -> None:
        self.sow(
            "attn_stats",
            "max_logits",
            max_logits_N,
            init_fn=lambda: jnp.full((self.config.num_heads,), -jnp.inf, jnp.float32),
            reduce_fn=jnp.maximum,
        )


def _yarn(theta: float, factor: float, mscale: float, beta_fast: float = 32.0) -> RopeConfig:
    return RopeConfig(
        theta=theta,
        layout="interleaved",
        yarn_factor=factor,
        original_max_position_embeddings=4096,
        beta_fast=beta_fast,
        beta_slow=1.0,
        mscale=mscale,
        mscale_all_dim=mscale,
    )


# Published MLA dimensions (reference/attention.md §1.3, §1.6, §1.7), e.g. for presets,
# parameter/cache accounting and benchmarks; all but Kimi-Linear interleave their rope dims.
REFERENCE_CONFIGS: dict[str, MLAConfig] = {
    "deepseek-v2-lite": MLAConfig(
        num_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope=_yarn(1e4, 40.0, 0.707),
    ),
    "deepseek-v2": MLAConfig(
        num_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope=_yarn(1e4, 40.0, 0.707),
    ),
    "deepseek-v3": MLAConfig(
        num_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope=_yarn(1e4, 40.0, 1.0),
    ),
    "kimi-k2": MLAConfig(
        num_heads=64,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope=_yarn(5e4, 32.0, 1.0, beta_fast=1.0),
    ),
    "kimi-linear": MLAConfig(
        num_heads=32,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        use_nope=True,
        rope=RopeConfig(layout="half"),
    ),
}


registry.register_attention(MLAConfig, MLAttention)
