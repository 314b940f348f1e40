"""Attention Residuals (AttnRes; Kimi Team, arXiv 2603.15031) as a residual kind: softmax
attention over depth instead of the pre-norm sum.

Each sub-layer ``l`` (attention and MLP separately) reads

    h_l = sum_s alpha_{s->l} v_s,    alpha_{.->l} = softmax_s(w_l . RMSNorm(v_s))

over its sources ``v_s`` with one learned pseudo-query ``w_l`` [D] per sub-layer (zero-init, so
at init every read is the uniform average of its sources) and RMS-normalised keys (with a
learned gain, ``key_norm_scale``; fla's ``rms_weight``). The sub-layer then applies its own
RMSNorm (``norm/scale``, as the pre-norm kind). A final pseudo-query in the collapse module
reads the output before the decoder's final RMSNorm.

* ``mode="full"``: sources = the token embedding and every previous sub-layer output.
* ``mode="block"``: sub-layers are grouped in blocks of ``block_size`` outputs; sources = the
  embedding, the sum of each completed block and the partial sum of the current block if it is
  non-empty (the paper's Block AttnRes; "~8 blocks recover most of Full AttnRes's gains").
  ``block_size=1`` is Full AttnRes. ``block_size`` counts sub-layer outputs, so a block of k
  decoder layers is ``block_size=2k``.

At zero queries the read is ``mean(sources)``, and since the sources sum to the pre-norm residual
``RMSNorm(mean) == RMSNorm(sum)``: a freshly initialised AttnRes model computes the pre-norm
model's function (reference notes oracle 23).

The sources live in a static buffer (:class:`jaxmodels.ops.attn_res.AttnResState`,
``[1 + 2L / block_size, B, T, D]`` plus the partial block) so the state has a fixed shape for
``nn.scan``; its size needs the number of decoder layers, read from the enclosing ``Decoder``
(see :class:`AttnResConfig`). Memory note: reverse-mode differentiation through ``nn.scan``
keeps the buffer once per scanned step, O(L * sources) -- block mode keeps it small.

Diagnostics: with the ``"intermediates"`` collection mutable, every read sows ``depth_weights``
[S + 1, B, T] (float32, slot order of :func:`jaxmodels.ops.attn_res.attn_res_sources`: the
embedding, completed blocks / outputs, ..., the partial block last; masked slots exactly 0) and
``sublayer_index``; :func:`collect_depth_weights` stacks them in depth order.

References: fla ``fla/ops/attnres/naive.py``; MaxText ``layers/attn_res.py``; the AttnRes README
pseudocode (reference notes §9).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels import registry
from jaxmodels.config import (
    DTYPES,
    BlockSettings,
    ConfigError,
    ModelConfig,
    ResidualConfig,
    check_choice,
    check_positive,
)
from jaxmodels.layers import RMSNorm
from jaxmodels.ops.attn_res import (
    AttnResState,
    attn_res_max_sources,
    attn_res_push,
    attn_res_read,
    attn_res_state_init,
)
from jaxmodels.residual.hyper_connections import DIAGNOSTICS, collect_sown
from sharding.rules import constrain

BUFFER_AXES = (None, "batch", "length", "act_embed")
ACT_AXES = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class AttnResConfig(ResidualConfig):
    """Attention Residuals (arXiv 2603.15031).

    Attributes:
      mode: "full" (every sub-layer output is a source; block size 1) or "block".
      block_size: sub-layer outputs per block in "block" mode (attention and MLP count
        separately: 8 = four decoder layers per block). Ignored in "full" mode.
      num_layers: number of decoder layers, which sizes the static source buffer. None (the
        default): taken from the enclosing ``Decoder``'s config (or ``BlockSettings`` once it
        carries the depth); needed only to use the modules outside a ``Decoder``. When several
        are known they must agree (ConfigError otherwise). A buffer that still overflows
        poisons the output with NaN rather than silently overwriting sources.
      key_norm_scale: learned gain on the key RMSNorm (fla ``rms_weight``; the README's RMSNorm
        module). False: unscaled keys (MaxText).
      buffer_dtype: dtype of the source buffer ("float32" keeps block sums exact in bf16 models).
    """

    kind = "attn_res"
    mode: str = "block"
    block_size: int = 8
    num_layers: int | None = None
    key_norm_scale: bool = True
    buffer_dtype: str = "float32"

    def __post_init__(self):
        check_choice("attn_res", "mode", self.mode, ("full", "block"))
        check_positive("attn_res", block_size=self.block_size)
        if self.num_layers is not None:
            check_positive("attn_res", num_layers=self.num_layers)
        check_choice("attn_res", "buffer_dtype", self.buffer_dtype, tuple(DTYPES))

    @property
    def effective_block_size(self) -> int:
        return 1 if self.mode == "full" else self.block_size


def _num_layers(
    config: AttnResConfig, settings: BlockSettings, model_layers: int | None = None
) -> int:
    """The model's depth: from `settings` (if it carries `num_layers`), the enclosing
    `Decoder`'s config, or `config.num_layers`; all that are known must agree."""
    known = {
        "BlockSettings.num_layers": getattr(settings, "num_layers", None),
        "the decoder's num_layers": model_layers,
        "attn_res.num_layers": config.num_layers,
    }
    known = {k: v for k, v in known.items() if v}
    if len(set(known.values())) > 1:
        raise ConfigError(
            "attn_res: the model depth is ambiguous: "
            + ", ".join(f"{k}={v}" for k, v in known.items())
            + "; leave attn_res.num_layers=None or make it equal the model's num_layers"
        )
    if not known:
        raise ConfigError(
            "attn_res.num_layers=None and no enclosing Decoder: set AttnResConfig(num_layers=...) "
            "so the depth-attention source buffer can be sized"
        )
    return next(iter(known.values()))


