"""Weight import from the Hugging Face `deepseek_v3` attention layout into our MLA parameters.

Hugging Face names (transformers `models/deepseek_v3`, class `DeepseekV3Attention`; the same
names as DeepSeek-V2/V3 and Kimi K2 checkpoints) and what they become (module
`jaxmodels.attention.mla.MLAttention`; a torch `nn.Linear` weight is [out, in]):

    q_a_proj.weight            [Cq, D]            -> q_a_proj/kernel   [D, Cq]
    q_a_layernorm.weight       [Cq]               -> q_a_norm/scale    [Cq]
    q_b_proj.weight            [N (H + R), Cq]    -> q_b_proj/kernel   [Cq, N, H + R]
    q_proj.weight              [N (H + R), D]     -> q_proj/kernel     [D, N, H + R]  (no q-LoRA)
    kv_a_proj_with_mqa.weight  [C + R, D]         -> kv_a_proj/kernel  [D, C + R]
    kv_a_layernorm.weight      [C]                -> kv_a_norm/scale   [C]
    kv_b_proj.weight           [N (H + Hv), C]    -> kv_b_proj/kernel  [C, N, H + Hv]
    o_proj.weight              [D, N Hv]          -> o_proj/kernel     [N, Hv, D]

RoPE columns. The R rope columns (last R of each query head, last R of `kv_a_proj_with_mqa`)
are interleaved pairs (2m, 2m+1) in DeepSeek checkpoints: HF's `rope_interleave=True`
rotates them as such (`apply_rotary_pos_emb_interleave`: the even/odd slices rotated, which is
the V3 demo's complex view), while with `rope_interleave=False` it applies `rotate_half` to
pairs (m, m + R/2). Our module rotates per `MLAConfig.rope.layout`; when the two differ, the
importer permutes those columns (`interleaved_to_half_permutation` or its inverse) so that the
logits are unchanged — a permutation applied to both q_rope and k_rope leaves every dot
product as it was, so a model imported with either layout computes the same function.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxmodels.attention.mla import MLAConfig
from jaxmodels.config import ModelConfig, RopeConfig
from jaxmodels.ops.rope import interleaved_to_half_permutation
from jaxmodels.weights.placement import copy_dicts, layer_path, place_tree

HF_LAYER_PREFIX = "model.layers.{}.self_attn."
_UNSUPPORTED_BIASES = (
    "q_a_proj",
    "q_b_proj",
    "q_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
)


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def mla_config_from_hf(hf_config: Any, **overrides: Any) -> MLAConfig:
    """An `MLAConfig` from a Hugging Face `deepseek_v3` (or `kimi_linear`) config.

    Args:
      hf_config: a transformers config object or its `config.json` dict. Reads
        `num_attention_heads`, `q_lora_rank`, `kv_lora_rank`, `qk_nope_head_dim`,
        `qk_rope_head_dim`, `v_head_dim`, `rope_interleave` (default True), `mla_use_nope`
        (Kimi-Linear) and the rope settings (`rope_parameters`, or `rope_theta` +
        `rope_scaling` of older configs; YaRN keys `factor`, `original_max_position_embeddings`,
        `beta_fast`, `beta_slow`, `mscale`, `mscale_all_dim`).
      **overrides: MLAConfig fields to set (e.g. `form="absorbed"`, `rope=...`).

    The rope layout is the checkpoint's ("interleaved" when `rope_interleave`), so importing
    needs no permutation; pass `rope=dataclasses.replace(config.rope, layout="half")` to get
    the other layout (the importer then permutes the rope columns).
    """
    params = _get(hf_config, "rope_parameters") or _get(hf_config, "rope_scaling") or {}
    params = dict(params)
    theta = params.get("rope_theta", _get(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    layout = "interleaved" if _get(hf_config, "rope_interleave", True) else "half"
    if rope_type in (None, "default"):
        rope = RopeConfig(theta=float(theta), layout=layout)
    elif rope_type == "yarn":
        if params.get("attention_factor") is not None:
            raise ValueError("rope_parameters.attention_factor is not supported; use mscale keys")
        if params.get("truncate", True) is False:
            raise ValueError("rope_parameters.truncate=False is not supported (DeepSeek truncates)")
        original = int(params["original_max_position_embeddings"])
        factor = params.get("factor")
        if factor is None:  # HF: the ratio of the context lengths
            factor = _get(hf_config, "max_position_embeddings") / original
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            mscale, mscale_all_dim = float(mscale), float(mscale_all_dim)
        elif mscale_all_dim:
            raise ValueError(
                "rope_parameters sets mscale_all_dim without mscale; HF then scales cos/sin by "
                "mscale(factor) and the softmax by mscale(factor, mscale_all_dim)^2, which "
                "MLAConfig cannot express"
            )
        else:  # HF: cos/sin scaled by mscale(factor, 1), softmax scale unchanged
            mscale, mscale_all_dim = 1.0, 0.0
        rope = RopeConfig(
            theta=float(theta),
            layout=layout,
            yarn_factor=float(factor),
            original_max_position_embeddings=original,
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=mscale,
            mscale_all_dim=mscale_all_dim,
        )
    else:
        raise ValueError(f"rope type {rope_type!r} is not supported for MLA (default or yarn)")
    use_nope = bool(_get(hf_config, "mla_use_nope", False))
    fields = dict(
        num_heads=int(_get(hf_config, "num_attention_heads")),
        q_lora_rank=_get(hf_config, "q_lora_rank"),
        kv_lora_rank=int(_get(hf_config, "kv_lora_rank")),
        qk_nope_head_dim=int(_get(hf_config, "qk_nope_head_dim")),
        qk_rope_head_dim=int(_get(hf_config, "qk_rope_head_dim")),
        v_head_dim=int(_get(hf_config, "v_head_dim")),
        rope=RopeConfig(layout=layout) if use_nope else rope,
        use_nope=use_nope,
    )
    fields.update(overrides)
    return MLAConfig(**fields)


def _to_numpy(x: Any) -> np.ndarray:
    """numpy float32 from a numpy array, a jax array or a torch tensor (any float dtype)."""
    if hasattr(x, "detach"):  # torch, without importing it
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _rope_permutation(config: MLAConfig, rope_interleave: bool) -> np.ndarray | None:
    """Checkpoint rope column order -> ours (None: identity)."""
    ours_interleaved = config.rope.layout == "interleaved"
    if config.use_nope or ours_interleaved == rope_interleave:
        return None
    perm = interleaved_to_half_permutation(config.qk_rope_head_dim)
    return perm if rope_interleave else np.argsort(perm)


def _permute_last(x: np.ndarray, perm: np.ndarray | None, rope_dim: int) -> np.ndarray:
    """Permutes the last `rope_dim` entries of the last axis by `perm`."""
    if perm is None:
        return x
    head, rope = x[..., :-rope_dim], x[..., -rope_dim:]
    return np.concatenate([head, rope[..., perm]], axis=-1)


def mla_params_from_hf(
    state_dict: Mapping[str, Any],
    config: MLAConfig,
    *,
    prefix: str = "",
    rope_interleave: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """Our `MLAttention` parameters (float32 numpy) from HF `deepseek_v3` attention weights.

    Args:
      state_dict: name -> tensor (torch tensors, numpy or jax arrays), e.g. a
        `DeepseekV3Attention.state_dict()` or a checkpoint shard.
      config: the target config (dims must match the weights; its rope layout decides whether
        the rope columns are permuted).
      prefix: prepended to every name, e.g. "model.layers.3.self_attn.".
      rope_interleave: the checkpoint's rope columns are interleaved pairs (HF
        `rope_interleave`, True for DeepSeek checkpoints).

    Returns:
      The attention module's `params` subtree: {"q_a_proj": {"kernel": ...}, ...}.

    Raises:
      KeyError naming missing weights; ValueError for shapes that do not fit `config` or for
      bias terms (`attention_bias=True`), which MLAttention does not have.
    """
    N, H, R = config.num_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    C, Hv = config.kv_lora_rank, config.v_head_dim
    biases = [f"{prefix}{n}.bias" for n in _UNSUPPORTED_BIASES if f"{prefix}{n}.bias" in state_dict]
    if biases:
        raise ValueError(f"{biases}: attention biases (attention_bias=True) are not supported")

    def weight(name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = f"{prefix}{name}"
        if key not in state_dict:
            raise KeyError(f"{key!r} is missing from the state dict (config: {config})")
        w = _to_numpy(state_dict[key])
        if w.shape != shape:
            raise ValueError(f"{key!r} has shape {w.shape}, expected {shape} for {config}")
        return w

    perm = _rope_permutation(config, rope_interleave)
    kv_a_key = f"{prefix}kv_a_proj_with_mqa.weight"
    if kv_a_key not in state_dict:
        raise KeyError(f"{kv_a_key!r} is missing from the state dict")
    D = np.shape(state_dict[kv_a_key])[-1]
    kv_a = weight("kv_a_proj_with_mqa.weight", (C + R, D))
    out: dict[str, dict[str, np.ndarray]] = {}
    if config.has_q_lora:
        Cq = config.q_lora_rank
        out["q_a_proj"] = {"kernel": weight("q_a_proj.weight", (Cq, D)).T}
        out["q_a_norm"] = {"scale": weight("q_a_layernorm.weight", (Cq,))}
        q_b = weight("q_b_proj.weight", (N * (H + R), Cq)).T.reshape(Cq, N, H + R)
        out["q_b_proj"] = {"kernel": _permute_last(q_b, perm, R)}
    else:
        q = weight("q_proj.weight", (N * (H + R), D)).T.reshape(D, N, H + R)
        out["q_proj"] = {"kernel": _permute_last(q, perm, R)}
    out["kv_a_proj"] = {"kernel": _permute_last(kv_a.T, perm, R)}
    out["kv_a_norm"] = {"scale": weight("kv_a_layernorm.weight", (C,))}
    out["kv_b_proj"] = {
        "kernel": weight("kv_b_proj.weight", (N * (H + Hv), C)).T.reshape(C, N, H + Hv)
    }
    out["o_proj"] = {"kernel": weight("o_proj.weight", (D, N * Hv)).T.reshape(N, Hv, D)}
    return {k: {n: np.ascontiguousarray(a) for n, a in v.items()} for k, v in out.items()}


def mla_params_to_hf(
    params: Mapping[str, Any], config: MLAConfig, *, prefix: str = "", rope_interleave: bool = True
) -> dict[str, np.ndarray]:
    """The inverse of `mla_params_from_hf`: HF-named float32 weights ([out, in]) from ours."""
    N, H, R = config.num_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    C, Hv = config.kv_lora_rank, config.v_head_dim
    perm = _rope_permutation(config, rope_interleave)
    inverse = None if perm is None else np.argsort(perm)

    def get(name: str, leaf: str = "kernel") -> np.ndarray:
        return _to_numpy(params[name][leaf])

    out = {}
    if config.has_q_lora:
        Cq = config.q_lora_rank
        out["q_a_proj.weight"] = get("q_a_proj").T
        out["q_a_layernorm.weight"] = get("q_a_norm", "scale")
        q_b = _permute_last(get("q_b_proj"), inverse, R)
        out["q_b_proj.weight"] = q_b.reshape(Cq, N * (H + R)).T
    else:
        q = _permute_last(get("q_proj"), inverse, R)
        out["q_proj.weight"] = q.reshape(q.shape[0], N * (H + R)).T
    out["kv_a_proj_with_mqa.weight"] = _permute_last(get("kv_a_proj"), inverse, R).T
    out["kv_a_layernorm.weight"] = get("kv_a_norm", "scale")
    out["kv_b_proj.weight"] = get("kv_b_proj").reshape(C, N * (H + Hv)).T
    o = get("o_proj")
    out["o_proj.weight"] = o.reshape(N * Hv, o.shape[-1]).T
    return {prefix + k: np.ascontiguousarray(v) for k, v in out.items()}


def load_mla_layers(
    params: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    config: ModelConfig,
    *,
    layer_prefix: str = HF_LAYER_PREFIX,
    rope_interleave: bool = True,
) -> dict[str, Any]:
    """Copies the attention weights of every MLA layer of an HF checkpoint into `Decoder` params.

    Args:
      params: `Decoder(config)` variables (`{"params": ...}`, unboxed), scanned or unrolled.
      state_dict: HF weights named `layer_prefix.format(i) + "q_a_proj.weight"` etc.
      config: the model config; layer i's attention config decides the conversion.
      layer_prefix: format string of a layer's attention prefix.
      rope_interleave: as in `mla_params_from_hf`.

    Returns:
      New variables (the input is not modified) where each MLA layer's attention parameters are
      the imported ones, in the dtype of the parameters they replace and, for jax arrays, placed
      with the same sharding. Other parameters (embeddings, norms, MLPs) are left as they are.
    """
    new = dict(params)
    new["params"] = copy_dicts(params["params"])
    for layer, attention in enumerate(config.layer_attention):
        if not isinstance(attention, MLAConfig):
            continue
        path, index = layer_path(config, layer)
        imported = mla_params_from_hf(
            state_dict,
            attention,
            prefix=layer_prefix.format(layer),
            rope_interleave=rope_interleave,
        )
        place_tree(new["params"], path + ("attention",), index, imported)
    return new
