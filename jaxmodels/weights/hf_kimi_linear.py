"""Weight import from the Hugging Face `kimi_linear` layout into our KDA parameters (and back).

Checkpoint names (moonshotai/Kimi-Linear-48B-A3B, reference/attention.md §5.3; FLA
`fla/layers/kda.py` names its modules the same) under `model.layers.{i}.self_attn.`, and what
they become in `jaxmodels.attention.kda.DeltaAttention` (a torch `nn.Linear` weight is
[out, in], a depthwise `nn.Conv1d` weight [channels, 1, W]):

    q_proj.weight, k_proj.weight  [N H, D]      -> q_proj/kernel, k_proj/kernel  [D, N, H]
    v_proj.weight                 [N J, D]      -> v_proj/kernel                 [D, N, J]
    q_conv1d.weight, k_conv1d.weight [N H, 1, W] -> q_conv1d/kernel, k_conv1d/kernel [W, N, H]
    v_conv1d.weight               [N J, 1, W]   -> v_conv1d/kernel               [W, N, J]
    f_a_proj.weight               [H, D]        -> f_a_proj/kernel               [D, H]
    f_b_proj.weight               [N H, H]      -> f_b_proj/kernel               [H, N H]
    A_log                         [1, 1, N, 1]  -> A_log                         [N]
    dt_bias                       [N H]         -> dt_bias                       [N H]
    b_proj.weight                 [N, D]        -> b_proj/kernel                 [D, N]
    g_a_proj.weight               [H, D]        -> g_a_proj/kernel               [D, H]
    g_b_proj.weight               [N J, H]      -> g_b_proj/kernel               [H, N J]
    o_norm.weight                 [J]           -> o_norm/scale                  [J]
    o_proj.weight                 [D, N J]      -> o_proj/kernel                 [N, J, D]

transformers (`models/kimi_linear`, `KimiLinearDeltaAttention`) renames some of them when it
loads a checkpoint (its `conversion_mapping.py`): the three conv weights are concatenated into
one `conv1d.weight` [N H + N H + N J, 1, W] and `f_a_proj`, `f_b_proj`, `A_log`, `dt_bias` move
under `forget_gate.`. `kda_params_from_hf` reads either layout (a module's `state_dict()` or a
checkpoint shard); `kda_params_to_hf` writes either (`layout="checkpoint"` or
`"transformers"`). The MLA layers of a Kimi-Linear checkpoint use the `deepseek_v3` names:
`jaxmodels.weights.load_mla_layers`.
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxmodels.attention.kda import KDAConfig
from jaxmodels.config import ModelConfig
from jaxmodels.weights.hf_deepseek import (
    HF_LAYER_PREFIX,
    _get,
    _to_numpy,
)
from jaxmodels.weights.placement import copy_dicts, layer_path, place_tree

LAYOUTS = ("checkpoint", "transformers")
_FORGET_GATE = ("f_a_proj.weight", "f_b_proj.weight", "A_log", "dt_bias")
_UNSUPPORTED_BIASES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "b_proj",
    "g_b_proj",
    "o_proj",
    "q_conv1d",
    "k_conv1d",
    "v_conv1d",
    "conv1d",
)


def kda_config_from_hf(hf_config: Any, **overrides: Any) -> KDAConfig:
    """A `KDAConfig` from a Hugging Face `kimi_linear` config (object or `config.json` dict).

    Reads the checkpoint's `linear_attn_config` (`num_heads`, `head_dim`,
    `short_conv_kernel_size`) or, on a transformers config, `linear_num_heads`,
    `linear_head_dim`, `linear_conv_kernel_dim` (defaults 32, 128, 4 as transformers).
    `overrides` set other `KDAConfig` fields (e.g. `chunk_size`).
    """
    linear = dict(_get(hf_config, "linear_attn_config") or {})
    fields = dict(
        num_heads=int(linear.get("num_heads", _get(hf_config, "linear_num_heads", 32))),
        head_dim=int(linear.get("head_dim", _get(hf_config, "linear_head_dim", 128))),
        conv_kernel_size=int(
            linear.get("short_conv_kernel_size", _get(hf_config, "linear_conv_kernel_dim", 4))
        ),
    )
    fields.update(overrides)
    return KDAConfig(**fields)


def kda_params_from_hf(
    state_dict: Mapping[str, Any], config: KDAConfig, *, prefix: str = ""
) -> dict[str, dict[str, np.ndarray] | np.ndarray]:
    """Our `DeltaAttention` (kind "kda") parameters, float32 numpy, from HF `kimi_linear` weights.

    Args:
      state_dict: name -> tensor (torch, numpy or jax), in the checkpoint layout or the
        transformers module layout (detected from the names; see the module docstring).
      config: the target config (dims must match the weights).
      prefix: prepended to every name, e.g. "model.layers.0.self_attn.".

    Returns:
      The attention module's `params` subtree: {"q_proj": {"kernel": ...}, "A_log": ..., ...}.

    Raises:
      KeyError naming a missing weight; ValueError for a shape that does not fit `config` or a
      bias (the Kimi Linear layer has none).
    """
    N, H, J, W = config.num_heads, config.head_dim, config.value_dim, config.conv_kernel_size
    biases = [
        f"{prefix}{name}.bias"
        for name in _UNSUPPORTED_BIASES
        if f"{prefix}{name}.bias" in state_dict
    ]
    if biases:
        raise ValueError(f"{biases}: biases are not supported (the Kimi Linear layer has none)")
    transformers = f"{prefix}conv1d.weight" in state_dict

    def weight(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if transformers and name in _FORGET_GATE:
            name = "forget_gate." + name
        key = f"{prefix}{name}"
        if key not in state_dict:
            raise KeyError(f"{key!r} is missing from the state dict (config: {config})")
        w = _to_numpy(state_dict[key])
        if w.size == int(np.prod(shape)) and name.endswith("A_log"):
            w = w.reshape(shape)  # HF [1, 1, N, 1], FLA [N]
        if w.shape != shape:
            raise ValueError(f"{key!r} has shape {w.shape}, expected {shape} for {config}")
        return w

    D = _input_dim(state_dict, prefix)
    out: dict[str, Any] = {
        "q_proj": {"kernel": weight("q_proj.weight", (N * H, D)).T.reshape(D, N, H)},
        "k_proj": {"kernel": weight("k_proj.weight", (N * H, D)).T.reshape(D, N, H)},
        "v_proj": {"kernel": weight("v_proj.weight", (N * J, D)).T.reshape(D, N, J)},
    }
    conv_names, conv_dims = ("q_conv1d", "k_conv1d", "v_conv1d"), (H, H, J)
    if transformers:  # one [N H + N H + N J, 1, W] weight
        conv = weight("conv1d.weight", (2 * N * H + N * J, 1, W))[:, 0]
        convs_CW = np.split(conv, [N * H, 2 * N * H])
    else:
        convs_CW = [
            weight(f"{name}.weight", (N * dim, 1, W))[:, 0]
            for name, dim in zip(conv_names, conv_dims, strict=True)
        ]
    for name, conv_CW, dim in zip(conv_names, convs_CW, conv_dims, strict=True):
        out[name] = {"kernel": conv_CW.T.reshape(W, N, dim)}
    out["f_a_proj"] = {"kernel": weight("f_a_proj.weight", (H, D)).T}
    out["f_b_proj"] = {"kernel": weight("f_b_proj.weight", (N * H, H)).T}
    out["A_log"] = weight("A_log", (N,))
    out["dt_bias"] = weight("dt_bias", (N * H,))
    out["b_proj"] = {"kernel": weight("b_proj.weight", (N, D)).T}
    out["g_a_proj"] = {"kernel": weight("g_a_proj.weight", (H, D)).T}
    out["g_b_proj"] = {"kernel": weight("g_b_proj.weight", (N * J, H)).T}
    out["o_norm"] = {"scale": weight("o_norm.weight", (J,))}
    out["o_proj"] = {"kernel": weight("o_proj.weight", (D, N * J)).T.reshape(N, J, D)}
    return jax.tree.map(np.ascontiguousarray, out)


def _input_dim(state_dict: Mapping[str, Any], prefix: str) -> int:
    key = f"{prefix}q_proj.weight"
    if key not in state_dict:
        raise KeyError(f"{key!r} is missing from the state dict")
    return int(np.shape(state_dict[key])[-1])


def kda_params_to_hf(
    params: Mapping[str, Any],
    config: KDAConfig,
    *,
    prefix: str = "",
    layout: str = "checkpoint",
) -> dict[str, np.ndarray]:
    """The inverse of `kda_params_from_hf`: HF-named float32 weights from ours.

    `layout="checkpoint"`: the checkpoint's names (`q_conv1d.weight`, ..., `A_log` [1, 1, N, 1]);
    `"transformers"`: what `KimiLinearDeltaAttention.load_state_dict` takes (`conv1d.weight`,
    `forget_gate.*`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {list(LAYOUTS)}")
    N, H, J, W = config.num_heads, config.head_dim, config.value_dim, config.conv_kernel_size

    def get(name: str, leaf: str | None = "kernel") -> np.ndarray:
        return _to_numpy(params[name] if leaf is None else params[name][leaf])

    D = get("q_proj").shape[0]
    out = {
        "q_proj.weight": get("q_proj").reshape(D, N * H).T,
        "k_proj.weight": get("k_proj").reshape(D, N * H).T,
        "v_proj.weight": get("v_proj").reshape(D, N * J).T,
    }
    convs = {
        name: get(name).reshape(W, -1).T[:, None, :]
        for name in ("q_conv1d", "k_conv1d", "v_conv1d")
    }
    gate = {
        "f_a_proj.weight": get("f_a_proj").T,
        "f_b_proj.weight": get("f_b_proj").T,
        "A_log": get("A_log", None).reshape(1, 1, N, 1),
        "dt_bias": get("dt_bias", None),
    }
    if layout == "transformers":
        out["conv1d.weight"] = np.concatenate(list(convs.values()), axis=0)
        out.update({f"forget_gate.{k}": v for k, v in gate.items()})
    else:
        out.update({f"{k}.weight": v for k, v in convs.items()})
        out.update(gate)
    out["b_proj.weight"] = get("b_proj").T
    out["g_a_proj.weight"] = get("g_a_proj").T
    out["g_b_proj.weight"] = get("g_b_proj").T
    out["o_norm.weight"] = get("o_norm", "scale")
    out["o_proj.weight"] = get("o_proj").reshape(N * J, D).T
    return {prefix + k: np.ascontiguousarray(v) for k, v in out.items()}


def load_kda_layers(
    params: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    config: ModelConfig,
    *,
    layer_prefix: str = HF_LAYER_PREFIX,
) -> dict[str, Any]:
    """Copies the weights of every KDA layer of an HF `kimi_linear` checkpoint into `Decoder`
    params, as `jaxmodels.weights.load_mla_layers` does for its MLA layers.

    Args:
      params: `Decoder(config)` variables (`{"params": ...}`, unboxed), scanned or unrolled.
      state_dict: HF weights named `layer_prefix.format(i) + "q_proj.weight"` etc. (either
        layout of `kda_params_from_hf`).
      config: the model config; layer i is imported when its attention is a `KDAConfig`.
      layer_prefix: format string of a layer's attention prefix.

    Returns:
      New variables (the input is not modified) with each KDA layer's attention parameters
      replaced, in the dtype and (for jax arrays) the sharding of the parameters they replace.
    """
    new = dict(params)
    new["params"] = copy_dicts(params["params"])
    for layer, attention in enumerate(config.layer_attention):
        if not isinstance(attention, KDAConfig):
            continue
        path, index = layer_path(config, layer)
        imported = kda_params_from_hf(state_dict, attention, prefix=layer_prefix.format(layer))
        place_tree(new["params"], path + ("attention",), index, imported)
    return new
