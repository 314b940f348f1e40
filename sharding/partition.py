"""Parameters born sharded: abstract init -> shardings from logical names -> jitted init.

Linen parameters carry logical axis names through `nn.with_logical_partitioning`; `nn.scan`
prepends `layers`. This module turns those names into `NamedSharding`s with the rules table of
`sharding.rules` and runs the initialiser once under `jax.jit(out_shardings=...)`, so no full
replica of the parameters ever exists on one device.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from sharding.rules import Rules, current_rules, logical_to_spec, use_rules


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def logical_axes(boxed_tree: Any) -> Any:
    """Tree of logical-axis tuples (None entries for unnamed dims) for a boxed variable tree."""

    def axes(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned | nn.Partitioned):
            return tuple(leaf.names)
        return (None,) * len(getattr(leaf, "shape", ()))

    return jax.tree.map(axes, boxed_tree, is_leaf=_is_box)


def tree_shardings(boxed_tree: Any, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> Any:
    """`NamedSharding` for every leaf of a boxed (abstract) variable tree, unboxed structure."""
    rules = current_rules() if rules is None else rules

    def sharding(leaf):
        value = leaf.value if _is_box(leaf) else leaf
        names = tuple(leaf.names) if _is_box(leaf) else (None,) * len(value.shape)
        return NamedSharding(mesh, logical_to_spec(names, rules, mesh=mesh, shape=value.shape))

    return jax.tree.map(sharding, boxed_tree, is_leaf=_is_box)


def axes_tree_shardings(
    axes_tree: Any, shapes_tree: Any, mesh: jax.sharding.Mesh, rules: Rules | None = None
) -> Any:
    """Shardings from a tree of logical-axis tuples and a matching tree of arrays/shapes."""
    rules = current_rules() if rules is None else rules

    def is_axes(x):
        return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)

    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, rules, mesh=mesh, shape=x.shape)),
        axes_tree,
        shapes_tree,
        is_leaf=is_axes,
    )


def init_sharded(
    init_fn: Callable[..., Any], *args, mesh: jax.sharding.Mesh, rules: Rules | None = None
) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` (returning boxed variables) with its outputs born sharded.

    Returns:
      (variables, shardings): unboxed variables placed per the rules, and their shardings.
    """
    rules = current_rules() if rules is None else rules
    with use_rules(rules), jax.set_mesh(mesh):
        abstract = jax.eval_shape(init_fn, *args)
        shardings = tree_shardings(abstract, mesh, rules)
        variables = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return variables, shardings


def optimizer_state_shardings(
    optimizer: optax.GradientTransformation,
    params: Any,
    param_shardings: Any,
    mesh: jax.sharding.Mesh,
) -> Any:
    """Shardings of `optimizer.init(params)`: per-parameter leaves follow their parameter's
    sharding (optax.tree_map_params), everything else (counts, scalars) is replicated.

    Optimizers that route parameters (`optax.partition`, e.g. Muon + AdamW) hold params-shaped
    states with `optax.MaskedNode` (an empty node) where a parameter belongs to the other
    group; those stay MaskedNode."""
    abstract_state = jax.eval_shape(optimizer.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        optimizer,
        lambda value, sharding: value if isinstance(value, optax.MaskedNode) else sharding,
        abstract_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding | optax.MaskedNode),
    )
