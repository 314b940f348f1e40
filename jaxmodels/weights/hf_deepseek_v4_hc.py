"""Weight import of DeepSeek-V4's mHC (hyper-connection) parameters into a `Decoder` whose
residual kind is ``"mhc"`` (:class:`jaxmodels.residual.mhc.MHCConfig`, ``form="v4"``).

Names (transformers ``models/deepseek_v4``: ``DeepseekV4HyperConnection`` /
``DeepseekV4HyperHead``; the official checkpoint's names, which transformers renames on load,
in brackets) and what they become (``M = hc_mult``, ``D = hidden_size``, ``K = M*M + 2M``):

    model.layers.{i}.attn_hc.fn     [K, M*D]  (layers.{i}.hc_attn_fn)
        -> attention_residual/fn [M*D, K]
    model.layers.{i}.attn_hc.base   [K]       (layers.{i}.hc_attn_base)  -> attention_residual/base
    model.layers.{i}.attn_hc.scale  [3]       (layers.{i}.hc_attn_scale) -> attention_residual/scale
    model.layers.{i}.ffn_hc.{fn,base,scale}   (layers.{i}.hc_ffn_*)      -> mlp_residual/...
    model.hc_head.hc_fn    [M, M*D]  (hc_head_fn)    -> collapse/head_fn [M*D, M]
    model.hc_head.hc_base  [M]       (hc_head_base)  -> collapse/head_base
    model.hc_head.hc_scale [1]       (hc_head_scale) -> collapse/head_scale
  with ``include_norms`` (the RMSNorms that surround the mHC mappings):
    model.layers.{i}.input_layernorm.weight          (layers.{i}.attn_norm.weight)
        -> attention_residual/norm/scale
    model.layers.{i}.post_attention_layernorm.weight (layers.{i}.ffn_norm.weight)
        -> mlp_residual/norm/scale
    model.norm.weight                                (norm.weight) -> final_norm/scale

``fn`` is stored transposed (a torch ``F.linear`` weight is [out, in]); the flattened-stream
index is ``m * D + d`` in both. Our ``res = comb^T`` convention is applied inside the op
(:func:`jaxmodels.ops.hyper_connections.mhc_coefficients`), so the weights themselves are copied
unchanged: V4's ``comb`` logits are read row-major as ``[src, dst]``, as the code does. The
paper form (``MHCConfig(form="paper")``) reads the same logits as ``[dst, src]``, so importing
into it is refused.

The names ``"model."``-prefixed (``DeepseekV4ForCausalLM``), unprefixed (``DeepseekV4Model``)
and the original checkpoint's are all accepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxmodels.config import ConfigError, ModelConfig
from jaxmodels.ops.hyper_connections import mhc_num_mixes
from jaxmodels.residual.mhc import MHCConfig
from jaxmodels.weights.placement import copy_dicts, layer_path, set_leaf

# original DeepSeek-V4 checkpoint name -> transformers name (transformers conversion_mapping)
_RENAMES = (
    (re.compile(r"^layers\.(\d+)\.hc_attn_(fn|base|scale)$"), r"layers.\1.attn_hc.\2"),
    (re.compile(r"^layers\.(\d+)\.hc_ffn_(fn|base|scale)$"), r"layers.\1.ffn_hc.\2"),
    (re.compile(r"^hc_head_(fn|base|scale)$"), r"hc_head.hc_\1"),
    (re.compile(r"^layers\.(\d+)\.attn_norm\.weight$"), r"layers.\1.input_layernorm.weight"),
    (
        re.compile(r"^layers\.(\d+)\.ffn_norm\.weight$"),
        r"layers.\1.post_attention_layernorm.weight",
    ),
)
_SUBLAYERS = (("attn_hc", "attention_residual"), ("ffn_hc", "mlp_residual"))
_NORMS = (("input_layernorm", "attention_residual"), ("post_attention_layernorm", "mlp_residual"))


def _to_numpy(x: Any) -> np.ndarray:
    """float32 numpy from a numpy array, a jax array or a torch tensor (no torch import)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def canonical_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict with unprefixed transformers names (``layers.3.attn_hc.fn``, ...):
    strips a leading ``"model."`` and renames the original V4 checkpoint's ``hc_attn_fn`` etc."""
    out = {}
    for name, value in state_dict.items():
        key = name[len("model.") :] if name.startswith("model.") else name
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def _check_config(config: ModelConfig) -> MHCConfig:
    residual = config.residual
    if not isinstance(residual, MHCConfig):
        raise ConfigError(
            f"model.residual is {type(residual).__name__} (kind {residual.kind!r}); DeepSeek-V4 "
            "hyper-connection weights need MHCConfig (kind 'mhc')"
        )
    if residual.form != "v4":
        raise ConfigError(
            f"mhc.form={residual.form!r}: DeepSeek-V4 weights are only valid for form='v4' (the "
            "paper form reads the residual logits transposed and has no eps)"
        )
    return residual


