"""Multi-head Latent Attention math (pure functions): the MHA form and the absorbed MQA form.

Follows DeepSeek-V2 §2.1.2–2.1.3 and App. C (arXiv 2405.04434), DeepSeek-V3 §2.1.1
(arXiv 2412.19437) and the two `attn_impl` branches ("naive", "absorb") of class `MLA` in
deepseek-ai/DeepSeek-V3 `inference/model.py`; equations in reference/attention.md §1.1–1.2.

Per token the layer keeps a latent `c_kv` [C] (already RMS-normed) and one rotary key `k_rope`
[R] shared by all heads. The up-projection `kv_b` [C, N, H + Hv] holds, per head, the key
up-projection W_UK = kv_b[:, n, :H] and the value up-projection W_UV = kv_b[:, n, H:].

* MHA form (training / prefill): K_n = [c_kv W_UK_n ; k_rope], V_n = c_kv W_UV_n, ordinary
  multi-head softmax attention with key dim H + R and value dim Hv.
* Absorbed form (decode): q̃_n = W_UK_n q_nope_n (a [C] vector per head), logits
  `q̃_n · c_kv_s + q_rope_n · k_rope_s`, latent output ō_n = Σ_s p_ns c_kv_s, then o_n = ō_n W_UV_n.
  This is multi-query attention with one shared key of dim C + R and value dim C over the cache
  itself, so a decode step reads (C + R) values per cached token for all heads at once.

Both forms compute the same function (tests: absorbed == MHA within float32 rounding).

Letters: B batch, T query length, S key slots, N heads, H per-head dim (nope part of q/k, or
value dim where the einsum says so), R rope dim, C latent rank, X = H + R or H + Hv (a
concatenation of two per-head parts).
"""

import functools

import jax
import jax.numpy as jnp

from jaxmodels.ops import attention as attention_ops

# `absorbed_decode_attention(implementation=...)`: the pure-JAX reference, the Pallas TPU kernel
# (jaxmodels/kernels/mla_decode.py), that kernel in Pallas interpret mode (any backend), and
# "auto": the kernel where the program is lowered for TPU, the pure-JAX form elsewhere.
DECODE_IMPLEMENTATIONS = ("xla", "pallas", "pallas_interpret", "auto")


def split_kv_b(kv_b_CNX: jax.Array, qk_nope_head_dim: int) -> tuple[jax.Array, jax.Array]:
    """Splits the up-projection [C, N, H + Hv] into W_UK [C, N, H] and W_UV [C, N, Hv]."""
    return kv_b_CNX[..., :qk_nope_head_dim], kv_b_CNX[..., qk_nope_head_dim:]


def mha_keys_values(
    c_kv_BSC: jax.Array, k_rope_BSR: jax.Array, kv_b_CNX: jax.Array, qk_nope_head_dim: int
) -> tuple[jax.Array, jax.Array]:
    """Per-head keys [B, S, N, H + R] and values [B, S, N, Hv] from the latent entries.

    The shared rotary key is broadcast to every head after its rotation (k^R is head-shared,
    V2 §2.1.3), and placed last in each key as in DeepSeek's checkpoints.
    """
    kv_BSNX = jnp.einsum("BSC,CNX->BSNX", c_kv_BSC, kv_b_CNX.astype(c_kv_BSC.dtype))
    k_nope_BSNH, v_BSNH = split_kv_b(kv_BSNX, qk_nope_head_dim)
    B, S, N, _ = k_nope_BSNH.shape
    k_rope_BSNR = jnp.broadcast_to(
        k_rope_BSR[:, :, None, :].astype(k_nope_BSNH.dtype), (B, S, N, k_rope_BSR.shape[-1])
    )
    return jnp.concatenate([k_nope_BSNH, k_rope_BSNR], axis=-1), v_BSNH


def mha_attention(
    q_BTNX: jax.Array,
    k_BSNX: jax.Array,
    v_BSNH: jax.Array,
    mask_BTS: jax.Array | None,
    *,
    scale: float,
    implementation: str = "xla",
) -> jax.Array:
    """MHA-form attention core with per-head keys (dim H + R) and values (dim Hv).

    "xla" / "cudnn" run `jax.nn.dot_product_attention`, which needs equal key and value dims:
    the shorter of the two is zero-padded and the padding sliced off the output (exact: zero
    columns add nothing to a logit or an output), as FlashAttention-based MLA prefill pads
    values to the key dim. "reference" is `attention_reference`.

    Returns:
      [B, T, N, Hv] in q's dtype.
    """
    if implementation == "reference":
        return attention_ops.attention_reference(q_BTNX, k_BSNX, v_BSNH, mask_BTS, scale=scale)
    value_dim, key_dim = v_BSNH.shape[-1], q_BTNX.shape[-1]
    width = max(value_dim, key_dim)

    def pad(x):
        return jnp.pad(x, ((0, 0),) * 3 + ((0, width - x.shape[-1]),))

    out_BTNX = attention_ops.dot_product_attention(
        pad(q_BTNX),
        pad(k_BSNX),
        pad(v_BSNH),
        mask_BTS,
        scale=scale,
        implementation=implementation,
    )
    return out_BTNX[..., :value_dim]


