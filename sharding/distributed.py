"""Multi-host start-up for TPU pods and GPU clusters.

On a pod every host runs the same command; `initialize()` must run before anything touches the
devices (even `jax.process_count()` starts the backend). On Cloud TPU,
`jax.distributed.initialize()` discovers the coordinator from the TPU metadata; elsewhere pass
the coordinator address, the number of processes and this process's id (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
`python -m experiments.train --distributed ...` calls this first.
"""

import jax


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Calls `jax.distributed.initialize` (arguments default to auto-detection)."""
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
