"""Jitted, sharded steps: `jax.jit` with in/out shardings and donation, traced under the mesh
and the logical rules so that activation constraints resolve."""

from collections.abc import Callable, Sequence
from typing import Any

import jax

from sharding.rules import Rules, current_rules, use_rules


def sharded_jit(
    fn: Callable[..., Any],
    *,
    mesh: jax.sharding.Mesh,
    in_shardings: Any,
    out_shardings: Any,
    donate_argnums: int | Sequence[int] = (),
    rules: Rules | None = None,
    static_argnums: int | Sequence[int] = (),
) -> Callable[..., Any]:
    """`jax.jit(fn, in_shardings=..., out_shardings=..., donate_argnums=...)` whose calls run under
    `jax.set_mesh(mesh)` and `use_rules(rules)` (tracing sees both).

    The returned callable exposes the jitted function as `.jitted` (for `.lower()` / AOT).
    """
    rules = current_rules() if rules is None else rules
    jitted = jax.jit(
        fn,
        in_shardings=in_shardings,
        out_shardings=out_shardings,
        donate_argnums=donate_argnums,
        static_argnums=static_argnums,
    )

    def call(*args, **kwargs):
        with jax.set_mesh(mesh), use_rules(rules):
            return jitted(*args, **kwargs)

    call.jitted = jitted
    call.mesh = mesh
    call.rules = rules
    return call
