"""Device meshes with the library's named axes.

Axes, outermost first: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimizer state sharded), `tensor` (heads / ffn / vocab split), `expert` (expert parallel).
"""

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills in one size of -1 ("the rest") and checks the product equals `num_devices`.

    Args:
      sizes: axis name -> size; names must be in MESH_AXES; absent axes have size 1.
      num_devices: devices the mesh must cover.
    """
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; allowed axes are {list(MESH_AXES)}")
    resolved = {name: int(sizes.get(name, 1)) for name in MESH_AXES}
    free = [name for name, size in resolved.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    bad = {name: size for name, size in resolved.items() if size == 0 or size < -1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive or -1, got {bad}")
    known = math.prod(size for size in resolved.values() if size != -1)
    if free:
        if num_devices % known:
            raise ValueError(
                f"mesh axes {resolved} cannot cover {num_devices} devices: "
                f"{num_devices} is not divisible by {known}"
            )
        resolved[free[0]] = num_devices // known
    if math.prod(resolved.values()) != num_devices:
        raise ValueError(
            f"mesh axes {resolved} multiply to {math.prod(resolved.values())}, "
            f"but there are {num_devices} devices"
        )
    return resolved


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """Parses "fsdp=-1,tensor=4" into {"fsdp": -1, "tensor": 4}."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"mesh spec part {part!r} is not of the form axis=size")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"mesh axis {name!r} has non-integer size {value!r}") from None
    return sizes


def make_mesh(
    sizes: Mapping[str, int] | str | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
    axis_type: jax.sharding.AxisType = jax.sharding.AxisType.Auto,
) -> jax.sharding.Mesh:
    """Builds a mesh over (data, fsdp, tensor, expert) with explicit axis types.

    Args:
      sizes: axis sizes (a mapping or "data=2,fsdp=-1" string); default: all devices on `data`.
      devices: devices to use (default all of `jax.devices()`).
      axis_type: the JAX axis type of every axis (Auto: the compiler propagates shardings from
        the constraints we place).
    """
    if isinstance(sizes, str):
        sizes = parse_mesh_spec(sizes)
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_axis_sizes(sizes or {"data": -1}, len(devices))
    shape = tuple(resolved[name] for name in MESH_AXES)
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(axis_type,) * len(MESH_AXES),
        devices=np.asarray(devices).reshape(-1).tolist(),
    )
