"""Kimi Delta Attention (KDA) and Gated DeltaNet (GDN): gated delta-rule linear attention layers.

Kimi Linear §3-4 eq. 10 (arXiv 2510.26692), Gated DeltaNet §3 (arXiv 2412.06464); facts in
reference/attention.md §5. The layer follows Hugging Face `models/kimi_linear`
(`KimiLinearDeltaAttention`) and FLA `fla/layers/kda.py` (`KimiDeltaAttention`); the recurrence
itself lives in `jaxmodels/ops/delta_rule.py`. Per token and head (N heads, key dim H, value
dim J, short-conv kernel W)::

    q, k = L2Norm(SiLU(ShortConv(W_q x))), L2Norm(SiLU(ShortConv(W_k x)))       [N, H]
    v    = SiLU(ShortConv(W_v x))                                                [N, J]
    g    = -exp(A_log) * softplus(f(x) + dt_bias)    (log-decay <= 0, fp32)
    beta = sigmoid(W_b x)                                                        [N]
    S_t  = (I - beta k k^T) Diag(exp(g)) S_{t-1} + beta k v^T,   o = H^-0.5 S_t^T q
    y    = W_o [RMSNorm(o) * sigmoid(W_g^up W_g^down x)]

The two kinds differ only in the forget gate `f`:
  * "kda": channel-wise, one decay per key channel, `f = f_b_proj(f_a_proj(x))` [N, H] with a
    rank-H bottleneck; `A_log = log U(1, 16)` per head, `dt_bias` per channel [N H];
  * "gdn": one scalar per head, `f = a_proj(x)` [N] (FLA `GatedDeltaNet`); `A_log = log U(0, 16)`
    and `dt_bias` per head [N]. The rest is the KDA layer, i.e. the GDN baseline of the Kimi
    Linear report (low-rank sigmoid output gate; FLA's `GatedDeltaNet` defaults to a full-rank
    SiLU gate instead).
`dt_bias` is initialised as in FLA: `dt ~ logU(1e-3, 1e-1)` (floored at 1e-4) mapped through the
inverse softplus. The depthwise conv kernels have torch `nn.Conv1d`'s default initialisation
U(-1/sqrt(W), 1/sqrt(W)) (FLA `ShortConvolution` is an `nn.Conv1d`).

Parameters (our layouts; Hugging Face checkpoint names, see `jaxmodels/weights/hf_kimi_linear.py`):

    q_proj, k_proj [D, N, H], v_proj [D, N, J]; q_conv1d, k_conv1d [W, N, H], v_conv1d [W, N, J]
    kda: f_a_proj [D, H], f_b_proj [H, N H];  gdn: a_proj [D, N]
    A_log [N], dt_bias [N H] (kda) or [N] (gdn), both float32; b_proj [D, N]
    g_a_proj [D, H], g_b_proj [H, N J], o_norm [J], o_proj [N, J, D]

The low-rank up-projections are flat 2-D matrices (as in the checkpoints), so Muon treats them
as the matrices they are; `A_log` and `dt_bias` are 1-D (AdamW, no weight decay).

Computation: `implementation="chunked"` (training, prefill; Kimi Linear §3.1) or "recurrent" (the
reference scan). Decoding a single token (cache given, T == 1) uses the one-step update. The
decode cache (`DeltaCache`) is the fp32 state [B, N, H, J] plus the last W - 1 conv inputs of q,
k and v: its size does not depend on the sequence length.
"""

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxmodels import registry
from jaxmodels.config import AttentionConfig, BlockSettings, check, check_choice, check_positive
from jaxmodels.layers import RMSNorm, dense
from jaxmodels.ops.delta_rule import delta_rule, delta_rule_step
from jaxmodels.ops.norms import l2_normalize
from jaxmodels.ops.reductions import materialize_gradient
from sharding.rules import constrain

IMPLEMENTATIONS = ("chunked", "recurrent")
HEAD_AXES = ("batch", "length", "act_heads", "head_dim")


# The fields of both kinds, in each kind's docstring (`--help` of the main job reads them).
_FIELDS_DOC = """
    Attributes:
      num_heads: heads N (HF `linear_num_heads`).
      head_dim: key/query dim H per head (HF `linear_head_dim`); also the rank of the low-rank
        forget-gate (KDA) and output-gate projections.
      v_head_dim: value dim J per head; None: `head_dim` (Kimi Linear; FLA's `expand_v` = J / H).
      conv_kernel_size: causal depthwise short-conv kernel W (HF `linear_conv_kernel_dim`).
      implementation: "chunked" (WY/UT chunkwise form) or "recurrent" (reference scan) for the
        full forward and for prefill; a single decode token always takes one recurrent step.
      chunk_size: chunk length C of the chunked form (64 in Kimi Linear).
"""


