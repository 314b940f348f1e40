"""Meshes, logical-axis rules, sharded initialisation and jitted steps."""

from sharding.mesh import MESH_AXES, make_mesh, parse_mesh_spec, resolve_axis_sizes
from sharding.partition import (
    axes_tree_shardings,
    init_sharded,
    logical_axes,
    optimizer_state_shardings,
    tree_shardings,
)
from sharding.rules import (
    DEFAULT_RULES,
    constrain,
    current_rules,
    logical_to_spec,
    named_sharding,
    use_rules,
)
from sharding.step import sharded_jit

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "axes_tree_shardings",
    "constrain",
    "current_rules",
    "init_sharded",
    "logical_axes",
    "logical_to_spec",
    "make_mesh",
    "named_sharding",
    "optimizer_state_shardings",
    "parse_mesh_spec",
    "resolve_axis_sizes",
    "sharded_jit",
    "tree_shardings",
    "use_rules",
]
