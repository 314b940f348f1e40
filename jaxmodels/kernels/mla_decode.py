"""MLA absorbed decode over the latent cache: a Pallas TPU (Mosaic) flash-decoding kernel.

The fast form of `jaxmodels.ops.mla.absorbed_latent_attention` for one new query token per
sequence whose visible cache slots are a prefix `[0, lengths[b])` (what a decode step sees),
selected by `implementation="pallas"` of `jaxmodels.ops.mla.absorbed_decode_attention` or by
`MLAConfig.decode_implementation`. The math (DeepSeek-V2 §2.1.3 / App. C, and the
`attn_impl="absorb"` branch of deepseek-ai/DeepSeek-V3 `inference/model.py`):

    logits[n, s] = scale * (q_latent[n] · c_kv[s] + q_rope[n] · k_rope[s]),   s < length
    out[n]       = Σ_s softmax_s(logits[n, :]) c_kv[s]                        (latent output)

Shapes (B batch, N heads, S cache slots, C latent rank, R rope dim):

    q_latent [B, N, C]  (the absorbed query W_UK q_nope)    q_rope [B, N, R]
    c_kv     [B, S, C]  (the latent cache)                   k_rope [B, S, R]
    lengths  [B] int32  (visible prefix per sequence)        -> out [B, N, C] in q's dtype

The latent is shared by all heads (MQA with one kv head of key dim C + R and value dim C), so
each grid step is two MXU matmuls with all N heads as rows: [N, C] x [C, bS] (+ [N, R] x
[R, bS]) for the logits and [N, bS] x [bS, C] for the output.

Grid `(B, ceil(S / bS))`, batch "parallel" (split over TensorCores), cache blocks "arbitrary"
(sequential, carrying fp32 running max m [N, 1], sum l [N, 1] and accumulator acc [N, C] in
VMEM scratch: the online softmax of FlashAttention / flash-decoding). The lengths are
scalar-prefetched into SMEM: blocks that start at or after `lengths[b]` skip their compute, and
their index map repeats the last valid block so that the pipeline issues no DMA for them (a
step reads `ceil(lengths[b] / bS)` blocks, not S / bS). Slots at or after `lengths[b]` inside the
last block are masked (logits to a large negative, latent rows to zero), so the uninitialised
tail of the cache and the out-of-bounds padding of a partial last block never reach the output.
A sequence with length 0 gets zeros (as `masked_softmax` gives for a fully masked row).

Numerics: logits, softmax statistics and the accumulator are fp32; the probabilities are cast
to the cache dtype for the second matmul (as the reference casts its probabilities), so in
fp32 the kernel matches the reference to float rounding and in bf16 to bf16 rounding.

The rope keys enter the kernel as [B, R, S] (blocks [R, bS]): XLA's TPU layout of a [B, S, R]
array with R < 128 keeps S minor, so the transpose in `mla_decode` is a free bitcast, where
[B, S, R] blocks made XLA copy the whole rope cache before every call.

Block size `bS` (`block_s`, default 512): a multiple of 128 (the lane width: bS is the lane
dim of the [N, bS] logits), or the whole S when S <= block_s. VMEM per grid step, with e the
cache item size and C', R' padded to 128 lanes (`vmem_bytes`), double-buffered inputs and
output, fp32 scratch and about three [N, bS] fp32 temporaries:

    2 e (N C' + N R' + bS C' + R bS + N C')  +  4 (N C' + 2 N 128)  +  3 x 4 N bS

DeepSeek-V3 dims (N=128, C=512, R=64, bf16, bS=512): 2.81 MiB estimated, 2.70 MiB reserved by
Mosaic when compiled for v5p; N=32 (128 heads over tensor=4): 1.55 / 1.68 MiB. Both are well
inside the 16 MiB default scoped VMEM of v5e/v5p (32 MiB on v6e).

Work per sequence and visible slot: 2 N (2C + R) FLOPs and (C + R) e bytes of cache read, so
arithmetic intensity 2 N (2C + R) / ((C + R) e) FLOP/byte: 1.89 N in bf16, 242 at N=128 (above
v5p's ridge of 459e12 / 2.76e12 = 166 FLOP/byte: compute-bound), 60 at N=32 (HBM-bound).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

DEFAULT_BLOCK_S = 512
LANES = 128
# A finite "minus infinity": exp(MASK_VALUE - m) == 0 for any finite running max m, and no
# inf - inf NaN can arise (as in jax.experimental.pallas.ops.tpu.flash_attention).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _kernel(
    lengths_ref,  # SMEM [B] int32 (scalar prefetch)
    q_latent_ref,  # [N, C]
    q_rope_ref,  # [N, R]
    c_kv_ref,  # [bS, C]
    k_rope_ref,  # [R, bS] (transposed: see `mla_decode`)
    out_ref,  # [N, C]
    m_ref,  # VMEM [N, 1] f32 running max
    l_ref,  # VMEM [N, 1] f32 running sum
    acc_ref,  # VMEM [N, C] f32 running latent output
    *,
    scale: float,
    block_s: int,
):
    b, j = pl.program_id(0), pl.program_id(1)
    length = lengths_ref[b]
    start = j * block_s

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(start < length)
    def _block():
        nt = (((1,), (1,)), ((), ()))  # contract the last dims: [N, C] x [bS, C] -> [N, bS]
        c_kv_SC = c_kv_ref[...]
        logits_NS = jax.lax.dot_general(
            q_latent_ref[...], c_kv_SC, nt, preferred_element_type=jnp.float32
        )
        logits_NS += jnp.dot(q_rope_ref[...], k_rope_ref[...], preferred_element_type=jnp.float32)
        logits_NS = logits_NS * scale
        slot_NS = start + jax.lax.broadcasted_iota(jnp.int32, logits_NS.shape, 1)
        logits_NS = jnp.where(slot_NS < length, logits_NS, MASK_VALUE)

        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(logits_NS, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)  # 0 at the first block (m_prev = -inf)
        p_NS = jnp.exp(logits_NS - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p_NS, axis=1, keepdims=True)
        # Zero the latent rows past the length: p is 0 there, but 0 * NaN garbage is NaN.
        slot_S1 = start + jax.lax.broadcasted_iota(jnp.int32, (c_kv_SC.shape[0], 1), 0)
        c_kv_SC = jnp.where(slot_S1 < length, c_kv_SC, jnp.zeros_like(c_kv_SC))
        pv_NC = jnp.dot(p_NS.astype(c_kv_SC.dtype), c_kv_SC, preferred_element_type=jnp.float32)
        acc_ref[...] = alpha * acc_ref[...] + pv_NC
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        denom = l_ref[...]
        out_ref[...] = (acc_ref[...] / jnp.where(denom == 0.0, 1.0, denom)).astype(out_ref.dtype)


def _lane_pad(n: int) -> int:
    return -(-n // LANES) * LANES


def vmem_bytes(num_heads: int, latent: int, rope: int, block_s: int, dtype) -> int:
    """Estimated VMEM of one grid step (see the module docstring): double-buffered q, cache
    blocks and output, fp32 scratch, and about three [N, bS] fp32 temporaries."""
    e = jnp.dtype(dtype).itemsize
    N, C, R = num_heads, _lane_pad(latent), _lane_pad(rope)
    buffers = 2 * e * (N * C + N * R + block_s * C + rope * _lane_pad(block_s) + N * C)
    scratch = 4 * (N * C + 2 * N * LANES)
    return buffers + scratch + 3 * 4 * N * _lane_pad(block_s)


def cost(batch: int, num_heads: int, slots: int, latent: int, rope: int, dtype) -> pl.CostEstimate:
    """FLOPs, exps and HBM bytes of one call that reads all `slots` cache entries (the bound
    for any lengths; a step reads only ceil(length / bS) blocks)."""
    e = jnp.dtype(dtype).itemsize
    N, S, C, R = num_heads, slots, latent, rope
    return pl.CostEstimate(
        flops=2 * batch * N * S * (2 * C + R),
        transcendentals=batch * N * S,
        bytes_accessed=e * batch * (S * (C + R) + N * (2 * C + R)),
    )


def _block_size(slots: int, block_s: int) -> int:
    if block_s <= 0 or block_s % LANES:
        raise ValueError(f"block_s={block_s} must be a positive multiple of {LANES}")
    return slots if slots <= block_s else block_s


@functools.partial(jax.jit, static_argnames=("scale", "block_s", "interpret"))
def mla_decode(
    q_latent_BNC: jax.Array,
    q_rope_BNR: jax.Array,
    c_kv_BSC: jax.Array,
    k_rope_BSR: jax.Array,
    lengths_B: jax.Array,
    *,
    scale: float,
    block_s: int = DEFAULT_BLOCK_S,
    interpret: bool = False,
) -> jax.Array:
    """Latent output [B, N, C] (q's dtype) of absorbed MLA decode over cache prefixes.

    Args:
      q_latent_BNC: absorbed queries W_UK q_nope of the one new token per sequence.
      q_rope_BNR: its rotated rope queries.
      c_kv_BSC, k_rope_BSR: the latent cache (normed latents, rotated shared rope keys).
      lengths_B: int32 number of visible slots per sequence (clipped to [0, S]).
      scale: softmax scale (`mla_softmax_scale`).
      block_s: cache slots per grid step (multiple of 128; the whole S if S <= block_s).
      interpret: run the kernel in Pallas interpret mode (any backend; for tests and CPUs).
    """
    B, N, C = q_latent_BNC.shape
    S, R = c_kv_BSC.shape[1], k_rope_BSR.shape[-1]
    if q_rope_BNR.shape != (B, N, R) or c_kv_BSC.shape != (B, S, C):
        raise ValueError(
            f"mla_decode shapes: q_latent {q_latent_BNC.shape} [B, N, C], q_rope "
            f"{q_rope_BNR.shape} [B, N, R], c_kv {c_kv_BSC.shape} [B, S, C], k_rope "
            f"{k_rope_BSR.shape} [B, S, R] do not agree"
        )
    bs = _block_size(S, block_s)
    lengths_B = jnp.clip(lengths_B.astype(jnp.int32), 0, S)
    # The kernel reads k_rope as [B, R, S]: XLA's TPU layout of a [B, S, R] array with R < 128
    # (R = 64 in every published MLA) already keeps S minor, so this transpose is a free bitcast
    # (in [B, S, R] order the call would copy the whole rope cache every step).
    k_rope_BRS = jnp.swapaxes(k_rope_BSR, 1, 2)

    def q_map(b, j, lengths_ref):
        return b, 0, 0

    def kv_block(b, j, lengths_ref):  # past the last valid block: repeat it (no new DMA)
        # lax.div, not //: lengths are >= 0, and jnp's floor division lowers through `sign`,
        # whose Mosaic rule asks the default backend for its TPU generation (fails under AOT).
        last = jnp.maximum(jax.lax.div(lengths_ref[b] + (bs - 1), bs) - 1, 0)
        return jnp.minimum(j, last)

    def c_kv_map(b, j, lengths_ref):  # [B, S, C]
        return b, kv_block(b, j, lengths_ref), 0

    def k_rope_map(b, j, lengths_ref):  # [B, R, S]
        return b, 0, kv_block(b, j, lengths_ref)

    squeezed = pl.Squeezed()
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(B, math.ceil(S / bs)),
        in_specs=[
            pl.BlockSpec((squeezed, N, C), q_map),
            pl.BlockSpec((squeezed, N, R), q_map),
            pl.BlockSpec((squeezed, bs, C), c_kv_map),
            pl.BlockSpec((squeezed, R, bs), k_rope_map),
        ],
        out_specs=pl.BlockSpec((squeezed, N, C), q_map),
        scratch_shapes=[
            pltpu.VMEM((N, 1), jnp.float32),
            pltpu.VMEM((N, 1), jnp.float32),
            pltpu.VMEM((N, C), jnp.float32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_kernel, scale=float(scale), block_s=bs),
        out_shape=jax.ShapeDtypeStruct((B, N, C), q_latent_BNC.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=cost(B, N, S, C, R, c_kv_BSC.dtype),
        interpret=interpret,
        name="mla_decode",
    )(lengths_B, q_latent_BNC, q_rope_BNR, c_kv_BSC, k_rope_BRS)


def mla_decode_on_mesh(
    q_latent_BNC: jax.Array,
    q_rope_BNR: jax.Array,
    c_kv_BSC: jax.Array,
    k_rope_BSR: jax.Array,
    lengths_B: jax.Array,
    **kwargs,
) -> jax.Array:
    """`mla_decode` under the mesh set by `jax.set_mesh`, if any (else a plain call).

    XLA cannot partition a Mosaic kernel by itself, so under a mesh the call runs in
    `jax.shard_map`: batch split as the logical axis "batch" and heads as "act_heads" of the
    current rules (`sharding.rules`), the cache split on its batch only (a cache sharded on its
    length is gathered: this kernel does not combine partial softmaxes across devices). A
    dimension that its mesh axes do not divide stays replicated.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return mla_decode(q_latent_BNC, q_rope_BNR, c_kv_BSC, k_rope_BSR, lengths_B, **kwargs)
    from sharding.rules import logical_to_spec  # the project's rules table

    B, N, _ = q_latent_BNC.shape
    batch, heads = logical_to_spec(("batch", "act_heads"), mesh=mesh, shape=(B, N), strict=False)
    P = jax.sharding.PartitionSpec
    q_spec, cache_spec = P(batch, heads, None), P(batch, None, None)
    return jax.shard_map(
        functools.partial(mla_decode, **kwargs),
        mesh=mesh,
        in_specs=(q_spec, q_spec, cache_spec, cache_spec, P(batch)),
        out_specs=q_spec,
        check_vma=False,
    )(q_latent_BNC, q_rope_BNR, c_kv_BSC, k_rope_BSR, lengths_B)