def max_sources(
    config: AttnResConfig, settings: BlockSettings, model_layers: int | None = None
) -> int:
    """Static buffer slots: the embedding plus every block that can complete."""
    layers = _num_layers(config, settings, model_layers)
    return attn_res_max_sources(2 * layers, config.effective_block_size)


class AttnResExpand(nn.Module):
    """Embedding [B, T, D] -> :class:`AttnResState` holding it as source 0."""

    config: AttnResConfig
    settings: BlockSettings

    def __call__(self, x_BTD: jax.Array) -> AttnResState:
        model = getattr(self.parent, "config", None)  # the Decoder's ModelConfig, if any
        model_layers = model.num_layers if isinstance(model, ModelConfig) else None
        slots = max_sources(self.config, self.settings, model_layers)
        state = attn_res_state_init(x_BTD, slots, dtype=DTYPES[self.config.buffer_dtype])
        return state._replace(
            sources_SBTD=constrain(state.sources_SBTD, BUFFER_AXES),
            partial_BTD=constrain(state.partial_BTD, ACT_AXES),
        )


class _DepthRead(nn.Module):
    """Pseudo-query ``query`` [D] (zeros) and key gain ``key_norm_scale`` [D] (ones), float32."""

    config: AttnResConfig
    settings: BlockSettings

    def depth_read(self, state: AttnResState) -> jax.Array:
        d = self.settings.hidden_size
        query = self.param(
            "query",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
            (d,),
            jnp.float32,
        )
        gain = None
        if self.config.key_norm_scale:
            gain = self.param(
                "key_norm_scale",
                nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                (d,),
                jnp.float32,
            )
        h_BTD, weights_SBT = attn_res_read(
            state, query, gain, eps=self.settings.norm_eps, return_weights=True
        )
        if self.is_mutable_collection(DIAGNOSTICS):
            self.sow(DIAGNOSTICS, "depth_weights", weights_SBT)
            self.sow(DIAGNOSTICS, "sublayer_index", pushes(state, self.config))
        return constrain(h_BTD.astype(self.settings.dtype), ACT_AXES)


def pushes(state: AttnResState, config: AttnResConfig) -> jax.Array:
    """Number of sub-layer outputs pushed so far (int32 [])."""
    return (state.num_sources - 1) * config.effective_block_size + state.partial_count


class AttnResSublayer(_DepthRead):
    """One sub-layer's pseudo-query and key gain, plus its RMSNorm (``norm/scale``)."""

    @nn.compact
    def read(self, state: AttnResState):
        h_BTD = self.depth_read(state)
        norm = RMSNorm(self.settings.norm_eps, self.settings.param_dtype, name="norm")
        return norm(h_BTD), None

    def write(self, state: AttnResState, y_BTD: jax.Array, ctx) -> AttnResState:
        del ctx
        state = attn_res_push(state, y_BTD, self.config.effective_block_size)
        return state._replace(
            sources_SBTD=constrain(state.sources_SBTD, BUFFER_AXES),
            partial_BTD=constrain(state.partial_BTD, ACT_AXES),
        )


class AttnResCollapse(_DepthRead):
    """The final depth read (its own ``query`` / ``key_norm_scale``) -> [B, T, D].

    If the buffer overflowed (``num_layers`` smaller than the model's depth) the output is NaN.
    """

    @nn.compact
    def __call__(self, state: AttnResState) -> jax.Array:
        out_BTD = self.depth_read(state)
        overflow = state.num_sources > state.sources_SBTD.shape[0]
        return jnp.where(overflow, jnp.asarray(jnp.nan, out_BTD.dtype), out_BTD)


def collect_depth_weights(intermediates: Any) -> jax.Array:
    """Depth-attention weights of every read, [L_sub + 1, S + 1, B, T], in depth order.

    Row ``l`` < L_sub is sub-layer ``l``'s read, the last row the final (collapse) read. Slots
    follow :func:`jaxmodels.ops.attn_res.attn_res_sources`: slot 0 the embedding, slots 1.. the
    completed blocks (Full AttnRes: the sub-layer outputs in order), the last slot the partial
    block; empty slots are exactly 0 and every row sums to 1.
    """
    if hasattr(intermediates, "get") and DIAGNOSTICS in intermediates:
        intermediates = intermediates[DIAGNOSTICS]
    return collect_sown(intermediates, "depth_weights")


registry.register_residual(
    AttnResConfig,
    expand_cls=AttnResExpand,
    sublayer_cls=AttnResSublayer,
    collapse_cls=AttnResCollapse,
)