@dataclasses.dataclass(frozen=True)
class DeltaAttentionConfig(AttentionConfig):
    __doc__ = "Fields and validation shared by KDA and GDN.\n" + _FIELDS_DOC

    channel_wise_gate: ClassVar[bool] = True
    a_log_init_range: ClassVar[tuple[float, float]] = (1.0, 16.0)

    num_heads: int = 4
    head_dim: int = 32
    v_head_dim: int | None = None
    conv_kernel_size: int = 4
    implementation: str = "chunked"
    chunk_size: int = 64

    def __post_init__(self):
        owner = self.kind
        check_positive(owner, num_heads=self.num_heads, head_dim=self.head_dim)
        check_positive(owner, conv_kernel_size=self.conv_kernel_size, chunk_size=self.chunk_size)
        check(
            self.v_head_dim is None
            or (
                isinstance(self.v_head_dim, int)
                and not isinstance(self.v_head_dim, bool)
                and self.v_head_dim > 0
            ),
            f"{owner}.v_head_dim={self.v_head_dim!r} must be a positive integer, or None for "
            f"{owner}.head_dim",
        )
        check_choice(owner, "implementation", self.implementation, IMPLEMENTATIONS)

    @property
    def value_dim(self) -> int:
        """J: the per-head value dim."""
        return self.head_dim if self.v_head_dim is None else self.v_head_dim


@dataclasses.dataclass(frozen=True)
class KDAConfig(DeltaAttentionConfig):
    __doc__ = (
        "Kimi Delta Attention: channel-wise (per key dim) decay (Kimi Linear §3, arXiv "
        "2510.26692).\n\n    Kimi-Linear-48B: 32 heads of 128, conv 4 "
        '(`REFERENCE_CONFIGS["kimi-linear"]`).\n' + _FIELDS_DOC
    )

    kind = "kda"
    channel_wise_gate = True
    a_log_init_range = (1.0, 16.0)


@dataclasses.dataclass(frozen=True)
class GDNConfig(DeltaAttentionConfig):
    __doc__ = (
        "Gated DeltaNet: one scalar decay per head and token (arXiv 2412.06464 §3).\n" + _FIELDS_DOC
    )

    kind = "gdn"
    channel_wise_gate = False
    a_log_init_range = (0.0, 16.0)


REFERENCE_CONFIGS: dict[str, DeltaAttentionConfig] = {
    "kimi-linear": KDAConfig(num_heads=32, head_dim=128, conv_kernel_size=4),
}


@flax.struct.dataclass
class DeltaCache:
    """Decode cache of one KDA/GDN layer; constant size whatever the sequence length.

    Attributes:
      state: [B, N, H, J] float32 delta-rule state after the last token.
      q_conv, k_conv: [B, W - 1, N, H] the last W - 1 projected (pre-conv) queries/keys.
      v_conv: [B, W - 1, N, J] the same for values.
      index: int32 [] number of tokens consumed (the position of the next token).
    """

    state: jax.Array
    q_conv: jax.Array
    k_conv: jax.Array
    v_conv: jax.Array
    index: jax.Array


def short_conv(x_BTNH, kernel_WNH, window_BWNH):
    """Causal depthwise convolution over time with a carried input window.

    `y_t = sum_i kernel[i] x_{t - (W - 1) + i}`: `kernel[W - 1]` weighs the current token, as
    torch's `Conv1d(groups=channels, padding=W - 1)` truncated to the first T outputs (HF
    `causal_conv1d_fn`, FLA `ShortConvolution`).

    Args:
      x_BTNH: [B, T, N, H] inputs.
      kernel_WNH: [W, N, H] one kernel per channel.
      window_BWNH: [B, W - 1, N, H] the inputs before x (zeros at the start of a sequence).

    Returns:
      (y [B, T, N, H], the new window [B, W - 1, N, H]: the last W - 1 inputs). The gradients
      of `y` and of `x` are materialised once (`materialize_gradient`): the first for the W
      shifted products of the backward pass to read, the second for the projection's weight
      gradient, which reads it transposed.
    """
    width, length = kernel_WNH.shape[0], x_BTNH.shape[1]
    x_BTNH = materialize_gradient(x_BTNH)
    padded_BSNH = jnp.concatenate([window_BWNH.astype(x_BTNH.dtype), x_BTNH], axis=1)
    y_BTNH = sum(kernel_WNH[i] * padded_BSNH[:, i : i + length] for i in range(width))
    return materialize_gradient(y_BTNH), padded_BSNH[:, length:]


