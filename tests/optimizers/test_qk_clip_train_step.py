"""QK-Clip inside the train step: `training.make_train_step(track_max_logits=True)` passes the
sown per-head max logits to `optimizers.qk_clip` under the attention modules' parameter paths.

The targets here are found in the parameter tree itself (every module holding a `q_proj`), so
the test checks the keys the train step produces against the paths `qk_clip` looks up."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodels import training
from jaxmodels.attention.gqa import GQAConfig
from jaxmodels.config import ModelConfig
from jaxmodels.model import Decoder
from optimizers import mha_targets, qk_clip

N, K = 4, 2


def gqa_model(scan_layers: bool) -> ModelConfig:
    return ModelConfig(
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        attention={"gqa": GQAConfig(num_heads=N, num_kv_heads=K, head_dim=8)},
        scan_layers=scan_layers,
    )


def modules_with_q_proj(params) -> list[tuple[str, ...]]:
    """Parameter paths of the modules that own a `q_proj` kernel (the attention modules)."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(k.key for k in path)
        if keys[-2:] == ("q_proj", "kernel"):
            out.append(keys[:-2])
    return out


@pytest.mark.parametrize("scan_layers", [False, True])
def test_train_step_clips_the_heads_over_tau_and_leaves_the_rest_bit_identical(scan_layers):
    config = gqa_model(scan_layers)
    model = Decoder(config)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, config.vocab_size)
    params = {"params": nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])}
    modules = modules_with_q_proj(params)
    assert len(modules) == (1 if scan_layers else 2)

    # The per-head max logits of this batch, [N] per module (or [L, N] for a scanned stack).
    _, stats = model.apply(params, tokens, mutable=["attn_stats"])
    sown = training.max_logits_by_module(stats["attn_stats"])
    assert set(sown) == set(modules)  # the keys are parameter paths
    s_all = np.concatenate([np.ravel(sown[m]) for m in modules])
    tau = float(np.median(s_all))
    assert np.any(s_all > tau) and np.any(s_all <= tau)

    # Zero learning rate: the step is QK-Clip alone, new params = clip(params) exactly.
    tx = optax.chain(optax.sgd(0.0), qk_clip({m: mha_targets(N, K) for m in modules}, tau))
    state = training.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
    )
    step_fn = jax.jit(training.make_train_step(config, tx, track_max_logits=True))
    new_state, metrics = step_fn(state, {"inputs": tokens, "targets": tokens})

    np.testing.assert_allclose(metrics["max_logit"], np.max(s_all), rtol=1e-6)
    assert int(new_state.opt_state[1].clipped) == int(np.sum(s_all > tau))
    for module in modules:
        s = np.asarray(sown[module])  # [N] or [L, N]
        gamma = np.where(s > tau, tau / s, 1.0)
        group_gamma = gamma.reshape(*s.shape[:-1], K, N // K).min(-1)  # [.., K]
        factors = {"q_proj": np.repeat(group_gamma, N // K, -1), "k_proj": group_gamma}
        old, new = params, new_state.params
        for key in module:
            old, new = old[key], new[key]
        for name, f in factors.items():
            w_old, w_new = np.asarray(old[name]["kernel"]), np.asarray(new[name]["kernel"])
            f = np.sqrt(f)[..., None, :, None]  # kernel [.., D, heads, H]
            np.testing.assert_allclose(w_new, w_old * f, rtol=1e-6)
            same = np.broadcast_to(f == 1.0, w_old.shape)
            np.testing.assert_array_equal(w_new[same], w_old[same])  # unclipped: bit-identical
        np.testing.assert_array_equal(new["v_proj"]["kernel"], old["v_proj"]["kernel"])
