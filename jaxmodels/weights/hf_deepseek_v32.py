"""Weight import from the Hugging Face `deepseek_v32` layout (DeepSeek-V3.2) into DSA layers.

The MLA part of a `deepseek_v32` attention block has the `deepseek_v3` names and is converted by
`jaxmodels.weights.hf_deepseek` (including the interleaved rope columns). The lightning indexer
(transformers `models/deepseek_v32`, class `DeepseekV32Indexer`; V3.2-Exp `inference/model.py`
class `Indexer`) adds, under the block's `indexer.` prefix (torch `nn.Linear` weights are
[out, in]):

    indexer.wq_b.weight          [J Ih, Cq]  -> indexer/wq_b/kernel          [Cq, J, Ih]
    indexer.wk.weight            [Ih, D]     -> indexer/wk/kernel            [D, Ih]
    indexer.k_norm.weight        [Ih]        -> indexer/k_norm/scale         [Ih]
    indexer.k_norm.bias          [Ih]        -> indexer/k_norm/bias          [Ih]
    indexer.weights_proj.weight  [J, D]      -> indexer/weights_proj/kernel  [D, J]

The indexer's rope dims are the first `qk_rope_head_dim` of each head in the half-split layout
in both Hugging Face's code and ours (reference/attention.md §2.1 erratum), so its columns are
copied as they are.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxmodels.attention.dsa import DSAConfig
from jaxmodels.config import ModelConfig
from jaxmodels.weights.hf_deepseek import (
    HF_LAYER_PREFIX,
    _get,
    _to_numpy,
    load_mla_layers,
    mla_config_from_hf,
    mla_params_from_hf,
    mla_params_to_hf,
)
from jaxmodels.weights.placement import layer_path, place_tree


def dsa_config_from_hf(hf_config: Any, **overrides: Any) -> DSAConfig:
    """A `DSAConfig` from a Hugging Face `deepseek_v32` config (object or `config.json` dict).

    MLA fields as `mla_config_from_hf`; reads `index_n_heads`, `index_head_dim`, `index_topk`.
    `overrides` set any DSAConfig field (e.g. `indexer_stage="off"` for inference).
    """
    indexer = dict(
        index_n_heads=int(_get(hf_config, "index_n_heads", 64)),
        index_head_dim=int(_get(hf_config, "index_head_dim", 128)),
        index_topk=int(_get(hf_config, "index_topk", 2048)),
    )
    return DSAConfig.from_mla(mla_config_from_hf(hf_config), **{**indexer, **overrides})


def indexer_params_from_hf(
    state_dict: Mapping[str, Any], config: DSAConfig, *, prefix: str = ""
) -> dict[str, dict[str, np.ndarray]]:
    """Our `indexer` parameter subtree (float32 numpy) from HF `indexer.*` weights.

    Args:
      state_dict: name -> tensor (torch, numpy or jax).
      config: the target DSA config (dims must match).
      prefix: the attention block's prefix, e.g. "model.layers.3.self_attn."; "indexer." is
        appended.

    Raises:
      KeyError naming a missing weight; ValueError for a shape that does not fit `config`.
    """
    J, I, Cq = config.index_n_heads, config.index_head_dim, config.q_lora_rank
    base = f"{prefix}indexer."
    wk_key = f"{base}wk.weight"
    if wk_key not in state_dict:
        raise KeyError(f"{wk_key!r} is missing from the state dict")
    D = np.shape(state_dict[wk_key])[-1]

    def weight(name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = base + name
        if key not in state_dict:
            raise KeyError(f"{key!r} is missing from the state dict (config: {config})")
        w = _to_numpy(state_dict[key])
        if w.shape != shape:
            raise ValueError(f"{key!r} has shape {w.shape}, expected {shape} for {config}")
        return w

    out = {
        "wq_b": {"kernel": weight("wq_b.weight", (J * I, Cq)).T.reshape(Cq, J, I)},
        "wk": {"kernel": weight("wk.weight", (I, D)).T},
        "k_norm": {"scale": weight("k_norm.weight", (I,)), "bias": weight("k_norm.bias", (I,))},
        "weights_proj": {"kernel": weight("weights_proj.weight", (J, D)).T},
    }
    return {k: {n: np.ascontiguousarray(a) for n, a in v.items()} for k, v in out.items()}


def indexer_params_to_hf(
    params: Mapping[str, Any], config: DSAConfig, *, prefix: str = ""
) -> dict[str, np.ndarray]:
    """Inverse of `indexer_params_from_hf`: HF-named float32 weights from our `indexer` tree."""
    J, I, Cq = config.index_n_heads, config.index_head_dim, config.q_lora_rank
    base = f"{prefix}indexer."
    out = {
        "wq_b.weight": _to_numpy(params["wq_b"]["kernel"]).reshape(Cq, J * I).T,
        "wk.weight": _to_numpy(params["wk"]["kernel"]).T,
        "k_norm.weight": _to_numpy(params["k_norm"]["scale"]),
        "k_norm.bias": _to_numpy(params["k_norm"]["bias"]),
        "weights_proj.weight": _to_numpy(params["weights_proj"]["kernel"]).T,
    }
    return {base + k: np.ascontiguousarray(v) for k, v in out.items()}


def dsa_params_from_hf(
    state_dict: Mapping[str, Any],
    config: DSAConfig,
    *,
    prefix: str = "",
    rope_interleave: bool = True,
) -> dict[str, Any]:
    """A whole `DSAttention` parameter tree from a HF `DeepseekV32Attention` block's weights."""
    params: dict[str, Any] = mla_params_from_hf(
        state_dict, config, prefix=prefix, rope_interleave=rope_interleave
    )
    params["indexer"] = indexer_params_from_hf(state_dict, config, prefix=prefix)
    return params


def dsa_params_to_hf(
    params: Mapping[str, Any], config: DSAConfig, *, prefix: str = "", rope_interleave: bool = True
) -> dict[str, np.ndarray]:
    """Inverse of `dsa_params_from_hf`."""
    out = mla_params_to_hf(params, config, prefix=prefix, rope_interleave=rope_interleave)
    out.update(indexer_params_to_hf(params["indexer"], config, prefix=prefix))
    return out


def load_dsa_layers(
    params: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    config: ModelConfig,
    *,
    layer_prefix: str = HF_LAYER_PREFIX,
    rope_interleave: bool = True,
) -> dict[str, Any]:
    """Copies every DSA (and MLA) layer's attention weights of an HF checkpoint into `Decoder`
    params: the MLA part by `load_mla_layers` (a `DSAConfig` is an `MLAConfig`), then each DSA
    layer's indexer. Same conventions as `load_mla_layers` (new tree returned, dtypes and
    shardings of the replaced leaves kept, scanned stacks updated at the layer's index)."""
    new = load_mla_layers(
        params, state_dict, config, layer_prefix=layer_prefix, rope_interleave=rope_interleave
    )
    for layer, attention in enumerate(config.layer_attention):
        if not isinstance(attention, DSAConfig):
            continue
        path, index = layer_path(config, layer)
        imported = indexer_params_from_hf(state_dict, attention, prefix=layer_prefix.format(layer))
        place_tree(new["params"], path + ("attention", "indexer"), index, imported)
    return new