def forget_gate(f, a_log_N, dt_bias):
    """Log-decay `g = -exp(A_log) * softplus(f + dt_bias) <= 0` in float32 (Kimi Linear eq. 10).

    Args:
      f: [B, T, N, H] (KDA) or [B, T, N] (GDN) gate pre-activations.
      a_log_N: [N] per-head log decay rate.
      dt_bias: [N, H] (KDA) or [N] (GDN).
    """
    f32 = jnp.float32
    rate = jnp.exp(a_log_N.astype(f32)).reshape(a_log_N.shape + (1,) * (f.ndim - 3))
    return -rate * jax.nn.softplus(f.astype(f32) + dt_bias.astype(f32))


def a_log_init(low: float, high: float):
    """`A_log = log U(low, high)` (FLA; values floored at 1e-4 so the log stays finite)."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32, low, high)
        return jnp.log(jnp.maximum(u, 1e-4)).astype(dtype)

    return init


def dt_bias_init(key, shape, dtype=jnp.float32):
    """FLA's `dt_bias`: inverse softplus of `dt ~ logU(1e-3, 1e-1)` floored at 1e-4."""
    log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(1e-3), math.log(1e-1))
    dt = jnp.maximum(jnp.exp(log_dt), 1e-4)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class ShortConv(nn.Module):
    """Depthwise causal conv `kernel` [W, N, H] (see `short_conv`), then SiLU."""

    width: int
    settings: BlockSettings

    @nn.compact
    def __call__(self, x_BTNH, window_BWNH):
        bound = self.width**-0.5

        def init(key, shape, dtype):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        kernel_WNH = self.param(
            "kernel",
            nn.with_logical_partitioning(init, ("conv_window", "heads", "head_dim")),
            (self.width,) + x_BTNH.shape[2:],
            self.settings.param_dtype,
        )
        y_BTNH, window_BWNH = short_conv(
            x_BTNH, jnp.asarray(kernel_WNH, self.settings.dtype), window_BWNH
        )
        return nn.silu(y_BTNH), window_BWNH


