"""Parity of `jaxmodels.ops.nsa` with flash-linear-attention's ``fla/ops/nsa/naive.py``.

fla's naive NSA is the special case of ours with: one block size for everything (l = d = l'),
mean-pooled compression (its ``mean_pooling``), the same keys/values for all branches, forced
blocks {first, previous, current} (our num_init=1, num_local=2), selection by the group-*mean*
compression probability (ours: group sum — the same ranking, since G is a power of two the sums are
exactly G times the means) and GQA groups of >= 16 heads. Its sliding window needs flash-attn, so
the comparison runs with ``window_size=0`` (our window gate 0). Where fla differs we do not
compare: forced blocks rank by a score of 1.0 there (+inf here), slot order of tied forced blocks
is torch's, and missing slots are -1 (here: ``valid`` False) — so block indices are compared as
sets.

fla's package ``__init__`` imports Triton kernels; without Triton (CPU machines) the naive file
is loaded by path with stub modules for its two helper imports (``prepare_chunk_offsets``, only
used for variable-length batches, and ``mean_pooling``, replaced by a plain torch mean over full
blocks — what fla's kernel computes for them).
"""

import functools
import importlib.util
import pathlib
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.nsa import nsa_attention, nsa_compress

NUM_LOCAL = 2  # fla forces the current and the previous block

pytestmark = pytest.mark.reference
torch = pytest.importorskip("torch")
pytest.importorskip("einops")


def _torch_mean_pooling(x, chunk_size, cu_seqlens=None):
    if cu_seqlens is not None:
        raise NotImplementedError("variable-length batches are not used here")
    b, t, h, d = x.shape
    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    xp = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
    counts = torch.clamp(t - torch.arange(n) * chunk_size, max=chunk_size).to(x.dtype)
    return xp.view(b, n, chunk_size, h, d).sum(2) / counts.view(1, n, 1, 1)


def _load_fla_naive(monkeypatch):
    try:
        from fla.ops.nsa import naive  # noqa: PLC0415

        return naive
    except ImportError:
        pass
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flash-linear-attention is not installed")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "ops" / "nsa" / "naive.py"
    if not path.exists():
        pytest.skip(f"{path} not found in the installed flash-linear-attention")
    stubs = {
        "fla": types.ModuleType("fla"),
        "fla.ops": types.ModuleType("fla.ops"),
        "fla.ops.utils": types.ModuleType("fla.ops.utils"),
        "fla.ops.utils.pooling": types.ModuleType("fla.ops.utils.pooling"),
    }

    def no_varlen(*args, **kwargs):
        raise NotImplementedError("variable-length batches are not used here")

    stubs["fla.ops.utils"].prepare_chunk_offsets = no_varlen
    stubs["fla.ops.utils.pooling"].mean_pooling = _torch_mean_pooling
    for name, mod in stubs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    module_spec = importlib.util.spec_from_file_location("_fla_nsa_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        with warnings.catch_warnings():  # "flash-attn is not installed": only its window uses it
            warnings.simplefilter("ignore", ImportWarning)
            module_spec.loader.exec_module(module)
    except Exception as e:  # pragma: no cover - depends on the installed version
        pytest.skip(f"cannot load fla's naive NSA without its package: {e!r}")
    return module


def test_matches_fla_naive_nsa(monkeypatch):
    naive = _load_fla_naive(monkeypatch)
    B, T, N, K, H, bs, n = 1, 128, 16, 1, 32, 16, 4
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, T, h, H)).astype(np.float32) for h in (N, K, K))
    g_cmp, g_slc = (rng.uniform(size=(B, T, N)).astype(np.float32) for _ in range(2))

    o_ref, idx_ref = naive.naive_nsa(
        torch.from_numpy(q),
        torch.from_numpy(k),
        torch.from_numpy(v),
        g_cmp=torch.from_numpy(g_cmp),
        g_slc=torch.from_numpy(g_slc),
        g_swa=None,
        block_counts=n,
        block_size=bs,
        window_size=0,
        return_block_indices=True,
    )

    kw = dict(cmp_block=bs, cmp_stride=bs)
    gates = jnp.stack([g_cmp, g_slc, np.zeros_like(g_cmp)], axis=-1)
    k_cmp, v_cmp = nsa_compress(jnp.asarray(k), **kw), nsa_compress(jnp.asarray(v), **kw)
    np.testing.assert_allclose(
        k_cmp, _torch_mean_pooling(torch.from_numpy(k), bs).numpy(), atol=1e-6
    )
    ours_fn = jax.jit(
        functools.partial(
            nsa_attention,
            slc_block=bs,
            num_selected=n,
            window=bs,
            return_block_indices=True,
            num_local=NUM_LOCAL,
            **kw,
        )
    )
    out, idx, valid = ours_fn(
        jnp.asarray(q),
        k_cmp_BMKH=k_cmp,
        v_cmp_BMKH=v_cmp,
        k_slc_BSKH=k,
        v_slc_BSKH=v,
        k_win_BSKH=k,
        v_win_BSKH=v,
        gates_BTN3=gates,
    )
    idx_ref = idx_ref.numpy()
    for t in range(T):
        for h in range(K):
            ours = set(np.asarray(idx[0, t, h])[np.asarray(valid[0, t, h])].tolist())
            theirs = set(idx_ref[0, t, h].tolist()) - {-1}
            assert ours == theirs, (t, h, ours, theirs)
    np.testing.assert_allclose(out, o_ref.numpy(), atol=2e-5, rtol=2e-5)
