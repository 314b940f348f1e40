"""Parity of DSA with the PyTorch references (``reference``): transformers' `deepseek_v32`
(`DeepseekV32Attention` + `DeepseekV32Indexer`, weights imported by their HF names) and
flash-linear-attention's `fla.ops.dsa.naive`. Each skips cleanly when its package is missing."""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.attention.dsa import DSAttention, Indexer
from jaxmodels.config import BlockSettings
from jaxmodels.ops import dsa as dsa_ops

pytestmark = pytest.mark.reference

D, B, T = 32, 2, 12
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 8,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def _hf():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return pytest.importorskip("transformers.models.deepseek_v32.modeling_deepseek_v32")


@functools.cache
def _hf_attention(topk: int, yarn: bool, seed: int = 0):
    hf = _hf()  # skips when torch / transformers are missing
    import torch
    from transformers import DeepseekV32Config

    config = DeepseekV32Config(
        hidden_size=D, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
        index_n_heads=8, index_head_dim=8, index_topk=topk, max_position_embeddings=64,
        num_hidden_layers=1, vocab_size=64, attn_implementation="eager",
        rope_parameters=YARN if yarn else {"rope_type": "default", "rope_theta": 500.0},
    )  # fmt: skip
    torch.manual_seed(seed)
    attention = hf.DeepseekV32Attention(config, layer_idx=0).eval()
    with torch.no_grad():  # norms too (incl. the indexer's LayerNorm bias), not ones / zeros
        for name, p in attention.named_parameters():
            one = "layernorm" in name or name.endswith("k_norm.weight")
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if one else 0.0))
    return config, attention


def _hf_forward(config, attention, x_BTD):
    import torch

    hf = _hf()
    x = torch.from_numpy(x_BTD)
    positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    cos, sin = hf.DeepseekV32RotaryEmbedding(config)(x, positions)
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
    mask = mask.expand(x.shape[0], 1, -1, -1)
    with torch.no_grad():
        y, _ = attention(x, (cos, sin), mask, position_ids=positions)
        q_resid = attention.q_a_layernorm(attention.q_a_proj(x))
        idx = attention.indexer(x, q_resid, (cos, sin), mask[:, 0], positions)
    return y.numpy(), q_resid.numpy(), idx.numpy()


def _ours(hf_config, attention, **overrides):
    from jaxmodels.weights.hf_deepseek_v32 import dsa_config_from_hf, dsa_params_from_hf

    config = dsa_config_from_hf(hf_config, index_block_q=4, index_prefix_chunks=2, **overrides)
    params = dsa_params_from_hf(attention.state_dict(), config)
    return config, jax.tree.map(jnp.asarray, params)


def _selected_sets(idx_BTk, T):
    """Per query, the set of visible selected keys (HF pads short rows with masked keys)."""
    out = []
    for b in range(idx_BTk.shape[0]):
        for t in range(T):
            out.append({int(s) for s in idx_BTk[b, t] if 0 <= s <= t})
    return out


@pytest.mark.parametrize("topk,yarn", [(4, False), (5, True), (T, False)])
def test_forward_and_selection_match_transformers(topk, yarn):
    hf_config, attention = _hf_attention(topk, yarn)
    x = np.random.default_rng(1).normal(size=(B, T, D)).astype(np.float32)
    expected, q_resid, hf_idx = _hf_forward(hf_config, attention, x)
    config, params = _ours(hf_config, attention, indexer_stage="off")
    settings = BlockSettings(hidden_size=D)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    y, _ = jax.jit(DSAttention(config, settings).apply)({"params": params}, x, positions)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(np.asarray(y), expected, atol=3e-5, rtol=3e-5)
    # the same tokens are selected, from the same indexer scores
    iq, iw, ik = Indexer(config, settings).apply(
        {"params": params["indexer"]}, x, q_resid, positions
    )
    mask = jnp.tril(jnp.ones((T, T), bool))[None]
    ours = dsa_ops.select_topk(dsa_ops.indexer_scores(iq, iw, ik, mask), mask, topk)
    assert _selected_sets(np.asarray(ours), T) == _selected_sets(hf_idx, T)


def test_importer_round_trips_the_hf_names():
    from jaxmodels.weights.hf_deepseek_v32 import dsa_params_to_hf

    hf_config, attention = _hf_attention(4, False)
    config, params = _ours(hf_config, attention)
    back = dsa_params_to_hf(params, config)
    state = {k: v.numpy() for k, v in attention.state_dict().items()}
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        np.testing.assert_allclose(back[name], value, rtol=1e-6, err_msg=name)


def _load_fla_naive_dsa():
    """fla's `fla/ops/dsa/naive.py`, loaded by path: fla's package __init__ imports triton,
    which CPU-only installs lack."""
    pytest.importorskip("torch")
    pytest.importorskip("einops")
    try:
        from fla.ops.dsa.naive import naive_dsa

        return naive_dsa
    except Exception:
        pass
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flash-linear-attention (fla) is not installed")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "ops" / "dsa" / "naive.py"
    if not path.exists():
        pytest.skip(f"this fla version has no {path}")
    module_spec = importlib.util.spec_from_file_location("_fla_dsa_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.naive_dsa


def test_gather_attention_matches_fla_naive_dsa():
    """`ops.dsa.dsa_attention` (indexer + top-k + gather) == fla `naive_dsa` with one kv head
    whose value is the first V dims of the key (the MLA latent entry)."""
    naive_dsa = _load_fla_naive_dsa()
    import torch

    rng = np.random.default_rng(2)
    N, X, V, J, I, topk = 3, 12, 8, 4, 8, 5
    q = rng.normal(size=(B, T, N, X)).astype(np.float32)
    kv = rng.normal(size=(B, T, X)).astype(np.float32)
    iq = rng.normal(size=(B, T, J, I)).astype(np.float32)
    iw = rng.normal(size=(B, T, J)).astype(np.float32)
    ik = rng.normal(size=(B, T, I)).astype(np.float32)
    out, aux = dsa_ops.dsa_attention(
        q, kv, iq, iw, ik, topk=topk, value_dim=V, scale=X**-0.5, block_q=4,
        num_prefix_chunks=2, return_aux=True,
    )  # fmt: skip
    t = torch.from_numpy
    ref, ref_idx = naive_dsa(
        t(q), t(kv)[:, :, None], t(kv[..., :V])[:, :, None], t(iq), t(ik), t(iw),
        topk=topk, scale=X**-0.5, return_indices=True,
    )  # fmt: skip
    assert _selected_sets(np.asarray(aux["indices"]), T) == _selected_sets(ref_idx.numpy(), T)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=2e-5, rtol=2e-5)
