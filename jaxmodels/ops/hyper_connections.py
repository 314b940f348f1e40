"""Hyper-Connections (HC, arXiv 2409.19606) and mHC (arXiv 2512.24880, as DeepSeek-V4 ships it).

Pure functions over arrays; the Linen modules in ``jaxmodels/residual`` own the parameters.

Residual-stream state: ``x_BTMD`` = [batch, length, M streams, D model] (any leading axes work in
place of ``B, T``). One residual layer (one attention or one MLP sublayer) is::

    layer_input_BTD, post_BTM, res_BTMM = *_pre(x_BTMD, params...)
    layer_output_BTD = sublayer(norm(layer_input_BTD))
    x_BTMD = *_post(x_BTMD, layer_output_BTD, post_BTM, res_BTMM)

**One matrix convention everywhere in this file:** ``res[..., dst, src]``, so the stream update is
``x'_dst = sum_src res[dst, src] x_src + post_dst * F`` -- the mHC paper's Eq. 3,
``x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)``. Rows (sums over sources) give the forward signal
gain, columns the backward gain (mHC §3.1). Where a source stores the transpose, the functions here
transpose once, at the point noted:

* DeepSeek-V4 code stores ``comb[src, dst]`` and applies ``sum_i comb[i, j] x_i``
  (``inference/model.py`` ``Block.hc_post``; transformers applies ``comb^T @ streams``), so
  ``res = comb^T``.
* The HC paper stores ``A_r[src, dst]`` and applies ``H' = A_r^T H``, so ``res = A_r^T``.

Parameter shapes (``M`` streams, ``D`` model width):

mHC, per residual layer (V4: ``hc_attn_*`` / ``hc_ffn_*``), see :func:`mhc_coefficients`:
  ``fn``    [M*D, M*M + 2*M]  float32 -- V4 stores its transpose, ``hc_*_fn`` (M*M+2*M, M*D)
  ``scale`` [3]               float32 -- (alpha_pre, alpha_post, alpha_res); V4 ``hc_*_scale``
  ``base``  [M*M + 2*M]       float32 -- [pre (M) | post (M) | res logits (M*M, row-major)]
mHC head (V4 ``hc_head_*``), see :func:`mhc_head`:
  ``head_fn`` [M*D, M], ``head_scale`` [1], ``head_base`` [M]  (V4 stores ``hc_head_fn`` (M, M*D))
HC, per residual layer, see :func:`hc_coefficients` and :func:`hc_init`:
  ``static_alpha`` [M, M+1] (column 0 = A_m read-in, columns 1.. = A_r[src, dst]),
  ``static_beta`` [M],
  dynamic (optional): ``dynamic_alpha_fn`` [D, M+1], ``dynamic_alpha_scale`` [] (scalar),
  ``dynamic_beta_fn`` [D], ``dynamic_beta_scale`` [], ``norm_scale`` [D] or None.

Where the DeepSeek-V4 code and the mHC paper differ (we follow the code by default, ``form="v4"``,
for checkpoint compatibility; ``form="paper"`` gives the paper):

1. Sinkhorn: V4 starts from ``softmax(L) + eps`` and puts ``eps`` in every denominator; the paper
   starts from ``exp(L)`` without ``eps``. Both do 20 column and 20 row normalisations and, in the
   frame where the matrix acts on the streams, both end on rows (see ``jaxmodels/ops/sinkhorn.py``).
2. Layout of the residual logits: V4 reshapes the M*M logits row-major as ``[src, dst]`` (and
   transposes the Sinkhorn output); the paper's ``mat(.)`` is read here as row-major ``[dst, src]``
   (``H_res``). With the same weights the two forms therefore see transposed logit matrices.
3. Pre weights: V4 ``sigmoid(.) + eps``; paper ``sigmoid(.)``.
4. The weightless RMSNorm of the flattened streams is applied after the projection
   (``(x @ fn) * rsqrt(mean(x^2) + norm_eps)``) in both -- the paper's §4.3.1 reorder; it is exact.
   The paper uses a weighted RMSNorm whose weight "is absorbed in phi"; V4 has no weight.
"""

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.ops.norms import rms_norm
from jaxmodels.ops.reductions import materialize, sum_minor, weighted_sum
from jaxmodels.ops.sinkhorn import sinkhorn_paper, sinkhorn_v4

