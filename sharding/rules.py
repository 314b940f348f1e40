"""Logical axis names -> mesh axes: one rules table, first match wins, collisions refused.

Every parameter and activation carries logical axis names (`embed`, `heads`, `batch`, ...). A
rules table maps each name to a mesh axis, a tuple of mesh axes, or None (replicated). The first
rule naming a logical axis wins. Two logical axes of one tensor resolving to the same mesh axis,
or a dimension not divisible by the product of its mesh axes, raise a ValueError that names the
tensor's axes and shape.
"""

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Parameters: embed over fsdp (ZeRO-3 style), per-head / ffn / vocab dims over tensor.
# Activations use `act_*` names so that e.g. the model dim of activations stays unsharded while
# the model dim of weights is fsdp-sharded.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_heads", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("head_dim", None),
    ("q_lora", None),
    ("kv_lora", None),
    ("layers", None),
    ("streams", None),
    ("norm", None),
)

_CURRENT_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar(
    "jaxmodels_logical_rules", default=DEFAULT_RULES
)


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
    """Makes `rules` the table used by `constrain` while tracing inside the block."""
    token = _CURRENT_RULES.set(tuple(rules))
    try:
        yield
    finally:
        _CURRENT_RULES.reset(token)


def current_rules() -> Rules:
    return _CURRENT_RULES.get()


def _lookup(name: str | None, rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    return ()  # unnamed in the table: replicated


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Rules | None = None,
    *,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    shape: Sequence[int] | None = None,
    strict: bool = True,
) -> PartitionSpec:
    """PartitionSpec for a tensor with the given logical axes.

    Mesh axes of size 1 (or absent from `mesh`) are dropped. With `shape`, each dimension must be
    divisible by the product of its mesh axes; with `strict=False` a dimension that is not stays
    replicated instead (activations such as a batch of 1 at generation time).
    """
    rules = current_rules() if rules is None else rules
    sizes = dict(mesh.shape) if mesh is not None else None
    used: dict[str, str] = {}
    spec: list[MeshAxes] = []
    for dim, name in enumerate(logical_axes):
        axes = _lookup(name, rules)
        if sizes is not None:
            axes = tuple(a for a in axes if sizes.get(a, 1) > 1)
        if shape is not None and sizes is not None and not strict:
            parts = 1
            for axis in axes:
                parts *= sizes[axis]
            if shape[dim] % parts:
                spec.append(None)
                continue
        for axis in axes:
            if axis in used:
                raise ValueError(
                    f"logical axes {tuple(logical_axes)}: {used[axis]!r} and {name!r} both map "
                    f"to mesh axis {axis!r}; change the rules so each mesh axis is used once"
                )
            used[axis] = name
        if shape is not None and sizes is not None and axes:
            parts = 1
            for axis in axes:
                parts *= sizes[axis]
            if shape[dim] % parts:
                raise ValueError(
                    f"tensor of shape {tuple(shape)} with logical axes {tuple(logical_axes)}: "
                    f"dimension {dim} ({name!r}, size {shape[dim]}) is not divisible by mesh "
                    f"axes {axes} of total size {parts}"
                )
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def named_sharding(
    logical_axes: Sequence[str | None],
    mesh: jax.sharding.Mesh,
    rules: Rules | None = None,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh=mesh, shape=shape))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation from its logical axes; a no-op without a mesh.

    The mesh is the one set by `jax.set_mesh`; the rules those of the enclosing `use_rules`.
    A dimension not divisible by its mesh axes stays replicated (sharding never changes values).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, mesh=mesh, shape=x.shape, strict=False)
    return jax.lax.with_sharding_constraint(x, spec)
