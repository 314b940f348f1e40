"""Import DeepSeek-V4 attention weights from the Hugging Face `deepseek_v4` layout.

Maps `transformers.models.deepseek_v4.modeling_deepseek_v4.DeepseekV4Attention` parameter names
(`model.layers.{i}.self_attn.*`) onto `jaxmodels.attention.v4.V4Attention` parameters, and the
HF `DeepseekV4Config` (object or `config.json` dict, including the official checkpoint's legacy
keys `compress_ratios`, `qk_rope_head_dim`, `rope_scaling`) onto `V4Config`s and a layer pattern.

Parameter map (torch Linear weights are [out, in]; ours [in, out]):

| HF (`self_attn.` ...)                          | ours (`attention/` ...)                     |
| --- | --- |
| q_a_proj.weight [C, D]                         | q_a_proj/kernel [D, C]                      |
| q_a_norm.weight [C]                            | q_a_norm/scale                              |
| q_b_proj.weight [N*H, C]                       | q_b_proj/kernel [C, N, H]                   |
| kv_proj.weight [H, D], kv_norm.weight [H]      | kv_proj/kernel [D, H], kv_norm/scale        |
| o_a_proj.weight [G*O, N*H/G] (grouped)         | o_a_proj/kernel [N, H, O]                   |
| o_b_proj.weight [D, G*O]                       | o_b_proj/kernel [G, O, D]                   |
| sinks [N]                                      | sinks [N]                                   |
| compressor.{kv_proj,gate_proj}.weight [X, D]   | compressor/{kv_proj,gate_proj}/kernel [D,X] |
| compressor.position_bias [r, X]                | compressor/position_bias                    |
| compressor.kv_norm.weight [H]                  | compressor/kv_norm/scale                    |
| compressor.indexer.{kv_proj,gate_proj,position_bias,kv_norm} | indexer/... (as above)        |
| compressor.indexer.q_b_proj.weight [n*I, C]    | indexer/q_b_proj/kernel [C, n, I]           |
| compressor.indexer.scorer.weights_proj.weight [n, D] | indexer/weights_proj/kernel [D, n]    |

Both sides use interleaved RoPE on the trailing `qk_rope_head_dim` dims, so no column
permutation is needed. Only the attention layers are imported: V4's MoE, mHC and MTP modules are
other issues' (the decoder here wraps every layer in this library's residual/MLP kinds).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxmodels.attention.v4 import V4Config

_DEFAULT_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
LABELS = {0: "v4_window", 4: "v4_csa", 128: "v4_hca"}


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def layer_kinds(hf_config: Any) -> list[tuple[str, int, bool | None]]:
    """Per layer (label, compress ratio, csa) from HF `layer_types` + `compress_rates`, or from
    the official config's `compress_ratios` list (0 window, 4 CSA, otherwise HCA).

    Labels: "v4_window", "v4_csa", "v4_hca" (an official ratio other than 0/4/128: "v4_r{r}").
    """
    layer_types = _get(hf_config, "layer_types")
    n = _get(hf_config, "num_hidden_layers")
    if layer_types is None:
        ratios = _get(hf_config, "compress_ratios")
        if ratios is None:
            raise ValueError("the config has neither `layer_types` nor `compress_ratios`")
        out = []
        for r in ratios[:n]:
            r = int(r or 0)
            out.append((LABELS.get(r, f"v4_r{r}"), r, None))
        return out
    rates = dict(_DEFAULT_RATES)
    rates.update(_get(hf_config, "compress_rates") or {})
    kinds = {
        "sliding_attention": ("v4_window", 0, None),
        "compressed_sparse_attention": ("v4_csa", int(rates["compressed_sparse_attention"]), True),
        "heavily_compressed_attention": (
            "v4_hca",
            int(rates["heavily_compressed_attention"]),
            False,
        ),
    }
    out = []
    for layer_type in layer_types[:n]:
        if layer_type not in kinds:
            raise ValueError(f"unknown DeepSeek-V4 layer type {layer_type!r}")
        out.append(kinds[layer_type])
    return out


def compress_ratios(hf_config: Any) -> list[int]:
    """Per-layer compress ratio (0 = window only), V4's `compress_ratios`."""
    return [ratio for _, ratio, _ in layer_kinds(hf_config)]


