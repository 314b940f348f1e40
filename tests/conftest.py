"""Test set-up: eight fake CPU devices, created before JAX starts its backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# pytest-xdist runs two test processes (pyproject addopts); both may load libtpu for the AOT
# compile tests, which libtpu refuses by default.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