MhcForm = Literal["v4", "paper"]

_HIGHEST = jax.lax.Precision.HIGHEST


def mhc_num_mixes(num_streams: int) -> int:
    """Width of mHC's dynamic projection: ``M*M + 2*M`` (24 for ``hc_mult = 4``)."""
    return num_streams * num_streams + 2 * num_streams


def _flat_rsqrt(x_BTMD: jax.Array, norm_eps: float) -> tuple[jax.Array, jax.Array]:
    """Flatten streams to [..., M*D] in float32 and return it with ``rsqrt(mean(x^2) + eps)``."""
    x_flat = x_BTMD.reshape(*x_BTMD.shape[:-2], -1).astype(jnp.float32)
    rsqrt = jax.lax.rsqrt(jnp.mean(jnp.square(x_flat), axis=-1, keepdims=True) + norm_eps)
    return x_flat, rsqrt


def stream_update_reference(
    x_BTMD: jax.Array, layer_output_BTD: jax.Array, post_BTM: jax.Array, res_BTMM: jax.Array
) -> jax.Array:
    """``x'_dst = sum_src res[dst, src] x_src + post_dst * out`` as one einsum (autodiff); the
    reference that tests hold :func:`_stream_update` to. float32, cast to x's dtype."""
    mixed = jnp.einsum(
        "...ij,...jd->...id",
        res_BTMM.astype(jnp.float32),
        x_BTMD.astype(jnp.float32),
        precision=_HIGHEST,
    )
    out = (
        post_BTM.astype(jnp.float32)[..., None] * layer_output_BTD.astype(jnp.float32)[..., None, :]
    )
    return (mixed + out).astype(x_BTMD.dtype)


def read_streams_reference(x_BTMD: jax.Array, weights_BTM: jax.Array) -> jax.Array:
    """``sum_m w_m x_m`` as one einsum (autodiff); the reference for :func:`_read_streams`."""
    y = jnp.einsum(
        "...m,...md->...d",
        weights_BTM.astype(jnp.float32),
        x_BTMD.astype(jnp.float32),
        precision=_HIGHEST,
    )
    return y.astype(x_BTMD.dtype)


# The fast forms below compute the same sums elementwise and write the backward pass out
# (jaxmodels/ops/reductions.py says why): autodiff of the einsums above gives per-token batched
# [M, D] x [D, M] dots (2048 tiny matmuls for a `small` batch), which XLA:CPU runs one at a
# time: they were a third of the mHC train step's extra time.


@jax.custom_vjp
def _stream_update(
    x_BTMD: jax.Array, layer_output_BTD: jax.Array, post_BTM: jax.Array, res_BTMM: jax.Array
) -> jax.Array:
    """``x'_dst = sum_src res[dst, src] x_src + post_dst * out``, float32, cast to x's dtype."""
    f32 = jnp.float32
    mixed = jnp.sum(res_BTMM.astype(f32)[..., :, :, None] * x_BTMD.astype(f32)[..., None, :, :], -2)
    out = post_BTM.astype(f32)[..., None] * layer_output_BTD.astype(f32)[..., None, :]
    return (mixed + out).astype(x_BTMD.dtype)


def _stream_update_fwd(x_BTMD, layer_output_BTD, post_BTM, res_BTMM):
    residuals = (x_BTMD, layer_output_BTD, post_BTM, res_BTMM)
    return _stream_update(*residuals), residuals


def _stream_update_bwd(residuals, g_BTMD):
    x_BTMD, y_BTD, post_BTM, res_BTMM = residuals
    f32 = jnp.float32
    g, x, y = materialize(g_BTMD.astype(f32)), x_BTMD.astype(f32), y_BTD.astype(f32)
    dx_BTMD = jnp.sum(res_BTMM.astype(f32)[..., :, :, None] * g[..., :, None, :], axis=-3)
    dy_BTD = weighted_sum(post_BTM, g, -2)
    dpost_BTM = sum_minor(g * y[..., None, :])
    dres_BTMM = sum_minor(g[..., :, None, :] * x[..., None, :, :])
    return (
        dx_BTMD.astype(x_BTMD.dtype),
        dy_BTD.astype(y_BTD.dtype),
        dpost_BTM.astype(post_BTM.dtype),
        dres_BTMM.astype(res_BTMM.dtype),
    )


