"""Parity with transformers' `DeepseekV4Attention` (sliding / CSA / HCA layers) with imported
weights: full forward, and prefill + decode against HF's own V4 caches."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")

from jaxmodels.attention.v4 import V4Attention  # noqa: E402
from jaxmodels.config import BlockSettings  # noqa: E402
from jaxmodels.weights import hf_deepseek_v4 as hf_import  # noqa: E402

pytestmark = pytest.mark.reference

D, T, B, WINDOW = 64, 37, 2, 8


@functools.cache
def _hf_config():
    from transformers import DeepseekV4Config

    config = DeepseekV4Config(
        vocab_size=32,
        hidden_size=D,
        num_hidden_layers=3,
        num_attention_heads=4,
        head_dim=32,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        o_groups=2,
        o_lora_rank=16,
        index_n_heads=16,  # many heads: exact ReLU ties between index scores are unlikely
        index_head_dim=16,
        index_topk=3,  # < visible entries for most queries: the selection matters
        sliding_window=WINDOW,
        layer_types=[
            "sliding_attention",
            "compressed_sparse_attention",
            "heavily_compressed_attention",
        ],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        max_position_embeddings=128,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        hc_mult=2,
    )
    config._attn_implementation = "eager"
    return config


def _hf_layer(layer_idx: int, seed: int = 0):
    torch.manual_seed(seed + layer_idx)
    layer = modeling.DeepseekV4Attention(_hf_config(), layer_idx).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():  # sinks and position biases init to 0: perturb
            offset = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(offset + (0.3 if p.ndim == 1 else 0.2) * torch.randn_like(p))
    return layer


def _inputs():
    torch.manual_seed(123)
    x = torch.randn(B, T, D)
    pos = torch.arange(T)[None].expand(B, T)
    rotary = modeling.DeepseekV4RotaryEmbedding(_hf_config())
    cos_sin = {kind: rotary(x, pos, kind) for kind in ("main", "compress")}
    return x, pos, cos_sin


def _window_bias(q_pos, k_pos):
    q, k = q_pos[:, None], k_pos[None, :]
    bias = torch.where((k <= q) & (q - k < WINDOW), 0.0, float("-inf"))
    return bias[None, None].expand(B, 1, len(q_pos), len(k_pos))


def _ours(layer_idx, implementation):
    pattern, attention = hf_import.layer_pattern(_hf_config())
    config = dataclasses.replace(attention[pattern[layer_idx]], implementation=implementation)
    settings = BlockSettings(hidden_size=D, norm_eps=_hf_config().rms_norm_eps)
    return config, V4Attention(config, settings)


@pytest.mark.parametrize("layer_idx", [0, 1, 2], ids=["window", "csa", "hca"])
@pytest.mark.parametrize("implementation", ["blocked", "reference"])
def test_forward_matches_transformers(layer_idx, implementation):
    layer = _hf_layer(layer_idx)
    x, pos, cos_sin = _inputs()
    with torch.no_grad():
        want, _ = layer(
            x,
            position_embeddings=cos_sin,
            position_ids=pos,
            attention_mask=_window_bias(torch.arange(T), torch.arange(T)),
            cache=None,
        )
    config, module = _ours(layer_idx, implementation)
    params = hf_import.attention_params(layer.state_dict(), config)
    got, _ = jax.jit(module.apply)({"params": params}, jnp.asarray(x.numpy()), jnp.asarray(pos))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layer_idx", [0, 1, 2], ids=["window", "csa", "hca"])
def test_prefill_and_decode_match_transformers_caches(layer_idx):
    from transformers.cache_utils import DynamicCache

    layer = _hf_layer(layer_idx, seed=7)
    x, pos, cos_sin = _inputs()
    config, module = _ours(layer_idx, "blocked")
    params = {"params": hf_import.attention_params(layer.state_dict(), config)}
    apply = jax.jit(module.apply)
    cache = V4Attention.init_cache(config, None, B, 40, jnp.float32)
    hf_cache = DynamicCache(config=_hf_config())
    index, hf_outs, outs = 0, [], []
    for chunk in (7,) + (1,) * 5 + (6,) + (1,) * (T - 18):
        sl = slice(index, index + chunk)
        kv_len = chunk if index == 0 else min(index, WINDOW - 1) + chunk
        mask = _window_bias(
            torch.arange(index, index + chunk), torch.arange(index + chunk)[-kv_len:]
        )
        with torch.no_grad():
            y, _ = layer(
                x[:, sl],
                position_embeddings={k: (c[:, sl], s[:, sl]) for k, (c, s) in cos_sin.items()},
                position_ids=pos[:, sl],
                attention_mask=mask,
                cache=hf_cache,
            )
        hf_outs.append(y.numpy())
        out, cache = apply(params, jnp.asarray(x[:, sl].numpy()), jnp.asarray(pos[:, sl]), cache)
        outs.append(np.asarray(out))
        index += chunk
    assert index == T
    np.testing.assert_allclose(
        np.concatenate(outs, axis=1), np.concatenate(hf_outs, axis=1), atol=2e-5, rtol=1e-4
    )


def test_config_and_official_names_import():
    pattern, attention = hf_import.layer_pattern(_hf_config())
    assert pattern == ("v4_window", "v4_csa", "v4_hca")
    assert attention["v4_csa"].is_csa and attention["v4_csa"].compress_ratio == 4
    assert not attention["v4_hca"].is_csa and attention["v4_hca"].compress_ratio == 8
    assert (
        attention["v4_hca"].yarn_factor == 4.0 and attention["v4_window"].rope.yarn_factor is None
    )
    # The official checkpoint's names (deepseek-ai inference/model.py) import the same weights.
    layer = _hf_layer(1)
    official = {
        "q_a_proj": "wq_a",
        "q_a_norm": "q_norm",
        "q_b_proj": "wq_b",
        "kv_proj": "wkv",
        "o_a_proj": "wo_a",
        "o_b_proj": "wo_b",
        "sinks": "attn_sink",
        "compressor.indexer.scorer.weights_proj": "indexer.weights_proj",
        "compressor.indexer.q_b_proj": "indexer.wq_b",
        "compressor.indexer.kv_proj": "indexer.compressor.wkv",
        "compressor.indexer.gate_proj": "indexer.compressor.wgate",
        "compressor.indexer.position_bias": "indexer.compressor.ape",
        "compressor.indexer.kv_norm": "indexer.compressor.norm",
        "compressor.kv_proj": "compressor.wkv",
        "compressor.gate_proj": "compressor.wgate",
        "compressor.position_bias": "compressor.ape",
        "compressor.kv_norm": "compressor.norm",
    }
    renamed = {}
    for name, tensor in layer.state_dict().items():
        for hf, off in official.items():  # longest HF names first (dict order above)
            if name == hf or name.startswith(hf + "."):
                name = off + name[len(hf) :]
                break
        renamed["layers.1.attn." + name] = tensor
    assert "layers.1.attn.indexer.compressor.ape" in renamed
    from_hf = hf_import.attention_params(layer.state_dict(), attention["v4_csa"])
    from_official = hf_import.attention_params(
        renamed, attention["v4_csa"], prefix="model.layers.1.self_attn."
    )
    jax.tree.map(np.testing.assert_array_equal, from_hf, from_official)
