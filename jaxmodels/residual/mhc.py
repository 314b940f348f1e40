"""mHC: Manifold-Constrained Hyper-Connections (DeepSeek, arXiv 2512.24880) as DeepSeek-V4 ships
it (``inference/model.py`` ``Block.hc_pre`` / ``Block.hc_post`` / ``ParallelHead.hc_head``;
transformers ``DeepseekV4HyperConnection`` / ``DeepseekV4HyperHead``), as a residual kind.

The residual stream is ``M = hc_mult`` streams ``[B, T, M, D]`` (the embedding repeated M times,
:class:`~jaxmodels.residual.hyper_connections.StreamState`). Around every sub-layer (attention
and MLP separately; V4's ``hc_attn_*`` / ``hc_ffn_*``):

    mixes = (vec(X) @ fn) * rsqrt(mean(vec(X)^2) + norm_eps)      # float32, [B, T, M*M+2M]
    pre  = sigmoid(mixes_pre  * scale[0] + base_pre) + hc_eps     # [B, T, M]
    post = 2 * sigmoid(mixes_post * scale[1] + base_post)          # [B, T, M]
    res  = Sinkhorn(mixes_res * scale[2] + base_res)               # [B, T, M, M], res[dst, src]
    y    = sublayer(RMSNorm(sum_m pre_m X_m))                      # the sub-layer's own norm
    X'   = res @ X + post^T y

and the final collapse is V4's head: ``sum_m w_m X_m`` with ``w = sigmoid(...) + hc_eps`` from
its own ``head_fn [M*D, M]``, ``head_scale [1]``, ``head_base [M]``.

Where the V4 code differs from the paper (``form="v4"``, the default, follows the code so V4
checkpoints load unchanged; ``form="paper"`` gives Eqs. 7-9; details in
:mod:`jaxmodels.ops.hyper_connections` and :mod:`jaxmodels.ops.sinkhorn`):

1. Sinkhorn: V4 starts from ``softmax(L) + eps``, normalises columns, then ``iters - 1`` rounds
   of (rows, columns), ``+ eps`` in every denominator, so it ends on columns; the paper starts
   from ``exp(L)`` and does (columns, rows) ``iters`` times, ending on rows.
2. V4 stores the M*M logits as ``comb[src, dst]`` and applies the Sinkhorn output transposed
   (``sum_i comb[i, j] X_i``); the paper's ``H_res`` is ``[dst, src]``. In the frame where the
   matrix acts on the streams both have exact row sums.
3. Pre weights: V4 ``sigmoid + eps``; paper ``sigmoid``.
4. The paper's RMSNorm weight is "absorbed in phi"; V4 has a weightless norm after the matmul.

Initialisation (V4's code is inference-only; transformers uses ``fn ~ N(0, init_std)``, base 0,
scale 1): we follow the one value the paper gives, gating factors ``alpha = scale = 0.01``
(Table 5), with ``fn ~ N(0, init_std)`` and zero biases, so at init ``pre ~ 0.5``, ``post ~ 1``
and ``res ~ 1/M`` (oracle 19: with identical streams the model is then ~ the pre-norm residual;
exactly so with ``fn_init_std=0``).

Diagnostics: with the ``"intermediates"`` collection mutable, every sub-layer sows its
``residual_matrix`` (float32, ``res[B, T, dst, src]``) and ``sublayer_index``; use
:func:`~jaxmodels.residual.hyper_connections.composite_gain_from_intermediates` for the paper's
Amax gain of the composite mapping (forward and backward) across layers.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels import registry
from jaxmodels.config import BlockSettings, ResidualConfig, check, check_choice, check_positive
from jaxmodels.layers import RMSNorm
from jaxmodels.ops.hyper_connections import mhc_head, mhc_num_mixes, mhc_post, mhc_pre
from jaxmodels.residual.hyper_connections import (
    STREAM_AXES,
    StreamState,
    init_stream_state,
    sow_residual_matrix,
)
from sharding.rules import constrain


@dataclasses.dataclass(frozen=True)
class MHCConfig(ResidualConfig):
    """mHC (arXiv 2512.24880; DeepSeek-V4 config keys).

    Attributes:
      hc_mult: number of residual streams M (V4: 4).
      hc_sinkhorn_iters: Sinkhorn-Knopp iterations (V4 and paper: 20).
      hc_eps: V4's eps added to the pre weights and inside Sinkhorn (1e-6; unused by the paper
        form except in the head).
      form: "v4" (DeepSeek-V4 code, checkpoint-compatible) or "paper" (Eqs. 7-9).
      alpha_init: initial ``scale`` entries (the paper's gating factors alpha, 0.01).
      fn_init_std: std of the normal init of ``fn`` / ``head_fn``; None = the model's init_std.
      sinkhorn_unroll: unrolling of the scans over Sinkhorn iterations, forward and backward
        (1: fastest on CPU and quick to compile; an int or True for accelerators). Does not
        change the result.
    """

    kind = "mhc"
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    form: str = "v4"
    alpha_init: float = 0.01
    fn_init_std: float | None = None
    sinkhorn_unroll: int | bool = 1

    def __post_init__(self):
        check_positive("mhc", hc_mult=self.hc_mult, hc_sinkhorn_iters=self.hc_sinkhorn_iters)
        check(self.hc_eps >= 0, f"mhc.hc_eps={self.hc_eps!r} must be >= 0")
        check_choice("mhc", "form", self.form, ("v4", "paper"))
        unroll = self.sinkhorn_unroll
        check(
            isinstance(unroll, bool) or (isinstance(unroll, int) and unroll >= 1),
            f"mhc.sinkhorn_unroll={unroll!r} must be a positive int or True (full unrolling)",
        )
        check(
            self.fn_init_std is None or self.fn_init_std >= 0,
            f"mhc.fn_init_std={self.fn_init_std!r} must be None or >= 0",
        )


def _fn_init(std: float):
    return nn.initializers.zeros_init() if std == 0 else nn.initializers.normal(stddev=std)


class MHCExpand(nn.Module):
    """Embedding [B, T, D] -> M identical streams (V4 repeats the embedding ``hc_mult`` times)."""

    config: MHCConfig
    settings: BlockSettings

    def __call__(self, x_BTD: jax.Array) -> StreamState:
        return init_stream_state(x_BTD, self.config.hc_mult)


class MHCSublayer(nn.Module):
    """One sub-layer's mHC mappings (V4 ``hc_attn_*`` / ``hc_ffn_*``) and its RMSNorm
    (``norm/scale``; V4 ``attn_norm`` / ``ffn_norm``).

    Parameters (float32): ``fn`` [M*D, M*M+2M] (the transpose of V4's ``hc_*_fn``), ``scale``
    [3] (alpha_pre, alpha_post, alpha_res), ``base`` [M*M+2M] ([pre | post | res logits]).
    """

    config: MHCConfig
    settings: BlockSettings

    @nn.compact
    def read(self, state: StreamState):
        cfg, d = self.config, self.settings.hidden_size
        m, k = cfg.hc_mult, mhc_num_mixes(cfg.hc_mult)
        std = self.settings.init_std if cfg.fn_init_std is None else cfg.fn_init_std
        f32 = jnp.float32
        fn = self.param(
            "fn", nn.with_logical_partitioning(_fn_init(std), ("embed", None)), (m * d, k), f32
        )
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.constant(cfg.alpha_init), (None,)),
            (3,),
            f32,
        )
        base = self.param(
            "base", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)), (k,), f32
        )
        h_BTD, post_BTM, res_BTMM = mhc_pre(
            state.streams_BTMD,
            fn,
            scale,
            base,
            iters=cfg.hc_sinkhorn_iters,
            eps=cfg.hc_eps,
            norm_eps=self.settings.norm_eps,
            form=cfg.form,
            sinkhorn_unroll=cfg.sinkhorn_unroll,
        )
        sow_residual_matrix(self, res_BTMM, state.index)
        x_BTD = RMSNorm(self.settings.norm_eps, self.settings.param_dtype, name="norm")(h_BTD)
        return x_BTD, (post_BTM, res_BTMM)

    def write(self, state: StreamState, y_BTD: jax.Array, ctx) -> StreamState:
        post_BTM, res_BTMM = ctx
        streams = mhc_post(state.streams_BTMD, y_BTD, post_BTM, res_BTMM)
        return StreamState(constrain(streams, STREAM_AXES), state.index + 1)


class MHCCollapse(nn.Module):
    """V4's head collapse (``hc_head``): ``sum_m w_m X_m``, ``w = sigmoid(.) + hc_eps``.

    Parameters (float32): ``head_fn`` [M*D, M] (transpose of V4's ``hc_head_fn``),
    ``head_scale`` [1], ``head_base`` [M]. The paper does not describe the output collapse; the
    paper form uses the same head without the ``+ eps``.
    """

    config: MHCConfig
    settings: BlockSettings

    @nn.compact
    def __call__(self, state: StreamState) -> jax.Array:
        cfg, d = self.config, self.settings.hidden_size
        m = cfg.hc_mult
        std = self.settings.init_std if cfg.fn_init_std is None else cfg.fn_init_std
        f32 = jnp.float32
        head_fn = self.param(
            "head_fn", nn.with_logical_partitioning(_fn_init(std), ("embed", None)), (m * d, m), f32
        )
        head_scale = self.param(
            "head_scale",
            nn.with_logical_partitioning(nn.initializers.constant(cfg.alpha_init), (None,)),
            (1,),
            f32,
        )
        head_base = self.param(
            "head_base",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
            (m,),
            f32,
        )
        return mhc_head(
            state.streams_BTMD,
            head_fn,
            head_scale,
            head_base,
            eps=cfg.hc_eps if cfg.form == "v4" else 0.0,
            norm_eps=self.settings.norm_eps,
        )


registry.register_residual(
    MHCConfig, expand_cls=MHCExpand, sublayer_cls=MHCSublayer, collapse_cls=MHCCollapse
)
