"""Parity of the residual ops with the official PyTorch references (marked ``reference``).

* transformers ``deepseek_v4``: ``DeepseekV4HyperConnection`` (pre/post/comb and the collapsed
  input), the decoder layer's stream update, and ``DeepseekV4HyperHead``; weights copied by
  their Hugging Face names (``fn`` -> transposed, ``base``, ``scale``; ``hc_fn`` (transposed),
  ``hc_base``, ``hc_scale``).
* flash-linear-attention ``fla.ops.attnres.naive.naive_attnres`` (loaded by path when ``import
  fla`` needs triton, which CPU installs lack).
* lucidrains ``hyper-connections`` ``HyperConnections`` (HC, dynamic, tanh).
Each skips cleanly when its package is missing.
"""

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.attn_res import (
    attn_res_push,
    attn_res_read,
    attn_res_state_init,
    depth_attention,
)
from jaxmodels.ops.hyper_connections import hc_init, hc_post, hc_pre, mhc_head, mhc_post, mhc_pre

pytestmark = pytest.mark.reference

B, T, D, M = 2, 5, 16, 4


def _np(t):
    return t.detach().cpu().numpy()


def _v4_modules():
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
    from transformers import DeepseekV4Config

    config = DeepseekV4Config(
        hidden_size=D,
        hc_mult=M,
        hc_sinkhorn_iters=20,
        hc_eps=1e-6,
        rms_norm_eps=1e-6,
        num_hidden_layers=2,
        vocab_size=32,
    )
    torch.manual_seed(0)
    hc = modeling.DeepseekV4HyperConnection(config).float()
    head = modeling.DeepseekV4HyperHead(config).float()
    with torch.no_grad():
        # Non-trivial weights: scales != 1 and random biases exercise every term.
        hc.fn.copy_(0.3 * torch.randn_like(hc.fn))
        hc.base.copy_(torch.randn_like(hc.base))
        hc.scale.copy_(torch.tensor([0.7, 1.3, 2.0]))
        head.hc_fn.copy_(0.3 * torch.randn_like(head.hc_fn))
        head.hc_base.copy_(torch.randn_like(head.hc_base))
        head.hc_scale.copy_(torch.tensor([1.5]))
    return torch, hc, head