def _compress_rope(hf_config: Any) -> dict[str, Any]:
    """theta and YaRN settings of the compressed layers' RoPE."""
    params = _get(hf_config, "rope_parameters") or {}
    compress = params.get("compress") if isinstance(params, Mapping) else None
    if not isinstance(compress, Mapping):
        compress = dict(_get(hf_config, "rope_scaling") or {})
        compress.setdefault("rope_theta", _get(hf_config, "compress_rope_theta", 160000.0))
    rope_type = compress.get("rope_type", compress.get("type", "default"))
    out: dict[str, Any] = {"compress_rope_theta": float(compress["rope_theta"])}
    if rope_type == "yarn":
        out.update(
            yarn_factor=float(compress["factor"]),
            original_max_position_embeddings=int(compress["original_max_position_embeddings"]),
            beta_fast=float(compress.get("beta_fast", 32.0)),
            beta_slow=float(compress.get("beta_slow", 1.0)),
        )
    elif rope_type != "default":
        raise ValueError(f"compressed-layer rope type {rope_type!r} is not supported (yarn only)")
    return out


def attention_config(
    hf_config: Any, compress_ratio: int, csa: bool | None = None, **overrides: Any
) -> V4Config:
    """The `V4Config` of a layer with `compress_ratio` (and CSA flag; None: ratio == 4) under an
    HF DeepSeek-V4 config (object or dict)."""
    head_dim = int(_get(hf_config, "head_dim"))
    rope_dim = _get(hf_config, "qk_rope_head_dim")
    if rope_dim is None:
        rope_dim = _get(hf_config, "rope_head_dim")
    if rope_dim is None:
        factor = _get(hf_config, "partial_rotary_factor") or 64 / 512
        rope_dim = int(head_dim * factor)
    main = (_get(hf_config, "rope_parameters") or {}).get("main") or {}
    fields = dict(
        num_attention_heads=int(_get(hf_config, "num_attention_heads")),
        head_dim=head_dim,
        qk_rope_head_dim=int(rope_dim),
        q_lora_rank=int(_get(hf_config, "q_lora_rank")),
        o_groups=int(_get(hf_config, "o_groups")),
        o_lora_rank=int(_get(hf_config, "o_lora_rank")),
        sliding_window=int(_get(hf_config, "sliding_window", _get(hf_config, "window_size", 128))),
        compress_ratio=int(compress_ratio),
        csa=csa if compress_ratio else None,
        index_n_heads=int(_get(hf_config, "index_n_heads")),
        index_head_dim=int(_get(hf_config, "index_head_dim")),
        index_topk=int(_get(hf_config, "index_topk")),
        rope_theta=float(main.get("rope_theta", _get(hf_config, "rope_theta", 10000.0))),
        **_compress_rope(hf_config),
    )
    if int(_get(hf_config, "num_key_value_heads", 1)) != 1:
        raise ValueError("DeepSeek-V4 attention has one shared KV head (num_key_value_heads=1)")
    fields.update(overrides)
    return V4Config(**fields)


def layer_pattern(hf_config: Any, **overrides: Any) -> tuple[tuple[str, ...], dict[str, V4Config]]:
    """(layer_pattern, attention) for `ModelConfig`: one label per distinct ratio
    ("v4_window", "v4_csa", "v4_hca"), one entry per layer, exactly as the config lists them."""
    pattern, attention = [], {}
    for label, ratio, csa in layer_kinds(hf_config):
        pattern.append(label)
        if label not in attention:
            attention[label] = attention_config(hf_config, ratio, csa, **overrides)
    return tuple(pattern), attention


# Official-checkpoint (deepseek-ai `inference/model.py`) attention names -> HF names, applied in
# order (the same renames transformers applies on load). FP8 weights with `scale_inv` companions
# must be dequantised first; this table only renames.
_OFFICIAL_RENAMES = (
    (r"\.attn\.", ".self_attn."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"\.attn_sink$", ".sinks"),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."),
    (r"\.norm\.", ".kv_norm."),
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
)


