"""QK-Clip (the "Clip" of MuonClip, Kimi K2 arXiv 2507.20534; Su Jianlin's blog 11126).

After the optimizer step, for every attention layer and head h whose max logit S_h over the
batch (the logits that enter the softmax, scale included) exceeds τ, set γ_h = τ / S_h and
rescale that head's query and key weights so every logit of the head scales by exactly γ_h:

* MHA / GQA: W_q^h ← sqrt(γ)·W_q^h and W_k^h ← sqrt(γ)·W_k^h. A kv head serves a group of
  query heads and uses the group's smallest γ (Megatron-LM `clip_qk`); by default the query
  heads of the group use the group γ too, so the group max lands on τ.
* MLA: the no-RoPE query and key parts by sqrt(γ), the RoPE query part by γ, and the shared
  RoPE key (in ``kv_a_proj_with_mqa``) is left alone because other heads use it.

Heads with S_h <= τ (and NaN S_h) are left bit-identical. The transformation is chained after
the optimizer and rewrites the updates so that ``params + updates == clip(params + update)``:

    tx = optax.chain(optimizers.muon(lr), optimizers.qk_clip(targets, threshold=100.0))
    updates, opt_state = tx.update(grads, opt_state, params, max_logits=max_logits)
    params = optax.apply_updates(params, updates)

`max_logits` is a dict {module path (tuple of str): [N] array, or [L, N] for a scanned stack
(leading layer axis)} produced by the forward pass with the pre-update weights (so τ bounds the
next step only approximately, as in K2). A model can `sow` its per-head max logits; use
`collect_max_logits` to turn Flax's ``intermediates`` collection into this dict. Under data
parallelism compute the max over the global batch (jnp.max of a sharded array already is).
The library's train step does this: `jaxmodels.training.make_train_step(...,
track_max_logits=True)` collects the ``attn_stats`` its attention layers sow and passes them
keyed by the modules' parameter paths (``("params", ...)``, `collect_max_logits`' default).

The spec is plain data: for each attention module (its parameter path prefix) a list of
`QKClipTarget`s; `mha_targets` and `mla_targets` build the usual ones.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optimizers.labels import format_path, path_names

ModulePath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class QKClipTarget:
    """One weight slice that QK-Clip rescales per head.

    Attributes:
      leaf: path of the leaf relative to the attention module, e.g. ("q_proj", "kernel").
      head_axis: axis of the per-layer leaf (no stacked axis) that indexes heads.
      last_axis_slice: only this slice of the last axis is rescaled (MLA nope / rope parts);
        None rescales the whole head.
      power: the head's factor is γ**power (0.5: sqrt(γ) on q and k; 1.0: γ on q_rope).
      group_size: query heads per head of this leaf. γ of a group is the min over its query
        heads; a leaf with N heads (queries) gets its group's γ repeated, a leaf with N /
        group_size heads (kv) gets one γ per group.
    """

    leaf: tuple[str, ...]
    head_axis: int
    last_axis_slice: slice | None = None
    power: float = 0.5
    group_size: int = 1


def mha_targets(
    num_heads: int,
    num_kv_heads: int | None = None,
    *,
    q_name: str = "q_proj",
    k_name: str = "k_proj",
    leaf_name: str = "kernel",
) -> list[QKClipTarget]:
    """Targets for MHA/GQA with q kernel [D, N, H] and k kernel [D, K, H] (sqrt(γ) each)."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    group = num_heads // num_kv_heads
    return [
        QKClipTarget((q_name, leaf_name), head_axis=1, power=0.5, group_size=group),
        QKClipTarget((k_name, leaf_name), head_axis=1, power=0.5, group_size=group),
    ]


def mla_targets(
    qk_nope_head_dim: int, qk_rope_head_dim: int, has_q_lora: bool = True
) -> list[QKClipTarget]:
    """Targets for MLA (DeepSeek-V2/V3, Kimi K2).

    Query kernel ``q_b_proj`` [C_q, N, H_nope+R] (or ``q_proj`` [D, N, H_nope+R] without
    q-LoRA): nope part by sqrt(γ), rope part by γ. ``kv_b_proj`` [C, N, H_nope+H_v]: the
    k_nope part by sqrt(γ), values untouched. The shared rope key is never touched.
    """
    q = "q_b_proj" if has_q_lora else "q_proj"
    nope = slice(0, qk_nope_head_dim)
    rope = slice(qk_nope_head_dim, qk_nope_head_dim + qk_rope_head_dim)
    return [
        QKClipTarget((q, "kernel"), head_axis=1, last_axis_slice=nope, power=0.5),
        QKClipTarget((q, "kernel"), head_axis=1, last_axis_slice=rope, power=1.0),
        QKClipTarget(("kv_b_proj", "kernel"), head_axis=1, last_axis_slice=nope, power=0.5),
    ]


class QKClipState(NamedTuple):
    """Number of (layer, head) pairs clipped by the last update (int32 []), for logging."""

    clipped: jax.Array


def clip_factors(max_logits: jax.Array, threshold: Any) -> jax.Array:
    """γ = τ / S where S > τ, else exactly 1 (NaN S gives 1)."""
    s = jnp.asarray(max_logits, jnp.float32)
    return jnp.where(s > threshold, threshold / jnp.where(s > threshold, s, 1.0), 1.0)


