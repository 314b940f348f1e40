"""Parity of our KDA layer with transformers' `KimiLinearDeltaAttention` (`models/kimi_linear`).

The same random checkpoint-layout weights are imported into our layer
(`kda_params_from_hf`) and exported in transformers' module layout (`kda_params_to_hf(...,
layout="transformers")`, loaded with `load_state_dict(strict=True)`), then both run in fp32
on torch CPU: transformers falls back to its pure-torch `chunk_kda` / `fused_recurrent_kda` /
`causal_conv1d_*` when flash-linear-attention's Triton kernels and `causal_conv1d` are absent.
Skips cleanly when torch or transformers' `kimi_linear` is not installed.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.attention.kda import DeltaAttention, KDAConfig
from jaxmodels.config import BlockSettings
from jaxmodels.weights.hf_kimi_linear import (
    kda_config_from_hf,
    kda_params_from_hf,
    kda_params_to_hf,
)

pytestmark = pytest.mark.reference

D, N, H, B = 32, 2, 8, 2
EPS = 1e-5  # HF `rms_norm_eps`, the o_norm epsilon


def _hf():
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    from transformers.models.kimi_linear.configuration_kimi_linear import KimiLinearConfig

    config = KimiLinearConfig(
        vocab_size=64,
        hidden_size=D,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
        mlp_layer_types=["dense"],
        linear_num_heads=N,
        linear_head_dim=H,
        rms_norm_eps=EPS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return torch, modeling, config


def _checkpoint(seed: int, decay_shift: float) -> dict[str, np.ndarray]:
    """Random weights in the checkpoint layout; `dt_bias ~ N(decay_shift, 1)` sets the decay."""
    rng = np.random.default_rng(seed)
    shapes = {
        "q_proj.weight": (N * H, D),
        "k_proj.weight": (N * H, D),
        "v_proj.weight": (N * H, D),
        "q_conv1d.weight": (N * H, 1, 4),
        "k_conv1d.weight": (N * H, 1, 4),
        "v_conv1d.weight": (N * H, 1, 4),
        "f_a_proj.weight": (H, D),
        "f_b_proj.weight": (N * H, H),
        "b_proj.weight": (N, D),
        "g_a_proj.weight": (H, D),
        "g_b_proj.weight": (N * H, H),
        "o_proj.weight": (D, N * H),
    }
    state = {k: rng.normal(0.0, 0.3, s).astype(np.float32) for k, s in shapes.items()}
    state["o_norm.weight"] = rng.normal(1.0, 0.1, (H,)).astype(np.float32)
    state["A_log"] = np.log(rng.uniform(1, 16, (1, 1, N, 1))).astype(np.float32)
    state["dt_bias"] = rng.normal(decay_shift, 1.0, (N * H,)).astype(np.float32)
    return state


def _layers(seed: int, decay_shift: float, chunk_size: int):
    torch, modeling, hf_config = _hf()
    config = kda_config_from_hf(hf_config, chunk_size=chunk_size)
    assert config == KDAConfig(num_heads=N, head_dim=H, conv_kernel_size=4, chunk_size=chunk_size)
    state = _checkpoint(seed, decay_shift)
    params = kda_params_from_hf(state, config)
    torch_layer = modeling.KimiLinearDeltaAttention(hf_config, layer_idx=0)
    exported = kda_params_to_hf(params, config, layout="transformers")
    torch_layer.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    torch_layer.eval()
    ours = DeltaAttention(config, BlockSettings(hidden_size=D, norm_eps=EPS))
    return torch, modeling, hf_config, torch_layer, ours, params


@pytest.mark.parametrize(
    "decay_shift,chunk_atol", [(-3.0, 2e-5), (1.0, 1e-4)], ids=["mild-decay", "strong-decay"]
)
def test_forward_matches_transformers_kimi_linear(decay_shift, chunk_atol):
    """T = 70, fp32: ours (chunk 16, and the recurrent form) against transformers' recurrent
    form (one token at a time through its cache) to 2e-5, and against its chunk form (chunk 64,
    so a second, padded chunk). With strong decay transformers' chunk form is the least exact
    of the four: it differs from transformers' own recurrent form by 6.8e-5 at one position,
    where ours agree with that recurrent form to 5e-6, hence 1e-4 there."""
    torch, _, hf_config, torch_layer, ours, params = _layers(0, decay_shift, chunk_size=16)
    from transformers.cache_utils import DynamicCache

    x = np.random.default_rng(1).normal(0.0, 1.0, (B, 70, D)).astype(np.float32)
    hf_cache = DynamicCache(config=hf_config)
    with torch.no_grad():
        hf_chunk = torch_layer(torch.from_numpy(x)).numpy()
        steps = [torch_layer(torch.from_numpy(x[:, :1]), cache=hf_cache)]  # prefill of 1
        steps += [
            torch_layer(torch.from_numpy(x[:, t : t + 1]), cache=hf_cache) for t in range(1, 70)
        ]
    hf_recurrent = torch.cat(steps, dim=1).numpy()
    pos = jnp.broadcast_to(jnp.arange(70), (B, 70))
    recurrent = dataclasses.replace(
        ours, config=dataclasses.replace(ours.config, implementation="recurrent")
    )
    assert np.abs(hf_chunk).max() > 0.1
    for layer in (ours, recurrent):
        y, _ = jax.jit(layer.apply)({"params": params}, jnp.asarray(x), pos)
        np.testing.assert_allclose(np.asarray(y), hf_recurrent, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(y), hf_chunk, atol=chunk_atol, rtol=1e-4)


def test_prefill_and_decode_match_transformers_cache():
    """Prefill 5 tokens, then decode 3 one at a time: transformers' `DynamicCache` (conv window +
    recurrent state) against our `DeltaCache`, step by step; the final states agree."""
    torch, _, hf_config, torch_layer, ours, params = _layers(2, -2.0, chunk_size=4)
    from transformers.cache_utils import DynamicCache

    x = np.random.default_rng(3).normal(0.0, 1.0, (B, 8, D)).astype(np.float32)
    hf_cache = DynamicCache(config=hf_config)
    cache = DeltaAttention.init_cache(ours.config, ours.settings, B, 8, jnp.float32)
    apply = jax.jit(ours.apply)
    for start, stop in [(0, 5), (5, 6), (6, 7), (7, 8)]:
        with torch.no_grad():
            expected = torch_layer(torch.from_numpy(x[:, start:stop]), cache=hf_cache).numpy()
        pos = jnp.broadcast_to(jnp.arange(start, stop), (B, stop - start))
        y, cache = apply({"params": params}, jnp.asarray(x[:, start:stop]), pos, cache)
        np.testing.assert_allclose(np.asarray(y), expected, atol=2e-5, rtol=1e-4)
    hf_state = hf_cache.layers[0].recurrent_states[0]  # state_idx 0
    np.testing.assert_allclose(np.asarray(cache.state), hf_state.numpy(), atol=2e-5, rtol=1e-4)
