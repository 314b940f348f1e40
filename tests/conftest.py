"""Test set-up: eight fake CPU devices, created before JAX starts its backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# pytest-xdist runs two test processes (pyproject addopts); both may load libtpu for the AOT
# compile tests, which libtpu refuses by default.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# The suite's shapes are tiny, so compiling dominates it: LLVM without optimisation passes
# compiles ~40 % faster (a V4 train step: 14.6 s -> 8.8 s), which cut the suite from 1004 s
# to 644 s on 2 cores. XLA's own HLO passes (fusion, layout) are unchanged. Subprocesses (the
# main-job tests, the notebook) inherit it. Set the flag in XLA_FLAGS to override.
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