def test_mhc_matches_transformers_deepseek_v4_hyper_connection():
    """pre-collapse, post, comb (our res = comb^T) and the decoder-layer stream update
    ``post * out + comb^T @ streams`` (``DeepseekV4DecoderLayer.forward``), fp32, atol 2e-5."""
    torch, hc, _ = _v4_modules()
    rng = np.random.default_rng(1)
    streams = rng.standard_normal((B, T, M, D)).astype(np.float32)
    layer_out = rng.standard_normal((B, T, D)).astype(np.float32)
    with torch.no_grad():
        post_t, comb_t, collapsed_t = hc(torch.from_numpy(streams))
        new_t = post_t.unsqueeze(-1) * torch.from_numpy(layer_out).unsqueeze(-2) + torch.matmul(
            comb_t.transpose(-1, -2), torch.from_numpy(streams)
        )
    fn = jnp.asarray(_np(hc.fn)).T  # HF (M*M+2M, M*D) -> ours [M*D, M*M+2M]
    h, post, res = mhc_pre(
        jnp.asarray(streams), fn, jnp.asarray(_np(hc.scale)), jnp.asarray(_np(hc.base))
    )
    np.testing.assert_allclose(h, _np(collapsed_t), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(post, _np(post_t), atol=2e-6)
    np.testing.assert_allclose(res, np.swapaxes(_np(comb_t), -1, -2), atol=2e-6)
    new = mhc_post(jnp.asarray(streams), jnp.asarray(layer_out), post, res)
    np.testing.assert_allclose(new, _np(new_t), atol=2e-5, rtol=1e-5)
    # The paper form differs visibly from the shipped code with the same weights.
    _, _, res_paper = mhc_pre(
        jnp.asarray(streams),
        fn,
        jnp.asarray(_np(hc.scale)),
        jnp.asarray(_np(hc.base)),
        form="paper",
    )
    assert np.abs(np.asarray(res_paper) - np.asarray(res)).max() > 1e-2


def test_mhc_head_matches_transformers_deepseek_v4_hyper_head():
    torch, _, head = _v4_modules()
    streams = np.random.default_rng(2).standard_normal((B, T, M, D)).astype(np.float32)
    with torch.no_grad():
        want = _np(head(torch.from_numpy(streams)))
    got = mhc_head(
        jnp.asarray(streams),
        jnp.asarray(_np(head.hc_fn)).T,
        jnp.asarray(_np(head.hc_scale)),
        jnp.asarray(_np(head.hc_base)),
    )
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def _load_fla_naive():
    pytest.importorskip("torch")
    pytest.importorskip("einops")
    try:
        from fla.ops.attnres.naive import naive_attnres

        return naive_attnres
    except Exception:  # fla's package __init__ imports triton, absent on CPU-only installs
        pass
    spec = importlib.util.find_spec("fla")
    if spec is None or spec.origin is None:
        pytest.skip("flash-linear-attention (fla) is not installed")
    path = pathlib.Path(spec.origin).parent / "ops" / "attnres" / "naive.py"
    if not path.exists():
        pytest.skip(f"this fla version has no {path}")
    module_spec = importlib.util.spec_from_file_location("_fla_attnres_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.naive_attnres


def test_depth_attention_matches_fla_naive_attnres():
    """fla ``naive_attnres(query, residuals, rms_weight, rms_eps)``: outputs and depth weights,
    fp32, atol 1e-5; the same through the static-buffer state (block size 2, 5 pushes)."""
    naive_attnres = _load_fla_naive()
    import torch

    rng = np.random.default_rng(3)
    srcs = [rng.standard_normal((B, T, D)).astype(np.float32) * s for s in (1.0, 3.0, 0.5, 2.0)]
    q = rng.standard_normal(D).astype(np.float32)
    g = (1.0 + 0.2 * rng.standard_normal(D)).astype(np.float32)
    o_t, p_t = naive_attnres(
        torch.from_numpy(q),
        [torch.from_numpy(s) for s in srcs],
        torch.from_numpy(g),
        rms_eps=1e-6,
        return_weights=True,
    )
    out, w = depth_attention(
        jnp.asarray(np.stack(srcs)), None, jnp.asarray(q), jnp.asarray(g), return_weights=True
    )
    np.testing.assert_allclose(out, _np(o_t), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(w, _np(p_t), atol=1e-6)

    # Block AttnRes state: after 5 pushes with block size 2 the sources are
    # [e, o1+o2, o3+o4, o5]; fla gets that list explicitly.
    e = rng.standard_normal((B, T, D)).astype(np.float32)
    outs = [rng.standard_normal((B, T, D)).astype(np.float32) for _ in range(5)]
    state = attn_res_state_init(jnp.asarray(e), 3)
    for o in outs:
        state = attn_res_push(state, jnp.asarray(o), 2)
    got = attn_res_read(state, jnp.asarray(q), jnp.asarray(g))
    listed = [e, outs[0] + outs[1], outs[2] + outs[3], outs[4]]
    want = naive_attnres(
        torch.from_numpy(q), [torch.from_numpy(s) for s in listed], torch.from_numpy(g)
    )
    np.testing.assert_allclose(got, _np(want), atol=1e-5, rtol=1e-5)


def test_hc_matches_lucidrains_hyper_connections():
    """lucidrains ``HyperConnections`` (App. J Algorithm 2 of arXiv 2409.19606, RMSNorm with
    gain ``1 + gamma``, tanh): branch input and updated streams, dynamic weights randomised."""
    torch = pytest.importorskip("torch")
    hc_module = pytest.importorskip("hyper_connections.hyper_connections")
    torch.manual_seed(0)
    layer_index = 6
    hc = hc_module.HyperConnections(M, dim=D, layer_index=layer_index, tanh=True)
    with torch.no_grad():
        hc.static_alpha.add_(0.2 * torch.randn_like(hc.static_alpha))
        hc.static_beta.add_(0.2 * torch.randn_like(hc.static_beta))
        hc.dynamic_alpha_fn.copy_(torch.randn_like(hc.dynamic_alpha_fn))
        hc.dynamic_beta_fn.copy_(torch.randn_like(hc.dynamic_beta_fn))
        hc.dynamic_alpha_scale.fill_(0.3)
        hc.dynamic_beta_scale.fill_(-0.2)
        hc.norm.gamma.copy_(0.1 * torch.randn_like(hc.norm.gamma))
    # The stored static init is the paper's: read stream layer_index % M, A_r = I, B = 1.
    alpha0, beta0 = hc_init(M, layer_index)
    fresh = hc_module.HyperConnections(M, dim=D, layer_index=layer_index)
    np.testing.assert_array_equal(_np(fresh.static_alpha), alpha0)
    np.testing.assert_array_equal(_np(fresh.static_beta), beta0)

    rng = np.random.default_rng(4)
    streams = rng.standard_normal((B, T, M, D)).astype(np.float32)
    layer_out = rng.standard_normal((B, T, D)).astype(np.float32)
    # lucidrains folds streams into the batch: [(B M), T, D].
    folded = torch.from_numpy(np.ascontiguousarray(np.moveaxis(streams, 2, 1).reshape(B * M, T, D)))
    with torch.no_grad():
        branch_input_t, add_residual = hc(folded)
        new_t = add_residual(torch.from_numpy(layer_out))
    new_t = np.moveaxis(_np(new_t).reshape(B, M, T, D), 1, 2)

    kw = dict(
        dynamic_alpha_fn=jnp.asarray(_np(hc.dynamic_alpha_fn)),
        dynamic_alpha_scale=float(hc.dynamic_alpha_scale.detach()),
        dynamic_beta_fn=jnp.asarray(_np(hc.dynamic_beta_fn)),
        dynamic_beta_scale=float(hc.dynamic_beta_scale.detach()),
        norm_scale=1.0 + jnp.asarray(_np(hc.norm.gamma)),
        norm_eps=0.0,  # lucidrains: x / max(||x||, 1e-12) * sqrt(D), no eps in the mean
    )
    h, beta, res = hc_pre(
        jnp.asarray(streams),
        jnp.asarray(_np(hc.static_alpha)),
        jnp.asarray(_np(hc.static_beta)),
        **kw,
    )
    np.testing.assert_allclose(h, _np(branch_input_t), atol=2e-5, rtol=1e-5)
    new = hc_post(jnp.asarray(streams), jnp.asarray(layer_out), beta, res)
    np.testing.assert_allclose(new, new_t, atol=2e-5, rtol=1e-5)
