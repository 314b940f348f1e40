"""Module-level parity of the residual kinds with the official PyTorch references (``reference``).

The whole residual path of a 2-layer `Decoder` (expand -> per sub-layer read / write -> collapse
-> final RMSNorm) is compared with the reference model, the attention and MLP of both sides
replaced by the same stand-in sub-layers (``tanh(x @ W)``), so that only the residual kinds and
the norms around them differ:

* ``mhc``: transformers' ``DeepseekV4Model`` (its ``DeepseekV4DecoderLayer`` stream update,
  ``DeepseekV4HyperConnection`` x 2 per layer, ``DeepseekV4HyperHead``, the layer norms and the
  final norm) with random weights, imported into our parameters by
  :func:`jaxmodels.weights.hf_deepseek_v4_hc.load_hc_weights` from its ``state_dict()``.
* ``attn_res`` (full and block): a loop over flash-linear-attention's
  ``fla.ops.attnres.naive.naive_attnres`` with our pseudo-queries, key gains and norms, the
  sources kept as the AttnRes README describes (completed block sums + the partial block).

Each skips cleanly when its package is missing.
"""

import dataclasses
import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxmodels.attention.gqa import GQAConfig
from jaxmodels.config import ModelConfig
from jaxmodels.model import Decoder
from jaxmodels.residual.attn_res import AttnResConfig, collect_depth_weights
from jaxmodels.residual.mhc import MHCConfig
from jaxmodels.weights.hf_deepseek_v4_hc import load_hc_weights

pytestmark = pytest.mark.reference

B, T, D, L = 2, 5, 16, 2
FAST = {"xla_backend_optimization_level": 0}
BASE = ModelConfig(
    vocab_size=32,
    hidden_size=D,
    intermediate_size=32,
    num_layers=L,
    attention={"gqa": GQAConfig(num_heads=2, num_kv_heads=1, head_dim=8)},
)


def _stand_in_weights(seed=0):
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((B, T, D)).astype(np.float32)
    w_attn = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    w_mlp = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    return embeddings, w_attn, w_mlp


def _run_decoder_with_stand_ins(config, params, embeddings, w_attn, w_mlp, *, diagnostics=False):
    """Our Decoder with embed -> `embeddings`, attention -> tanh(x W_attn), mlp -> tanh(x W_mlp)
    and lm_head -> identity: returns the final-norm output [B, T, D] (and the diagnostics)."""

    def interceptor(next_fun, args, kwargs, context):
        name, method = context.module.name, context.method_name
        if method != "__call__":
            return next_fun(*args, **kwargs)
        if name == "embed":
            return jnp.asarray(embeddings)
        if name == "attention":
            return jnp.tanh(args[0] @ w_attn), args[2]
        if name == "mlp":
            return jnp.tanh(args[0] @ w_mlp)
        if name == "lm_head":
            return args[0]
        return next_fun(*args, **kwargs)

    def run(params):
        with nn.intercept_methods(interceptor):
            return Decoder(config).apply(
                params,
                jnp.zeros((B, T), jnp.int32),
                mutable=["intermediates"] if diagnostics else False,
            )

    out = jax.jit(run, compiler_options=FAST)(params)
    if diagnostics:
        (hidden, _), variables = out
        return np.asarray(hidden), variables
    return np.asarray(out[0])


def _init(config):
    init = jax.jit(Decoder(config).init, compiler_options=FAST)
    return nn.meta.unbox(init(jax.random.key(0), jnp.zeros((B, T), jnp.int32)))


# ---------------------------------------------------------------------------------------------
# mHC vs transformers DeepseekV4Model