def hf_name(name: str) -> str:
    """An official-checkpoint attention key (`layers.3.attn.wq_a.weight`) in HF naming
    (`model.layers.3.self_attn.q_a_proj.weight`); HF names pass unchanged."""
    if name.startswith("layers."):
        name = "model." + name
    for pattern, target in _OFFICIAL_RENAMES:
        name = re.sub(pattern, target, name)
    return name


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)


def _linear(w: Any) -> np.ndarray:
    return _np(w).T


def attention_params(
    state_dict: Mapping[str, Any], config: V4Config, prefix: str = "", dtype: Any = np.float32
) -> dict[str, Any]:
    """Parameters of one `V4Attention` from an HF state dict.

    Args:
      state_dict: name -> tensor/array (torch tensors are converted without importing torch).
      config: the layer's V4Config (its ratio decides which compressor weights are read).
      prefix: e.g. "model.layers.3.self_attn." (the keys' common prefix).
      dtype: dtype of the returned numpy arrays.

    Returns:
      The module's `params` subtree (wrap as {"params": ...} to apply the module alone).
    """
    N, H, C = config.num_attention_heads, config.head_dim, config.q_lora_rank
    G, O = config.o_groups, config.o_lora_rank

    if prefix + "q_a_proj.weight" not in state_dict:  # official names: rename to HF's
        state_dict = {hf_name(k): v for k, v in state_dict.items()}

    def get(name):
        key = prefix + name
        if key not in state_dict:
            raise KeyError(f"missing {key!r} in the DeepSeek-V4 state dict")
        return state_dict[key]

    o_a = _np(get("o_a_proj.weight")).reshape(G, O, (N // G) * H)  # [G, O, n*H]
    params: dict[str, Any] = {
        "q_a_proj": {"kernel": _linear(get("q_a_proj.weight"))},
        "q_a_norm": {"scale": _np(get("q_a_norm.weight"))},
        "q_b_proj": {"kernel": _linear(get("q_b_proj.weight")).reshape(C, N, H)},
        "kv_proj": {"kernel": _linear(get("kv_proj.weight"))},
        "kv_norm": {"scale": _np(get("kv_norm.weight"))},
        "sinks": _np(get("sinks")),
        "o_a_proj": {"kernel": o_a.transpose(0, 2, 1).reshape(N, H, O)},
        "o_b_proj": {"kernel": _linear(get("o_b_proj.weight")).reshape(G, O, -1)},
    }

    def compressor(p):
        return {
            "kv_proj": {"kernel": _linear(get(p + "kv_proj.weight"))},
            "gate_proj": {"kernel": _linear(get(p + "gate_proj.weight"))},
            "position_bias": _np(get(p + "position_bias")),
            "kv_norm": {"scale": _np(get(p + "kv_norm.weight"))},
        }

    if config.ratio:
        params["compressor"] = compressor("compressor.")
    if config.is_csa:
        n, I = config.index_n_heads, config.index_head_dim
        indexer = compressor("compressor.indexer.")
        indexer["q_b_proj"] = {
            "kernel": _linear(get("compressor.indexer.q_b_proj.weight")).reshape(C, n, I)
        }
        indexer["weights_proj"] = {
            "kernel": _linear(get("compressor.indexer.scorer.weights_proj.weight"))
        }
        params["indexer"] = indexer

    def cast(tree):
        if isinstance(tree, dict):
            return {k: cast(v) for k, v in tree.items()}
        return np.asarray(tree, dtype)

    return cast(params)


def model_attention_params(
    state_dict: Mapping[str, Any], hf_config: Any, **overrides: Any
) -> list[dict[str, Any]]:
    """Every layer's attention parameters, in layer order (`model.layers.{i}.self_attn.`)."""
    pattern, attention = layer_pattern(hf_config, **overrides)
    return [
        attention_params(state_dict, attention[label], prefix=f"model.layers.{i}.self_attn.")
        for i, label in enumerate(pattern)
    ]