def absorb_query(q_nope_BTNH: jax.Array, w_uk_CNH: jax.Array) -> jax.Array:
    """Folds the key up-projection into the query: q̃ [B, T, N, C] = W_UK_n q_nope_n."""
    return jnp.einsum("BTNH,CNH->BTNC", q_nope_BTNH, w_uk_CNH.astype(q_nope_BTNH.dtype))


def absorbed_logits(
    q_latent_BTNC: jax.Array,
    q_rope_BTNR: jax.Array,
    c_kv_BSC: jax.Array,
    k_rope_BSR: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """Scaled logits [B, N, T, S] in float32: (q̃·c_kv + q_rope·k_rope) * scale.

    The two dot products are summed rather than concatenated so that a decode step reads the
    cache in place (no [S, C + R] copy per step).
    """
    logits_BNTS = jnp.einsum(
        "BTNC,BSC->BNTS", q_latent_BTNC, c_kv_BSC, preferred_element_type=jnp.float32
    )
    logits_BNTS += jnp.einsum(
        "BTNR,BSR->BNTS", q_rope_BTNR, k_rope_BSR, preferred_element_type=jnp.float32
    )
    return logits_BNTS * scale


def masked_softmax(logits_BNTS: jax.Array, mask_BTS: jax.Array | None) -> jax.Array:
    """Float32 softmax over S; masked entries get 0 and fully masked rows are all zeros."""
    if mask_BTS is not None:
        logits_BNTS = jnp.where(mask_BTS[:, None], logits_BNTS, -jnp.inf)
    row_max = jnp.max(logits_BNTS, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits_BNTS - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(denom == 0, 1.0, denom)


def absorbed_attention(
    q_nope_BTNH: jax.Array,
    q_rope_BTNR: jax.Array,
    c_kv_BSC: jax.Array,
    k_rope_BSR: jax.Array,
    kv_b_CNX: jax.Array,
    mask_BTS: jax.Array | None,
    *,
    scale: float,
    qk_nope_head_dim: int,
) -> jax.Array:
    """Absorbed (MQA-form) MLA attention over latent entries.

    Args:
      q_nope_BTNH, q_rope_BTNR: the query's no-position and rotated parts.
      c_kv_BSC: normed latents of the S key slots; k_rope_BSR: their rotated shared keys.
      kv_b_CNX: the up-projection [C, N, H + Hv] (W_UK then W_UV per head).
      mask_BTS: boolean visibility, or None.
      scale: softmax scale (same as the MHA form's).

    Returns:
      [B, T, N, Hv] per-head outputs (before `o_proj`) in q's dtype.
    """
    w_uk_CNH, w_uv_CNH = split_kv_b(kv_b_CNX, qk_nope_head_dim)
    q_latent_BTNC = absorb_query(q_nope_BTNH, w_uk_CNH)
    latent_BNTC = absorbed_latent_attention(
        q_latent_BTNC, q_rope_BTNR, c_kv_BSC, k_rope_BSR, mask_BTS, scale=scale
    )
    return jnp.einsum("BNTC,CNH->BTNH", latent_BNTC, w_uv_CNH.astype(latent_BNTC.dtype))


def absorbed_latent_attention(
    q_latent_BTNC: jax.Array,
    q_rope_BTNR: jax.Array,
    c_kv_BSC: jax.Array,
    k_rope_BSR: jax.Array,
    mask_BTS: jax.Array | None,
    *,
    scale: float,
) -> jax.Array:
    """The MQA core of the absorbed form: latent outputs [B, N, T, C] in q_latent's dtype.

    The reference of the Pallas kernel `jaxmodels.kernels.mla_decode` (T == 1, prefix masks).
    """
    logits_BNTS = absorbed_logits(q_latent_BTNC, q_rope_BTNR, c_kv_BSC, k_rope_BSR, scale=scale)
    probs_BNTS = masked_softmax(logits_BNTS, mask_BTS)
    return jnp.einsum(  # (BNTC, not BTNC: XLA:CPU has no bf16 x bf16 -> f32 dot for that)
        "BNTS,BSC->BNTC",
        probs_BNTS.astype(c_kv_BSC.dtype),
        c_kv_BSC,
        preferred_element_type=jnp.float32,
    ).astype(q_latent_BTNC.dtype)


def absorbed_decode_attention(
    q_nope_BTNH: jax.Array,
    q_rope_BTNR: jax.Array,
    c_kv_BSC: jax.Array,
    k_rope_BSR: jax.Array,
    kv_b_CNX: jax.Array,
    lengths_B: jax.Array,
    *,
    scale: float,
    qk_nope_head_dim: int,
    implementation: str = "xla",
) -> jax.Array:
    """Absorbed attention of one new token per sequence (T == 1) over the cache slots
    `[0, lengths_B[b])` of each sequence: a decode step over the latent cache.

    implementation: "xla" is `absorbed_attention` with the prefix mask (the reference);
    "pallas" runs the Pallas TPU kernel `jaxmodels.kernels.mla_decode` (TPU only; under a mesh
    it runs in `shard_map`, split over batch and heads); "pallas_interpret" runs the same kernel
    in Pallas interpret mode, on any backend (tests, debugging; slow); "auto" is "pallas" where
    the program is lowered for TPU and "xla" elsewhere (`jax.lax.platform_dependent`).

    Returns:
      [B, 1, N, Hv] per-head outputs (before `o_proj`) in q's dtype.
    """
    B, T, _, _ = q_nope_BTNH.shape
    if T != 1:
        raise ValueError(f"absorbed_decode_attention takes one query token (T == 1), got T={T}")
    if implementation == "xla":
        mask_BTS = (jnp.arange(c_kv_BSC.shape[1])[None, :] < lengths_B[:, None])[:, None, :]
        return absorbed_attention(
            q_nope_BTNH,
            q_rope_BTNR,
            c_kv_BSC,
            k_rope_BSR,
            kv_b_CNX,
            mask_BTS,
            scale=scale,
            qk_nope_head_dim=qk_nope_head_dim,
        )
    if implementation not in DECODE_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r}: expected one of {DECODE_IMPLEMENTATIONS}"
        )
    if implementation == "auto":
        run = functools.partial(
            absorbed_decode_attention, scale=scale, qk_nope_head_dim=qk_nope_head_dim
        )
        return jax.lax.platform_dependent(
            q_nope_BTNH,
            q_rope_BTNR,
            c_kv_BSC,
            k_rope_BSR,
            kv_b_CNX,
            lengths_B,
            tpu=functools.partial(run, implementation="pallas"),
            default=functools.partial(run, implementation="xla"),
        )
    from jaxmodels.kernels.mla_decode import mla_decode_on_mesh  # Pallas: only when used

    w_uk_CNH, w_uv_CNH = split_kv_b(kv_b_CNX, qk_nope_head_dim)
    q_latent_BNC = absorb_query(q_nope_BTNH, w_uk_CNH)[:, 0]
    latent_BNC = mla_decode_on_mesh(
        q_latent_BNC,
        q_rope_BTNR[:, 0],
        c_kv_BSC,
        k_rope_BSR,
        lengths_B,
        scale=scale,
        interpret=implementation == "pallas_interpret",
    )
    return jnp.einsum("BNC,CNH->BNH", latent_BNC, w_uv_CNH.astype(latent_BNC.dtype))[:, None]


def absorbed_max_logits(
    q_nope_BTNH: jax.Array,
    q_rope_BTNR: jax.Array,
    c_kv_BSC: jax.Array,
    k_rope_BSR: jax.Array,
    kv_b_CNX: jax.Array,
    mask_BTS: jax.Array,
    *,
    scale: float,
    qk_nope_head_dim: int,
) -> jax.Array:
    """Per-head max of the visible logits [N] float32, computed in the absorbed form."""
    w_uk_CNH, _ = split_kv_b(kv_b_CNX, qk_nope_head_dim)
    logits_BNTS = absorbed_logits(
        absorb_query(q_nope_BTNH, w_uk_CNH), q_rope_BTNR, c_kv_BSC, k_rope_BSR, scale=scale
    )
    masked = jnp.where(mask_BTS[:, None], logits_BNTS, -jnp.inf)
    return jnp.max(masked, axis=(0, 2, 3))