def test_mhc_decoder_matches_transformers_deepseek_v4_model_through_the_importer():
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
    from transformers import DeepseekV4Config

    hf_config = DeepseekV4Config(
        vocab_size=32,
        hidden_size=D,
        moe_intermediate_size=16,
        num_hidden_layers=L,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        q_lora_rank=8,
        o_groups=1,
        o_lora_rank=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        index_n_heads=2,
        index_head_dim=8,
        index_topk=4,
        sliding_window=8,
        layer_types=["sliding_attention"] * L,
        mlp_layer_types=["moe"] * L,
        hc_mult=4,
        hc_sinkhorn_iters=20,
        hc_eps=1e-6,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    model = modeling.DeepseekV4Model(hf_config).float().eval()
    embeddings, w_attn, w_mlp = _stand_in_weights()
    ta, tm = torch.from_numpy(w_attn), torch.from_numpy(w_mlp)

    class StandInAttention(torch.nn.Module):
        def forward(self, x, **kwargs):
            return torch.tanh(x @ ta), None

    class StandInMLP(torch.nn.Module):
        def forward(self, x, **kwargs):
            return torch.tanh(x @ tm)

    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn = StandInAttention()
            layer.mlp = StandInMLP()
            for hc in (layer.attn_hc, layer.ffn_hc):
                # logit std ~ 1 (non-trivial Sinkhorn), scales != 1, random biases
                hc.fn.copy_(torch.randn_like(hc.fn) / (4 * D) ** 0.5)
                hc.base.copy_(torch.randn_like(hc.base))
                hc.scale.copy_(torch.tensor([0.7, 1.3, 1.0]))
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(1 + 0.2 * torch.randn_like(norm.weight))
        model.hc_head.hc_fn.copy_(torch.randn_like(model.hc_head.hc_fn) / (4 * D) ** 0.5)
        model.hc_head.hc_base.copy_(torch.randn_like(model.hc_head.hc_base))
        model.hc_head.hc_scale.copy_(torch.tensor([1.5]))
        model.norm.weight.copy_(1 + 0.2 * torch.randn_like(model.norm.weight))
        want = model(inputs_embeds=torch.from_numpy(embeddings), use_cache=False)
        want = want.last_hidden_state.numpy()

    for scan_layers in (False, True):
        config = dataclasses.replace(BASE, residual=MHCConfig(hc_mult=4), scan_layers=scan_layers)
        params = load_hc_weights(_init(config), model.state_dict(), config)
        got = _run_decoder_with_stand_ins(config, params, embeddings, w_attn, w_mlp)
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)
    # The paper form with the same weights is a different function (transposed logits, no eps).
    paper = dataclasses.replace(config, residual=MHCConfig(hc_mult=4, form="paper"))
    got = _run_decoder_with_stand_ins(paper, params, embeddings, w_attn, w_mlp)
    assert np.abs(got - want).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# AttnRes vs fla.ops.attnres.naive


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


@pytest.mark.parametrize("mode,block_size", [("full", 1), ("block", 3)])
def test_attn_res_decoder_matches_fla_naive_attnres(mode, block_size):
    """Final hidden state and every read's depth weights, fp32, atol 2e-5."""
    naive_attnres = _load_fla_naive()
    import torch

    config = dataclasses.replace(
        BASE, residual=AttnResConfig(mode=mode, block_size=block_size, num_layers=L)
    )
    params = _init(config)
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(1)
    for path, leaf in flat.items():  # random queries (std ~ 1/sqrt(D) x 3), gains and norms
        if path[-1] == "query":
            flat[path] = jnp.asarray(3 * rng.standard_normal(leaf.shape) / np.sqrt(D), jnp.float32)
        elif path[-1] == "key_norm_scale" or path[-2:] == ("norm", "scale"):
            flat[path] = jnp.asarray(1 + 0.2 * rng.standard_normal(leaf.shape), jnp.float32)
    params = traverse_util.unflatten_dict(flat)
    embeddings, w_attn, w_mlp = _stand_in_weights()
    got, diagnostics = _run_decoder_with_stand_ins(
        config, params, embeddings, w_attn, w_mlp, diagnostics=True
    )
    ours_weights = np.asarray(collect_depth_weights(diagnostics))

    p = params["params"]

    def t(x):
        return torch.from_numpy(np.asarray(x, np.float32))

    blocks, partial, count = [t(embeddings)], None, 0
    want_weights = []
    for layer in range(L):
        for module, w in (("attention_residual", w_attn), ("mlp_residual", w_mlp)):
            q = p[f"group_{layer}"]["layer_0"][module]
            sources = blocks + ([partial] if count else [])
            x, weights = naive_attnres(
                t(q["query"]),
                sources,
                t(q["key_norm_scale"]),
                output_rms_weight=t(q["norm"]["scale"]),
                rms_eps=1e-6,
                return_weights=True,
            )
            want_weights.append(weights.numpy())
            out = torch.tanh(x @ t(w))
            partial = out if count == 0 else partial + out
            count += 1
            if count == block_size:
                blocks, partial, count = blocks + [partial], None, 0
    sources = blocks + ([partial] if count else [])
    want, weights = naive_attnres(
        t(p["collapse"]["query"]),
        sources,
        t(p["collapse"]["key_norm_scale"]),
        output_rms_weight=t(p["final_norm"]["scale"]),
        rms_eps=1e-6,
        return_weights=True,
    )
    want_weights.append(weights.numpy())
    np.testing.assert_allclose(got, want.numpy(), atol=2e-5, rtol=1e-5)
    assert len(want_weights) == ours_weights.shape[0] == 2 * L + 1
    for ours, theirs in zip(ours_weights, want_weights, strict=True):
        valid = ours.sum(axis=(1, 2)) > 0  # masked slots are exactly 0
        np.testing.assert_allclose(ours[valid], theirs, atol=1e-6)
    assert np.abs(want_weights[-1] - 1.0 / len(want_weights[-1])).max() > 1e-2  # not uniform