class DeltaAttention(nn.Module):
    """KDA / GDN layer: `(x_BTD, positions_BT, cache) -> (y_BTD, cache)` (see `registry`).

    Positions are not used: the short conv and the recurrence carry the order of the tokens.
    """

    config: DeltaAttentionConfig
    settings: BlockSettings

    @classmethod
    def init_cache(cls, config: DeltaAttentionConfig, settings, batch_size: int, max_length, dtype):
        """Zero state and conv windows; `max_length` is ignored (the cache has constant size)."""
        N, H, J, W = config.num_heads, config.head_dim, config.value_dim, config.conv_kernel_size
        return DeltaCache(
            state=jnp.zeros((batch_size, N, H, J), jnp.float32),
            q_conv=jnp.zeros((batch_size, W - 1, N, H), dtype),
            k_conv=jnp.zeros((batch_size, W - 1, N, H), dtype),
            v_conv=jnp.zeros((batch_size, W - 1, N, J), dtype),
            index=jnp.zeros((), jnp.int32),
        )

    @classmethod
    def cache_logical_axes(cls, config: DeltaAttentionConfig):
        window = ("cache_batch", "cache_length", "cache_heads", "head_dim")
        return DeltaCache(
            state=("cache_batch", "cache_heads", "head_dim", "head_dim"),
            q_conv=window,
            k_conv=window,
            v_conv=window,
            index=(),
        )

    @nn.compact
    def __call__(self, x_BTD, positions_BT, cache: DeltaCache | None = None):
        cfg, s = self.config, self.settings
        N, H, J, W = cfg.num_heads, cfg.head_dim, cfg.value_dim, cfg.conv_kernel_size
        B, T = x_BTD.shape[:2]
        if cache is not None and not isinstance(cache, DeltaCache):
            raise TypeError(
                f"{cfg.kind} needs a DeltaCache, got {type(cache).__name__}; build caches with "
                "init_cache of the same config"
            )

        q_BTNH = dense((N, H), ("embed", "heads", "head_dim"), s, name="q_proj")(x_BTD)
        k_BTNH = dense((N, H), ("embed", "heads", "head_dim"), s, name="k_proj")(x_BTD)
        v_BTNJ = dense((N, J), ("embed", "heads", "head_dim"), s, name="v_proj")(x_BTD)
        if cache is None:
            windows = (
                jnp.zeros((B, W - 1, N, H), s.dtype),
                jnp.zeros((B, W - 1, N, H), s.dtype),
                jnp.zeros((B, W - 1, N, J), s.dtype),
            )
        else:
            windows = (cache.q_conv, cache.k_conv, cache.v_conv)
        q_BTNH, q_win = ShortConv(W, s, name="q_conv1d")(q_BTNH, windows[0])
        k_BTNH, k_win = ShortConv(W, s, name="k_conv1d")(k_BTNH, windows[1])
        v_BTNJ, v_win = ShortConv(W, s, name="v_conv1d")(v_BTNJ, windows[2])
        q_BTNH = constrain(l2_normalize(q_BTNH), HEAD_AXES)
        k_BTNH = constrain(l2_normalize(k_BTNH), HEAD_AXES)
        v_BTNJ = constrain(v_BTNJ, HEAD_AXES)

        g = self._log_decay(x_BTD)  # [B, T, N, H] (kda) or [B, T, N] (gdn), float32
        beta_BTN = jax.nn.sigmoid(
            dense(N, ("embed", "heads"), s, name="b_proj")(x_BTD).astype(jnp.float32)
        )

        if cache is not None and T == 1:
            o_BNJ, state_BNHJ = delta_rule_step(
                q_BTNH[:, 0], k_BTNH[:, 0], v_BTNJ[:, 0], g[:, 0], beta_BTN[:, 0], cache.state
            )
            o_BTNJ = o_BNJ[:, None]
        else:
            o_BTNJ, state_BNHJ = delta_rule(
                q_BTNH,
                k_BTNH,
                v_BTNJ,
                g,
                beta_BTN,
                initial_state=None if cache is None else cache.state,
                implementation=cfg.implementation,
                chunk_size=cfg.chunk_size,
            )
        new_cache = None
        if cache is not None:
            new_cache = DeltaCache(
                state=state_BNHJ,
                q_conv=q_win.astype(cache.q_conv.dtype),
                k_conv=k_win.astype(cache.k_conv.dtype),
                v_conv=v_win.astype(cache.v_conv.dtype),
                index=cache.index + T,
            )

        # Output: head-wise RMSNorm times a low-rank sigmoid gate (HF `KimiLinearRMSNormGated`).
        gate_BTH = dense(H, ("embed", "head_dim"), s, name="g_a_proj")(x_BTD)
        gate_BTNJ = dense(N * J, ("head_dim", "heads"), s, name="g_b_proj")(gate_BTH)
        gate_BTNJ = gate_BTNJ.reshape(B, T, N, J)
        o_BTNJ = RMSNorm(
            eps=s.norm_eps, param_dtype=s.param_dtype, axis_name="head_dim", name="o_norm"
        )(o_BTNJ.astype(jnp.float32))
        o_BTNJ = (o_BTNJ * jax.nn.sigmoid(gate_BTNJ.astype(jnp.float32))).astype(s.dtype)
        o_BTNJ = constrain(o_BTNJ, HEAD_AXES)
        y_BTD = dense(
            s.hidden_size, ("heads", "head_dim", "embed"), s, axis=(-2, -1), name="o_proj"
        )(o_BTNJ)
        return constrain(y_BTD, ("batch", "length", "act_embed")), new_cache

    def _log_decay(self, x_BTD):
        """The forget gate's log-decay: [B, T, N, H] (KDA) or [B, T, N] (GDN), float32."""
        cfg, s = self.config, self.settings
        N, H = cfg.num_heads, cfg.head_dim
        B, T = x_BTD.shape[:2]
        if cfg.channel_wise_gate:
            f_BTH = dense(H, ("embed", "head_dim"), s, name="f_a_proj")(x_BTD)
            f = dense(N * H, ("head_dim", "heads"), s, name="f_b_proj")(f_BTH).reshape(B, T, N, H)
            dt_shape = (N * H,)
        else:
            f = dense(N, ("embed", "heads"), s, name="a_proj")(x_BTD)
            dt_shape = (N,)
        a_log_N = self.param(
            "A_log",
            nn.with_logical_partitioning(a_log_init(*cfg.a_log_init_range), ("heads",)),
            (N,),
            jnp.float32,
        )
        dt_bias = self.param(
            "dt_bias",
            nn.with_logical_partitioning(dt_bias_init, ("heads",)),
            dt_shape,
            jnp.float32,
        )
        return forget_gate(f, a_log_N, dt_bias.reshape(f.shape[2:]))


registry.register_attention(KDAConfig, DeltaAttention)
registry.register_attention(GDNConfig, DeltaAttention)