def _head_factors(gamma: jax.Array, target: QKClipTarget, num_leaf_heads: int) -> jax.Array:
    """[..., N] query-head γ -> [..., num_leaf_heads] factors γ**power."""
    n = gamma.shape[-1]
    g = target.group_size
    if n % g:
        raise ValueError(f"{target}: {n} query heads are not a multiple of group_size {g}")
    if g > 1:
        gamma = jnp.min(gamma.reshape(*gamma.shape[:-1], n // g, g), axis=-1)
        if num_leaf_heads == n:
            gamma = jnp.repeat(gamma, g, axis=-1)
    if gamma.shape[-1] != num_leaf_heads:
        raise ValueError(
            f"{target}: leaf has {num_leaf_heads} heads on axis {target.head_axis}, expected "
            f"{n} (query heads) or {n // g} (groups of {g})"
        )
    return gamma**target.power


def _leaf_factor(
    gamma: jax.Array, target: QKClipTarget, shape: tuple[int, ...], name: str
) -> jax.Array:
    """Broadcastable factor array for one target on a leaf of `shape`."""
    stacked = gamma.ndim - 1  # leading layer axes
    per_layer_ndim = len(shape) - stacked
    if per_layer_ndim < 1 or not -per_layer_ndim <= target.head_axis < per_layer_ndim:
        raise ValueError(f"QK-Clip: head_axis {target.head_axis} does not fit {name} {shape}")
    if stacked and tuple(shape[:stacked]) != tuple(gamma.shape[:-1]):
        raise ValueError(
            f"QK-Clip: max_logits of shape {gamma.shape} do not match the stacked axes of "
            f"{name} {shape}"
        )
    axis = stacked + target.head_axis % per_layer_ndim
    factors = _head_factors(gamma, target, shape[axis])  # [*stack, heads]
    bshape = [1] * len(shape)
    for i in range(stacked):
        bshape[i] = shape[i]
    bshape[axis] = shape[axis]
    factors = factors.reshape(bshape)
    if target.last_axis_slice is None:
        return factors
    if axis == len(shape) - 1:
        raise ValueError(f"QK-Clip: {name}: last_axis_slice needs the head axis not to be last")
    in_slice = jnp.zeros(shape[-1], bool).at[target.last_axis_slice].set(True)
    return jnp.where(in_slice, factors, 1.0)


def qk_clip(
    targets: Mapping[ModulePath, Sequence[QKClipTarget]], threshold: float = 100.0
) -> optax.GradientTransformationExtraArgs:
    """QK-Clip chained after an optimizer; reads ``max_logits=`` from the update's extra args.

    Args:
      targets: {attention module path (tuple of str, e.g. ("params", "layers", "attn")):
        [QKClipTarget, ...]}.
      threshold: τ (100 in Kimi K2).

    Returns:
      A GradientTransformationExtraArgs whose update is
      ``update(updates, state, params, *, max_logits)``; it raises if `params` or
      `max_logits` is missing, or a module of `targets` has no entry in `max_logits`.
    """
    targets = {tuple(k): list(v) for k, v in targets.items()}

    def init_fn(params):
        del params
        return QKClipState(clipped=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, max_logits=None, **extra_args):
        del state, extra_args
        if params is None:
            raise ValueError("qk_clip needs params: call update(updates, state, params, ...)")
        if max_logits is None:
            raise ValueError(
                "qk_clip needs the per-head max attention logits: call "
                "update(grads, state, params, max_logits={module_path: [N] or [L, N]})"
            )
        max_logits = {tuple(k): v for k, v in max_logits.items()}
        flat_u, treedef = jax.tree_util.tree_flatten_with_path(updates)
        index = {path_names(p): i for i, (p, _) in enumerate(flat_u)}
        p_leaves = treedef.flatten_up_to(params)
        factors: dict[int, jax.Array] = {}
        clipped = jnp.zeros([], jnp.int32)
        for module, module_targets in targets.items():
            if module not in max_logits:
                raise KeyError(
                    f"qk_clip: no max_logits for attention module {format_path(module)}; "
                    f"got {[format_path(k) for k in max_logits]}"
                )
            s = jnp.asarray(max_logits[module])
            gamma = clip_factors(s, threshold)
            clipped = clipped + jnp.sum(s > threshold).astype(jnp.int32)
            for target in module_targets:
                full = module + tuple(target.leaf)
                if full not in index:
                    raise KeyError(f"qk_clip: no parameter {format_path(full)} in the updates")
                i = index[full]
                f = _leaf_factor(gamma, target, tuple(flat_u[i][1].shape), format_path(full))
                factors[i] = f if i not in factors else factors[i] * f
        leaves = [u for _, u in flat_u]
        for i, f in factors.items():
            u, p = leaves[i], p_leaves[i]
            acc = jnp.promote_types(u.dtype, jnp.float32)
            new_p = (p.astype(acc) + u.astype(acc)) * f
            leaves[i] = jnp.where(f == 1.0, u, (new_p - p.astype(acc)).astype(u.dtype))
        return jax.tree.unflatten(treedef, leaves), QKClipState(clipped=clipped)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def collect_max_logits(
    intermediates: Any, name: str = "max_logits", prefix: ModulePath = ("params",)
) -> dict[ModulePath, jax.Array]:
    """{prefix + module path: max logits} from a nested dict of sown values.

    Flax's ``sow("intermediates", name, x)`` stores a tuple of values under the module's
    path; the entries of the tuple (one per call) are reduced with max. Works on any nested
    mapping; `prefix` ("params",) makes the keys match the parameter paths.
    """
    found: dict[ModulePath, jax.Array] = {}

    def walk(node, path):
        if isinstance(node, Mapping):
            for key, child in node.items():
                if key == name:
                    values = child if isinstance(child, tuple | list) else (child,)
                    found[tuple(prefix) + path] = jnp.max(jnp.stack(values), axis=0)
                else:
                    walk(child, path + (str(key),))

    walk(intermediates, ())
    return found
