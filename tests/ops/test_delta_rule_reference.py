"""Parity of jaxmodels.ops.delta_rule with flash-linear-attention's naive PyTorch references.

``fla/ops/kda/naive.py`` (``naive_recurrent_kda``, ``naive_chunk_kda``) and
``fla/ops/gated_delta_rule/naive.py`` (``naive_recurrent_gated_delta_rule``,
``naive_chunk_gated_delta_rule``) need only torch and einops, but ``import fla.ops`` pulls in
Triton, which CPU machines lack. So the two files are loaded directly from the installed
package directory; the tests skip cleanly when torch, einops or fla is absent.
"""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from jaxmodels.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent

pytestmark = pytest.mark.reference

B, T, N, H, J = 2, 128, 3, 32, 16  # T a multiple of 64: FLA's naive_chunk_kda requires it


def _load_fla_naive(relative: str):
    torch = pytest.importorskip("torch")
    pytest.importorskip("einops")
    spec = importlib.util.find_spec("fla")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flash-linear-attention (fla) is not installed")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        pytest.skip(f"{relative} not found in the installed fla package")
    module_spec = importlib.util.spec_from_file_location(f"fla_naive_{path.parent.name}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError as e:  # a future fla whose naive file needs more than torch + einops
        pytest.skip(f"cannot load {relative}: {e}")
    return torch, module


def _inputs(seed, gate):
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = unit(rng.standard_normal((B, T, N, H)))
    k = unit(rng.standard_normal((B, T, N, H)))
    v = rng.standard_normal((B, T, N, J))
    g_shape = (B, T, N, H) if gate == "kda" else (B, T, N)
    g = -np.exp(rng.uniform(0, 1.5, g_shape[2:])) * np.logaddexp(
        0, rng.standard_normal(g_shape) - 3
    )
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, N))))
    state0 = 0.5 * rng.standard_normal((B, N, H, J))
    return [x.astype(np.float32) for x in (q, k, v, g, beta, state0)]


def _ours(q, k, v, g, beta, s0):
    outs = {}
    for name, fn in (("recurrent", delta_rule_recurrent), ("chunked", delta_rule_chunked)):
        o, s = jax.jit(fn)(q, k, v, g, beta, initial_state=s0)
        outs[name] = (np.asarray(o), np.asarray(s))
    return outs


def _check(ours, theirs, what):
    o_ref, s_ref = (x.detach().numpy() for x in theirs)
    assert np.abs(o_ref).max() > 0.05
    for name, (o, s) in ours.items():
        np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=2e-5, err_msg=f"{name} vs {what}")
        np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=2e-5, err_msg=f"{name} vs {what}")


def test_kda_matches_fla_naive():
    torch, naive = _load_fla_naive("ops/kda/naive.py")
    arrays = _inputs(0, "kda")
    ours = _ours(*arrays)
    q, k, v, g, beta, s0 = (torch.from_numpy(x) for x in arrays)
    common = {"initial_state": s0, "output_final_state": True}
    _check(ours, naive.naive_recurrent_kda(q, k, v, g, beta, **common), "naive_recurrent_kda")
    _check(ours, naive.naive_chunk_kda(q, k, v, g, beta, **common), "naive_chunk_kda")


def test_gated_delta_rule_matches_fla_naive():
    torch, naive = _load_fla_naive("ops/gated_delta_rule/naive.py")
    arrays = _inputs(1, "gdn")
    ours = _ours(*arrays)
    q, k, v, g, beta, s0 = (torch.from_numpy(x) for x in arrays)
    common = {"initial_state": s0, "output_final_state": True}
    # note FLA's argument orders: recurrent takes (beta, g), chunk takes (g, beta)
    recurrent = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, **common)
    _check(ours, recurrent, "naive_recurrent_gated_delta_rule")
    chunk = naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, **common)
    _check(ours, chunk, "naive_chunk_gated_delta_rule")