_stream_update.defvjp(_stream_update_fwd, _stream_update_bwd)


def _read_streams(x_BTMD: jax.Array, weights_BTM: jax.Array) -> jax.Array:
    """``sum_m w_m x_m`` in float32, cast back to x's dtype ([..., M, D] -> [..., D])."""
    return weighted_sum(weights_BTM, x_BTMD, -2).astype(x_BTMD.dtype)


# --------------------------------------------------------------------------------------------
# mHC
# --------------------------------------------------------------------------------------------


def mhc_coefficients(
    x_BTMD: jax.Array,
    fn: jax.Array,
    scale: jax.Array,
    base: jax.Array,
    *,
    iters: int = 20,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
    form: MhcForm = "v4",
    sinkhorn_unroll: int | bool = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """mHC pre/post/residual mappings from the flattened, RMS-normalised streams (float32).

    ``mixes = (vec(x) @ fn) * rsqrt(mean(vec(x)^2) + norm_eps)`` (mHC Eqs. 7, 14-16; V4
    ``Block.hc_pre``), split as [pre (M) | post (M) | res (M*M)], then

    * ``pre  = sigmoid(mixes_pre * scale[0] + base_pre) (+ eps for "v4")``
    * ``post = 2 * sigmoid(mixes_post * scale[1] + base_post)``
    * ``res``: logits ``mixes_res * scale[2] + base_res`` reshaped row-major to [M, M];
      ``"v4"``: ``res = sinkhorn_v4(logits)^T`` (V4's ``comb`` applied transposed);
      ``"paper"``: ``res = sinkhorn_paper(logits)`` (the logits are ``H_res[dst, src]``).

    Args:
      x_BTMD: [..., M, D] streams (any float dtype).
      fn: [M*D, M*M + 2*M] projection (``hc_*_fn.T`` of a V4 checkpoint).
      scale: [3] (alpha_pre, alpha_post, alpha_res).
      base: [M*M + 2*M] static biases.
      iters: Sinkhorn iterations (``hc_sinkhorn_iters``, 20).
      eps: ``hc_eps`` (1e-6): added to pre and inside Sinkhorn ("v4" only).
      norm_eps: eps of the weightless RMSNorm (V4 ``norm_eps`` / ``rms_norm_eps``, 1e-6).
      form: "v4" (default, DeepSeek-V4 code) or "paper" (arXiv 2512.24880 Eqs. 7-9).
      sinkhorn_unroll: unrolling of the scans over Sinkhorn iterations (1: fastest on CPU; an
        int or True for accelerators). Does not change the result.

    Returns:
      pre_BTM [..., M], post_BTM [..., M], res_BTMM [..., M, M] (``res[dst, src]``), float32.
    """
    m = x_BTMD.shape[-2]
    k = mhc_num_mixes(m)
    if fn.shape != (m * x_BTMD.shape[-1], k):
        raise ValueError(
            f"mHC fn must be [M*D, M*M+2*M] = {(m * x_BTMD.shape[-1], k)}, got {fn.shape} "
            "(a DeepSeek-V4 `hc_*_fn` of shape (M*M+2*M, M*D) must be transposed)."
        )
    if scale.shape != (3,) or base.shape != (k,):
        raise ValueError(
            f"mHC scale must be (3,) and base ({k},); got {scale.shape}, {base.shape}."
        )
    x_flat, rsqrt = _flat_rsqrt(x_BTMD, norm_eps)
    mixes = jnp.einsum("...k,kn->...n", x_flat, fn.astype(jnp.float32), precision=_HIGHEST)
    mixes = mixes * rsqrt
    scale = scale.astype(jnp.float32)
    base = base.astype(jnp.float32)
    pre_logits = mixes[..., :m] * scale[0] + base[:m]
    post_logits = mixes[..., m : 2 * m] * scale[1] + base[m : 2 * m]
    res_logits = (mixes[..., 2 * m :] * scale[2] + base[2 * m :]).reshape(*mixes.shape[:-1], m, m)
    post = 2.0 * jax.nn.sigmoid(post_logits)
    if form == "v4":
        pre = jax.nn.sigmoid(pre_logits) + eps
        comb = sinkhorn_v4(res_logits, iters=iters, eps=eps, unroll=sinkhorn_unroll)
        res = jnp.swapaxes(comb, -1, -2)
    elif form == "paper":
        pre = jax.nn.sigmoid(pre_logits)
        res = sinkhorn_paper(res_logits, iters=iters, unroll=sinkhorn_unroll)
    else:
        raise ValueError(f"Unknown mHC form {form!r}; expected 'v4' or 'paper'.")
    return pre, post, res


def mhc_pre(
    x_BTMD: jax.Array,
    fn: jax.Array,
    scale: jax.Array,
    base: jax.Array,
    *,
    iters: int = 20,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
    form: MhcForm = "v4",
    sinkhorn_unroll: int | bool = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """mHC before a sublayer: coefficients and the collapsed layer input ``sum_m pre_m x_m``.

    V4 ``Block.hc_pre``: the weighted sum is taken in float32 and cast to ``x``'s dtype; the
    decoder then applies the sublayer's own RMSNorm (``attn_norm`` / ``ffn_norm``) to it.
    Arguments as :func:`mhc_coefficients`.

    Returns:
      layer_input_BTD [..., D] (x's dtype), post_BTM [..., M] and res_BTMM [..., M, M] (float32,
      ``res[dst, src]``) for :func:`mhc_post`.
    """
    pre, post, res = mhc_coefficients(
        x_BTMD,
        fn,
        scale,
        base,
        iters=iters,
        eps=eps,
        norm_eps=norm_eps,
        form=form,
        sinkhorn_unroll=sinkhorn_unroll,
    )
    return _read_streams(x_BTMD, pre), post, res


def mhc_post(
    x_BTMD: jax.Array, layer_output_BTD: jax.Array, post_BTM: jax.Array, res_BTMM: jax.Array
) -> jax.Array:
    """mHC after a sublayer: ``x'_j = sum_i res[j, i] x_i + post_j * layer_output``.

    Equals V4 ``Block.hc_post`` (``sum_i comb[i, j] x_i``, since ``res = comb^T``) and mHC Eq. 3.
    Computed in float32 (V4's coefficients are float32, so its sum is too) and cast to x's dtype.

    Args:
      x_BTMD: [..., M, D] streams that entered :func:`mhc_pre`.
      layer_output_BTD: [..., D] sublayer output.
      post_BTM: [..., M]; res_BTMM: [..., M, M] from :func:`mhc_pre`.

    Returns:
      [..., M, D] new streams, x's dtype.
    """
    return _stream_update(x_BTMD, layer_output_BTD, post_BTM, res_BTMM)


def mhc_head(
    x_BTMD: jax.Array,
    head_fn: jax.Array,
    head_scale: jax.Array,
    head_base: jax.Array,
    *,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
) -> jax.Array:
    """Final collapse of the M streams (V4 ``ParallelHead.hc_head``, transformers
    ``DeepseekV4HyperHead``): ``y = sum_m w_m x_m``, ``w = sigmoid(mixes * scale + base) + eps``,
    ``mixes = (vec(x) @ head_fn) * rsqrt(mean(vec(x)^2) + norm_eps)``. The final RMSNorm and the
    unembedding follow in the model.

    Args:
      x_BTMD: [..., M, D].
      head_fn: [M*D, M] (``hc_head_fn.T`` of a V4 checkpoint); head_scale: [1]; head_base: [M].
      eps: ``hc_eps``; norm_eps: the weightless RMSNorm eps.

    Returns:
      [..., D] in x's dtype.
    """
    m = x_BTMD.shape[-2]
    if head_fn.shape != (m * x_BTMD.shape[-1], m):
        raise ValueError(
            f"mHC head_fn must be [M*D, M] = {(m * x_BTMD.shape[-1], m)}, got {head_fn.shape}."
        )
    x_flat, rsqrt = _flat_rsqrt(x_BTMD, norm_eps)
    mixes = jnp.einsum("...k,kn->...n", x_flat, head_fn.astype(jnp.float32), precision=_HIGHEST)
    mixes = mixes * rsqrt
    w = jax.nn.sigmoid(mixes * head_scale.astype(jnp.float32) + head_base.astype(jnp.float32)) + eps
    return _read_streams(x_BTMD, w)


# --------------------------------------------------------------------------------------------
# Hyper-Connections (HC)
# --------------------------------------------------------------------------------------------


def hc_init(num_streams: int, layer_index: int) -> tuple[jax.Array, jax.Array]:
    """The HC paper's static initialisation (arXiv 2409.19606 App. J Algorithm 2; lucidrains
    ``HyperConnections.__init__``): layer ``k`` reads stream ``k mod n``, streams pass through
    unchanged, the output is written to every stream.

    With the dynamic projections at zero this makes every layer a Pre-Norm residual on the stream
    it reads.

    Args:
      num_streams: expansion rate n (M).
      layer_index: index of the residual layer (attention and MLP counted separately).

    Returns:
      static_alpha [M, M+1] float32: column 0 one-hot at ``layer_index % M`` (A_m), columns 1..
      the identity (A_r); static_beta [M] float32 ones (B).
    """
    if num_streams < 1:
        raise ValueError(f"num_streams must be >= 1, got {num_streams}.")
    alpha = np.zeros((num_streams, num_streams + 1), np.float32)
    alpha[layer_index % num_streams, 0] = 1.0
    alpha[:, 1:] = np.eye(num_streams, dtype=np.float32)
    return jnp.asarray(alpha), jnp.ones((num_streams,), jnp.float32)


def hc_coefficients(
    x_BTMD: jax.Array,
    static_alpha: jax.Array,
    static_beta: jax.Array,
    *,
    dynamic_alpha_fn: jax.Array | None = None,
    dynamic_alpha_scale: jax.Array | float | None = None,
    dynamic_beta_fn: jax.Array | None = None,
    dynamic_beta_scale: jax.Array | float | None = None,
    norm_scale: jax.Array | None = None,
    norm_eps: float = 1e-6,
    use_tanh: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Static or dynamic Hyper-Connection weights (arXiv 2409.19606 §2; restated as mHC Eq. 5).

    Static (SHC): ``alpha = static_alpha``, ``beta = static_beta``. Dynamic (DHC) adds, per token
    and **per stream** (RMSNorm over each stream's D features, not the flattened vector)::

        xn = RMSNorm(x) (optionally * norm_scale)        # [..., M, D]
        alpha = static_alpha + s_alpha * tanh(xn @ W_alpha)   # [..., M, M+1], row = source stream
        beta  = static_beta  + s_beta  * tanh(xn @ W_beta)    # [..., M]

    The HC paper's pseudocode uses LayerNorm; like mHC's restatement and lucidrains we use RMSNorm.

    Args:
      x_BTMD: [..., M, D] streams.
      static_alpha: [M, M+1]: column 0 is the read-in A_m, columns 1.. are A_r[src, dst].
      static_beta: [M] write-out B.
      dynamic_alpha_fn: [D, M+1] W_alpha or None (static); dynamic_alpha_scale: scalar s_alpha.
      dynamic_beta_fn: [D] W_beta or None; dynamic_beta_scale: scalar s_beta.
      norm_scale: optional [D] RMSNorm gain; norm_eps: RMSNorm eps.
      use_tanh: the paper's tanh (False: identity, an option in lucidrains).

    Returns:
      read_BTM [..., M] (A_m), beta_BTM [..., M] (B), res_BTMM [..., M, M] = A_r^T (``res[dst,
      src]``); float32, broadcast to x's leading axes.
    """
    m = x_BTMD.shape[-2]
    if static_alpha.shape != (m, m + 1) or static_beta.shape != (m,):
        raise ValueError(
            f"HC static_alpha must be [M, M+1] = {(m, m + 1)} and static_beta [M] = {(m,)}; got "
            f"{static_alpha.shape}, {static_beta.shape}."
        )
    lead = x_BTMD.shape[:-2]
    act = jnp.tanh if use_tanh else (lambda v: v)
    alpha = jnp.broadcast_to(static_alpha.astype(jnp.float32), (*lead, m, m + 1))
    beta = jnp.broadcast_to(static_beta.astype(jnp.float32), (*lead, m))
    if dynamic_alpha_fn is not None or dynamic_beta_fn is not None:
        xn = rms_norm(x_BTMD.astype(jnp.float32), norm_scale, eps=norm_eps)
        if dynamic_alpha_fn is not None:
            if dynamic_alpha_scale is None:
                raise ValueError("dynamic_alpha_fn given without dynamic_alpha_scale.")
            dyn = jnp.einsum(
                "...md,dn->...mn", xn, dynamic_alpha_fn.astype(jnp.float32), precision=_HIGHEST
            )
            alpha = alpha + jnp.asarray(dynamic_alpha_scale, jnp.float32) * act(dyn)
        if dynamic_beta_fn is not None:
            if dynamic_beta_scale is None:
                raise ValueError("dynamic_beta_fn given without dynamic_beta_scale.")
            dyn = jnp.einsum(
                "...md,d->...m", xn, dynamic_beta_fn.astype(jnp.float32), precision=_HIGHEST
            )
            beta = beta + jnp.asarray(dynamic_beta_scale, jnp.float32) * act(dyn)
    return alpha[..., 0], beta, jnp.swapaxes(alpha[..., 1:], -1, -2)


def hc_pre(
    x_BTMD: jax.Array,
    static_alpha: jax.Array,
    static_beta: jax.Array,
    *,
    dynamic_alpha_fn: jax.Array | None = None,
    dynamic_alpha_scale: jax.Array | float | None = None,
    dynamic_beta_fn: jax.Array | None = None,
    dynamic_beta_scale: jax.Array | float | None = None,
    norm_scale: jax.Array | None = None,
    norm_eps: float = 1e-6,
    use_tanh: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """HC width connection: the layer input ``h0 = A_m^T H`` plus what :func:`hc_post` needs.

    The paper computes ``[h0, H'] = [A_m, A_r]^T H`` in one product; here ``H' = A_r^T H`` is folded
    into :func:`hc_post` (same result), so HC and mHC share one interface. Arguments as
    :func:`hc_coefficients`.

    Returns:
      layer_input_BTD [..., D] (x's dtype; the sublayer applies its own pre-norm), beta_BTM
      [..., M], res_BTMM [..., M, M] (``A_r^T``, float32).
    """
    read, beta, res = hc_coefficients(
        x_BTMD,
        static_alpha,
        static_beta,
        dynamic_alpha_fn=dynamic_alpha_fn,
        dynamic_alpha_scale=dynamic_alpha_scale,
        dynamic_beta_fn=dynamic_beta_fn,
        dynamic_beta_scale=dynamic_beta_scale,
        norm_scale=norm_scale,
        norm_eps=norm_eps,
        use_tanh=use_tanh,
    )
    return _read_streams(x_BTMD, read), beta, res


def hc_post(
    x_BTMD: jax.Array, layer_output_BTD: jax.Array, beta_BTM: jax.Array, res_BTMM: jax.Array
) -> jax.Array:
    """HC depth connection: ``H_new = A_r^T H + B^T T(h0)``, i.e. ``x'_j = sum_i res[j, i] x_i +
    beta_j * out`` (arXiv 2409.19606 Eq. for the hyper-connection update). Float32, x's dtype out.
    """
    return _stream_update(x_BTMD, layer_output_BTD, beta_BTM, res_BTMM)


def expand_streams(x_BTD: jax.Array, num_streams: int) -> jax.Array:
    """Initial streams: the embedding repeated M times (HC and V4 ``Transformer.forward``)."""
    return jnp.broadcast_to(x_BTD[..., None, :], (*x_BTD.shape[:-1], num_streams, x_BTD.shape[-1]))


def hc_head(x_BTMD: jax.Array) -> jax.Array:
    """HC final collapse: the sum of the streams (lucidrains ``reduce_fn``; HC's output layer
    sums the hyper hidden vectors before the final norm). [..., M, D] -> [..., D]."""
    return jnp.sum(x_BTMD.astype(jnp.float32), axis=-2).astype(x_BTMD.dtype)


# --------------------------------------------------------------------------------------------
# Diagnostics (mHC §3.1, Figs. 3 and 7)
# --------------------------------------------------------------------------------------------


def amax_gain(a_MM: jax.Array, *, absolute_entries: bool = False) -> tuple[jax.Array, jax.Array]:
    """Amax Gain Magnitude of one mapping (mHC §3.1): forward = max over rows of |row sum|,
    backward = max over columns of |column sum| (``a[dst, src]``; Fig. 8 labels rows "forward
    signal gain" and columns "backward gradient gain").

    ``absolute_entries=True`` sums |entries| instead (the induced inf-/1-norms, an upper bound);
    the two agree for non-negative matrices such as mHC's.

    Args:
      a_MM: [..., M, M].

    Returns:
      (forward [...], backward [...]) float32.
    """
    a = a_MM.astype(jnp.float32)
    if absolute_entries:
        a = jnp.abs(a)
    fwd = jnp.max(jnp.abs(jnp.sum(a, axis=-1)), axis=-1)
    bwd = jnp.max(jnp.abs(jnp.sum(a, axis=-2)), axis=-1)
    return fwd, bwd


def composite_mappings(res_LMM: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Prefix and suffix products of per-layer residual matrices (mHC Eq. 4, Fig. 7b).

    Args:
      res_LMM: [L, ..., M, M] per-layer ``res[dst, src]`` (layer axis first; any other leading
        axes, e.g. tokens, are kept).

    Returns:
      prefix [L, ..., M, M]: ``prefix[l] = res[l] @ ... @ res[0]`` (input -> after layer l);
      suffix [L, ..., M, M]: ``suffix[l] = res[L-1] @ ... @ res[l]`` (layer l -> output).
    """
    res = res_LMM.astype(jnp.float32)

    def matmul(a, b):
        return jnp.einsum("...ij,...jk->...ik", a, b, precision=_HIGHEST)

    def fwd_step(acc, r):
        acc = matmul(r, acc)
        return acc, acc

    def bwd_step(acc, r):
        acc = matmul(acc, r)
        return acc, acc

    eye = jnp.broadcast_to(jnp.eye(res.shape[-1], dtype=jnp.float32), res.shape[1:])
    _, prefix = jax.lax.scan(fwd_step, eye, res)
    _, suffix = jax.lax.scan(bwd_step, eye, res, reverse=True)
    return prefix, suffix


def composite_gain(
    res_LMM: jax.Array, *, absolute_entries: bool = False
) -> tuple[jax.Array, jax.Array]:
    """mHC's stability measure: Amax gain of the composite residual mapping across layers.

    ``forward[l]`` = max |row sum| of ``res[l] @ ... @ res[0]`` (signal from the input to after
    layer l); ``backward[l]`` = max |column sum| of ``res[L-1] @ ... @ res[l]`` (gradient from the
    output back to layer l) -- the two curves of mHC Fig. 7b / Fig. 3b. The ideal value is 1; the
    paper reports HC peaking near 3000 and mHC at ~1.6 over 60 layers of a 27B model.

    The paper averages over the tokens of a sequence; pass per-token matrices [L, B, T, M, M] and
    average the returned gains, or average the matrices first (as its Fig. 8 does).

    Args:
      res_LMM: [L, ..., M, M] per-layer residual matrices ``res[dst, src]`` (as returned by
        :func:`mhc_pre` / :func:`hc_pre`).
      absolute_entries: see :func:`amax_gain`.

    Returns:
      (forward [L, ...], backward [L, ...]) float32.
    """
    prefix, suffix = composite_mappings(res_LMM)
    fwd, _ = amax_gain(prefix, absolute_entries=absolute_entries)
    _, bwd = amax_gain(suffix, absolute_entries=absolute_entries)
    return fwd, bwd