def hc_params_from_hf(
    state_dict: Mapping[str, Any], config: ModelConfig, *, include_norms: bool = True
) -> dict[tuple[tuple[str, ...], int | None], np.ndarray]:
    """Every mHC (and, with ``include_norms``, surrounding RMSNorm) weight in our layout.

    Returns:
      {(parameter path under "params", scan index or None): float32 numpy array}.

    Raises:
      ConfigError if the model's residual kind is not mHC (form "v4"); KeyError naming a missing
      weight; ValueError for a shape that does not fit the config.
    """
    residual = _check_config(config)
    m, d, k = residual.hc_mult, config.hidden_size, mhc_num_mixes(residual.hc_mult)
    weights = canonical_names(state_dict)

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in weights:
            raise KeyError(f"{name!r} is missing from the state dict (hc_mult={m}, D={d})")
        w = _to_numpy(weights[name])
        if w.shape != shape:
            raise ValueError(
                f"{name!r} has shape {w.shape}, expected {shape} for hc_mult={m}, hidden_size={d}"
            )
        return w

    out = {}
    for layer in range(config.num_layers):
        path, index = layer_path(config, layer)
        for hf, ours in _SUBLAYERS:
            prefix = f"layers.{layer}.{hf}."
            out[(path + (ours, "fn"), index)] = get(prefix + "fn", (k, m * d)).T
            out[(path + (ours, "base"), index)] = get(prefix + "base", (k,))
            out[(path + (ours, "scale"), index)] = get(prefix + "scale", (3,))
        if include_norms:
            for hf, ours in _NORMS:
                out[(path + (ours, "norm", "scale"), index)] = get(
                    f"layers.{layer}.{hf}.weight", (d,)
                )
    out[(("collapse", "head_fn"), None)] = get("hc_head.hc_fn", (m, m * d)).T
    out[(("collapse", "head_base"), None)] = get("hc_head.hc_base", (m,))
    out[(("collapse", "head_scale"), None)] = get("hc_head.hc_scale", (1,))
    if include_norms:
        out[(("final_norm", "scale"), None)] = get("norm.weight", (d,))
    return {key: np.ascontiguousarray(v) for key, v in out.items()}


def load_hc_weights(
    params: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    config: ModelConfig,
    *,
    include_norms: bool = True,
) -> dict[str, Any]:
    """Copies DeepSeek-V4's mHC weights (and its attention/FFN/final RMSNorms) into `Decoder`
    variables.

    Args:
      params: ``Decoder(config)`` variables (``{"params": ...}``, unboxed), scanned or unrolled.
      state_dict: name -> tensor (torch, numpy or jax), transformers or original V4 names, e.g.
        ``DeepseekV4ForCausalLM.state_dict()`` or a checkpoint shard (only the names listed in
        the module docstring are read; other weights are ignored).
      config: the model config; ``config.residual`` must be ``MHCConfig(form="v4")`` with the
        checkpoint's ``hc_mult`` (and, for equal outputs, its ``hc_sinkhorn_iters``, ``hc_eps``
        and ``rms_norm_eps``).
      include_norms: also copy ``input_layernorm`` / ``post_attention_layernorm`` / ``norm``.

    Returns:
      New variables (the input is not modified); each imported leaf keeps the dtype and, for jax
      arrays, the sharding of the parameter it replaces. Everything else is left as it is.
    """
    imported = hc_params_from_hf(state_dict, config, include_norms=include_norms)
    new = dict(params)
    new["params"] = copy_dicts(params["params"])
    for (path, index), value in imported.items():
        set_leaf(new["params"], path, index, value)
    return new


def hc_params_to_hf(
    params: Mapping[str, Any], config: ModelConfig, *, include_norms: bool = True
) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_hc_weights`: transformers-named (unprefixed, as
    ``DeepseekV4Model.state_dict()``) float32 weights from our variables."""
    _check_config(config)
    tree = params["params"]

    def get(path: tuple[str, ...], index: int | None) -> np.ndarray:
        node = tree
        for key in path:
            node = node[key]
        value = _to_numpy(node)
        return value if index is None else value[index]

    out = {}
    for layer in range(config.num_layers):
        path, index = layer_path(config, layer)
        for hf, ours in _SUBLAYERS:
            prefix = f"layers.{layer}.{hf}."
            out[prefix + "fn"] = get(path + (ours, "fn"), index).T
            out[prefix + "base"] = get(path + (ours, "base"), index)
            out[prefix + "scale"] = get(path + (ours, "scale"), index)
        if include_norms:
            for hf, ours in _NORMS:
                out[f"layers.{layer}.{hf}.weight"] = get(path + (ours, "norm", "scale"), index)
    out["hc_head.hc_fn"] = get(("collapse", "head_fn"), None).T
    out["hc_head.hc_base"] = get(("collapse", "head_base"), None)
    out["hc_head.hc_scale"] = get(("collapse", "head_scale"), None)
    if include_norms:
        out["norm.weight"] = get(("final_norm", "scale"), None)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
