"""Parity of MLA with transformers' `DeepseekV3Attention` (weights imported by their HF names)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
deepseek_v3 = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
from transformers import DeepseekV3Config  # noqa: E402

from jaxmodels.attention.mla import MLAttention  # noqa: E402
from jaxmodels.config import BlockSettings  # noqa: E402
from jaxmodels.weights import mla_config_from_hf, mla_params_from_hf  # noqa: E402

pytestmark = pytest.mark.reference

D, B, T = 32, 2, 10
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 8,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.8,
    "mscale_all_dim": 0.6,  # unequal: cos/sin and softmax scales both matter
}
CASES = {
    # DeepSeek-V3 shape: q-LoRA, interleaved rope columns, YaRN with mscale.
    "v3_like": dict(q_lora_rank=16, rope_interleave=True, rope_parameters=YARN),
    # DeepSeek-V2-Lite / Kimi-Linear shape: direct q_proj; half-split rope columns.
    "lite_like": dict(
        q_lora_rank=None,
        rope_interleave=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
}


def _hf_attention(case: str, seed: int = 0):
    config = DeepseekV3Config(
        hidden_size=D,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        max_position_embeddings=32,
        attn_implementation="eager",
        **CASES[case],
    )
    torch.manual_seed(seed)
    attention = deepseek_v3.DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in attention.named_parameters():  # norms too, so they are not all ones
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "layernorm" in name else 0.0))
    return config, attention


def _hf_forward(config, attention, x_BTD: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(x_BTD)
    positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    cos, sin = deepseek_v3.DeepseekV3RotaryEmbedding(config)(x, positions)
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        y, _ = attention(x, (cos, sin), mask)
    return y.numpy()


def _ours(hf_config, attention, layout: str, form: str):
    config = mla_config_from_hf(hf_config, form=form)
    config = dataclasses.replace(config, rope=dataclasses.replace(config.rope, layout=layout))
    params = mla_params_from_hf(
        attention.state_dict(), config, rope_interleave=hf_config.rope_interleave
    )
    return config, jax.tree.map(jnp.asarray, params)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("form", ["mha", "absorbed"])
def test_full_forward_matches_transformers(case, layout, form):
    hf_config, attention = _hf_attention(case)
    x = np.random.default_rng(1).normal(size=(B, T, D)).astype(np.float32)
    expected = _hf_forward(hf_config, attention, x)
    config, params = _ours(hf_config, attention, layout, form)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    y, _ = MLAttention(config, BlockSettings(hidden_size=D)).apply({"params": params}, x, positions)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(np.asarray(y), expected, atol=2e-5, rtol=2e-5)


def test_absorbed_decode_from_the_latent_cache_matches_transformers():
    """Prefill 7 tokens, decode 3 from our latent cache == HF's full forward at those tokens."""
    hf_config, attention = _hf_attention("v3_like", seed=2)
    x = np.random.default_rng(3).normal(size=(B, T, D)).astype(np.float32)
    expected = _hf_forward(hf_config, attention, x)
    config, params = _ours(hf_config, attention, "interleaved", "mha")
    module = MLAttention(config, BlockSettings(hidden_size=D))
    apply = jax.jit(module.apply)
    cache = MLAttention.init_cache(config, module.settings, B, T, jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    y, cache = apply({"params": params}, x[:, :7], positions[:, :7], cache)
    outs = [y]
    for t in range(7, T):
        y, cache = apply({"params": params}, x[:, t : t + 1], positions[:, t : t + 1], cache)
        outs.append(y)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), expected, atol=2e-5, rtol=2e-5)


def test_hf_config_maps_to_our_softmax_scale():
    from jaxmodels.attention.mla import mla_softmax_scale

    hf_config, attention = _hf_attention("v3_like")
    assert mla_softmax_scale(mla_config_from_hf(hf_config)) == pytest.approx(attention.scaling)
