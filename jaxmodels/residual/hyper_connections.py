"""Hyper-Connections (HC; Zhu et al., ByteDance, arXiv 2409.19606) as a residual kind.

The residual stream is widened to ``M = hc_mult`` streams (the paper's expansion rate n),
carried as :class:`StreamState` ``[B, T, M, D]``. Around every sub-layer (attention and MLP
separately, the "layers" of the paper):

    h_BTD, beta_BTM, res_BTMM = hc_pre(streams)           # width connection, A_m^T H
    y_BTD = sublayer(RMSNorm(h_BTD))                        # the sub-layer's own pre-norm
    streams = res @ streams + beta^T y                      # depth connection, A_r^T H + B^T y

Static HC (``dynamic=False``) learns ``static_alpha [M, M+1]`` (column 0 = read-in A_m, columns
1.. = A_r[src, dst]) and ``static_beta [M]``; dynamic HC adds the input-dependent terms of the
paper's §2.2 (per-stream RMSNorm, ``tanh``, learned scales initialised at 0.01). Initialisation
is the paper's App. J Algorithm 2 (lucidrains ``HyperConnections``): sub-layer ``k`` reads stream
``k mod M``, ``A_r = I``, ``B = 1``, dynamic projections zero -- so at init, with the embedding
repeated on every stream, the model computes exactly the pre-norm residual. The sub-layer index
``k`` is carried in the state (``StreamState.index``), so this also holds under ``nn.scan``.

The final collapse sums the streams (HC's output layer; lucidrains ``reduce_fn``) before the
decoder's final RMSNorm. The math lives in :mod:`jaxmodels.ops.hyper_connections`.

Diagnostics: when the ``"intermediates"`` collection is mutable, every sub-layer sows
``residual_matrix`` ``res[B, T, dst, src]`` (float32) and ``sublayer_index``;
:func:`collect_residual_matrices` orders them by depth as ``[L_sub, B, T, M, M]`` for
:func:`jaxmodels.ops.hyper_connections.composite_gain` (mHC §3.1's Amax gain), see
:func:`composite_gain_from_intermediates`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels import registry
from jaxmodels.config import BlockSettings, ResidualConfig, check, check_positive
from jaxmodels.layers import RMSNorm
from jaxmodels.ops.hyper_connections import (
    composite_gain,
    expand_streams,
    hc_head,
    hc_post,
    hc_pre,
)
from sharding.rules import constrain

DIAGNOSTICS = "intermediates"  # the collection diagnostics are sown into (per-layer in model.py)
STREAM_AXES = ("batch", "length", "streams", "act_embed")


class StreamState(NamedTuple):
    """Residual state of the multi-stream kinds (HC and mHC); a fixed-shape pytree.

    Attributes:
      streams_BTMD: [B, T, M, D] the M residual streams (the model's compute dtype).
      index: int32 [] number of sub-layers applied so far (attention and MLP counted separately);
        HC's static init reads stream ``index mod M``; diagnostics use it to order layers.
    """

    streams_BTMD: jax.Array
    index: jax.Array


def init_stream_state(x_BTD: jax.Array, num_streams: int) -> StreamState:
    """The embedding repeated on every stream (HC and DeepSeek-V4 ``Transformer.forward``)."""
    streams = constrain(expand_streams(x_BTD, num_streams), STREAM_AXES)
    return StreamState(streams, jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class HyperConnectionsConfig(ResidualConfig):
    """Hyper-Connections (arXiv 2409.19606).

    Attributes:
      hc_mult: expansion rate n = number of residual streams M (the field name matches mHC's and
        DeepSeek-V4's ``hc_mult``). 1 with the static init is exactly the pre-norm residual.
      dynamic: DHC (input-dependent alpha/beta, paper §2.2) instead of SHC (static only).
      use_tanh: the paper's tanh on the dynamic terms (False: linear, a lucidrains option).
      dynamic_scale_init: initial s_alpha and s_beta (paper / lucidrains: 0.01).
    """

    kind = "hyper_connections"
    hc_mult: int = 4
    dynamic: bool = True
    use_tanh: bool = True
    dynamic_scale_init: float = 0.01

    def __post_init__(self):
        check_positive("hyper_connections", hc_mult=self.hc_mult)
        check(
            isinstance(self.dynamic, bool),
            f"hyper_connections.dynamic={self.dynamic!r} must be a bool",
        )


class HyperConnectionsExpand(nn.Module):
    """Embedding [B, T, D] -> :class:`StreamState` with M identical streams."""

    config: HyperConnectionsConfig
    settings: BlockSettings

    def __call__(self, x_BTD: jax.Array) -> StreamState:
        return init_stream_state(x_BTD, self.config.hc_mult)


def _static_alpha_init(index: jax.Array, m: int):
    """Paper App. J init for the sub-layer ``index`` (a traced int under ``nn.scan``)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        read = jax.nn.one_hot(index % m, m, dtype=jnp.float32)[:, None]
        return jnp.concatenate([read, jnp.eye(m, dtype=jnp.float32)], axis=1).astype(dtype)

    return init


class HyperConnectionsSublayer(nn.Module):
    """Owns one sub-layer's HC weights and its RMSNorm (``norm/scale``, as the pre-norm kind).

    Parameters (float32): ``static_alpha`` [M, M+1], ``static_beta`` [M]; with ``dynamic``:
    ``dynamic_alpha_fn`` [D, M+1] and ``dynamic_beta_fn`` [D] (zeros), ``dynamic_alpha_scale``
    and ``dynamic_beta_scale`` [] (``dynamic_scale_init``), ``dynamic_norm_scale`` [D] (ones,
    the per-stream RMSNorm gain).
    """

    config: HyperConnectionsConfig
    settings: BlockSettings

    @nn.compact
    def read(self, state: StreamState):
        cfg, d = self.config, self.settings.hidden_size
        m = cfg.hc_mult
        f32 = jnp.float32
        static_alpha = self.param(
            "static_alpha",
            nn.with_logical_partitioning(_static_alpha_init(state.index, m), ("streams", None)),
            (m, m + 1),
            f32,
        )
        static_beta = self.param(
            "static_beta",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("streams",)),
            (m,),
            f32,
        )
        dynamic = {}
        if cfg.dynamic:
            scale_init = nn.initializers.constant(cfg.dynamic_scale_init)
            zeros = nn.initializers.zeros_init()
            dynamic = dict(
                dynamic_alpha_fn=self.param(
                    "dynamic_alpha_fn",
                    nn.with_logical_partitioning(zeros, ("embed", None)),
                    (d, m + 1),
                    f32,
                ),
                dynamic_alpha_scale=self.param(
                    "dynamic_alpha_scale", nn.with_logical_partitioning(scale_init, ()), (), f32
                ),
                dynamic_beta_fn=self.param(
                    "dynamic_beta_fn", nn.with_logical_partitioning(zeros, ("embed",)), (d,), f32
                ),
                dynamic_beta_scale=self.param(
                    "dynamic_beta_scale", nn.with_logical_partitioning(scale_init, ()), (), f32
                ),
                norm_scale=self.param(
                    "dynamic_norm_scale",
                    nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                    (d,),
                    f32,
                ),
            )
        h_BTD, beta_BTM, res_BTMM = hc_pre(
            state.streams_BTMD,
            static_alpha,
            static_beta,
            norm_eps=self.settings.norm_eps,
            use_tanh=cfg.use_tanh,
            **dynamic,
        )
        sow_residual_matrix(self, res_BTMM, state.index)
        x_BTD = RMSNorm(self.settings.norm_eps, self.settings.param_dtype, name="norm")(h_BTD)
        return x_BTD, (beta_BTM, res_BTMM)

    def write(self, state: StreamState, y_BTD: jax.Array, ctx) -> StreamState:
        beta_BTM, res_BTMM = ctx
        streams = hc_post(state.streams_BTMD, y_BTD, beta_BTM, res_BTMM)
        return StreamState(constrain(streams, STREAM_AXES), state.index + 1)


class HyperConnectionsCollapse(nn.Module):
    """Sum of the streams -> [B, T, D] (then the decoder's final RMSNorm)."""

    config: HyperConnectionsConfig
    settings: BlockSettings

    def __call__(self, state: StreamState) -> jax.Array:
        return hc_head(state.streams_BTMD)


# ---------------------------------------------------------------------------------------------
# Diagnostics shared by HC and mHC.


def sow_residual_matrix(module: nn.Module, res_BTMM: jax.Array, index: jax.Array) -> None:
    """Sows ``residual_matrix`` (float32 ``res[B, T, dst, src]``) and ``sublayer_index`` into
    the diagnostics collection; a no-op unless the caller made it mutable."""
    if module.is_mutable_collection(DIAGNOSTICS):
        module.sow(DIAGNOSTICS, "residual_matrix", res_BTMM.astype(jnp.float32))
        module.sow(DIAGNOSTICS, "sublayer_index", index)


def collect_sown(tree: Any, value_name: str, index_name: str = "sublayer_index") -> jax.Array:
    """Gathers every sown ``value_name`` in ``tree`` and stacks them in sub-layer order.

    Works for scanned (values stacked over the scan axis) and unrolled models alike: each module
    that sowed ``value_name`` also sowed ``index_name``; leading axes are flattened and the
    entries sorted by that index (jit-compatible).

    Returns:
      [L, ...] values, L = number of sowing calls, ordered by depth.
    """
    values, indices = [], []

    def visit(node):
        if not isinstance(node, dict) and not hasattr(node, "items"):
            return
        if value_name in node and index_name in node:
            (value,) = node[value_name]
            (index,) = node[index_name]
            index = jnp.asarray(index)
            lead = index.ndim  # 0 when unrolled, 1 (groups) under nn.scan
            values.append(value.reshape((-1, *value.shape[lead:])))
            indices.append(index.reshape(-1))
        for key, child in node.items():
            if key not in (value_name, index_name):
                visit(child)

    visit(tree)
    if not values:
        raise ValueError(
            f"no sown {value_name!r} found; apply the model with mutable=[{DIAGNOSTICS!r}] "
            "and pass the returned collection"
        )
    order = jnp.argsort(jnp.concatenate(indices))
    return jnp.concatenate(values, axis=0)[order]


def collect_residual_matrices(intermediates: Any) -> jax.Array:
    """Per-sub-layer residual matrices ``res[dst, src]``, [L_sub, B, T, M, M], in depth order.

    Args:
      intermediates: the ``"intermediates"`` collection returned by
        ``Decoder(config).apply(params, tokens, mutable=["intermediates"])`` with an HC or mHC
        residual kind (``variables["intermediates"]`` or the collection itself).
    """
    if hasattr(intermediates, "get") and DIAGNOSTICS in intermediates:
        intermediates = intermediates[DIAGNOSTICS]
    return collect_sown(intermediates, "residual_matrix")


def composite_gain_from_intermediates(
    intermediates: Any, *, average_tokens_first: bool = False
) -> tuple[jax.Array, jax.Array]:
    """mHC's stability measure (arXiv 2512.24880 §3.1, Figs. 3b / 7b) for a whole model.

    Forward gain ``[l]`` = max |row sum| of ``res[l] @ ... @ res[0]``; backward gain ``[l]`` =
    max |column sum| of ``res[L-1] @ ... @ res[l]``; L counts attention and MLP sub-layers
    separately. The paper averages over the tokens of one sequence; by default the gain is
    computed per token and then averaged (``average_tokens_first=True`` averages the matrices
    first, as its Fig. 8 does).

    Returns:
      (forward [L_sub], backward [L_sub]) float32, averaged over batch and tokens.
    """
    res_LBTMM = collect_residual_matrices(intermediates)
    if average_tokens_first:
        res_LBTMM = jnp.mean(res_LBTMM, axis=(1, 2))
        return composite_gain(res_LBTMM)
    fwd, bwd = composite_gain(res_LBTMM)
    return jnp.mean(fwd, axis=(1, 2)), jnp.mean(bwd, axis=(1, 2))


registry.register_residual(
    HyperConnectionsConfig,
    expand_cls=HyperConnectionsExpand,
    sublayer_cls=HyperConnectionsSublayer,
    collapse_cls=HyperConnectionsCollapse,
)
