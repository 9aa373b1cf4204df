"""Multi-host setup through `jax.distributed` (TPU pods, GPU clusters, CPU processes).

Call `initialize(...)` once per process before anything touches devices. Every process then
sees the global mesh; `jax.process_index()` picks its slice of each batch (see llamax.data).
"""
from __future__ import annotations

import os
from typing import Mapping

import jax

ENV_PREFIX = "LLAMAX_"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
    """Starts jax.distributed. Returns True if it ran.

    With an address, process count and id (CPU/GPU clusters; e.g. Slurm launchers), connects to
    that coordinator. With `auto` and no address (TPU pods, or Slurm/Open MPI environments JAX
    recognizes), JAX discovers its peers. Without either, a single process: does nothing.
    """
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("coordinator_address needs num_processes and process_id too "
                             f"(or the {ENV_PREFIX}NUM_PROCESSES / {ENV_PREFIX}PROCESS_ID variables)")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=int(num_processes), process_id=int(process_id))
        return True
    if auto:
        jax.distributed.initialize()
        return True
    return False


def initialize_from_options(options: Mapping[str, str]) -> bool:
    """`initialize` from command-line options, falling back to LLAMAX_* environment variables:
    coordinator_address, num_processes, process_id, distributed (auto)."""
    def get(name: str) -> str | None:
        return options.get(name) or os.environ.get(ENV_PREFIX + name.upper())

    auto = (get("distributed") or "").lower() in ("1", "true", "yes")
    num_processes, process_id = get("num_processes"), get("process_id")
    return initialize(get("coordinator_address"),
                      None if num_processes is None else int(num_processes),
                      None if process_id is None else int(process_id), auto=auto)
