"""Process setup before JAX touches devices: multi-host `jax.distributed` (TPU pods, GPU
clusters, CPU processes) and the choice of backends on hosts without accelerators.

Call `initialize(...)` once per process before anything touches devices. Every process then
sees the global mesh; `jax.process_index()` picks its slice of each batch (see llamax.data).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Mapping

import jax

ENV_PREFIX = "LLAMAX_"
GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def use_cpu_without_accelerators() -> bool:
    """Makes the CPU JAX's only backend when nothing else could work here. Returns True if it did.

    With libtpu installed (the `tpu` extra, e.g. for `experiments.compile`) JAX tries it on its
    first device query even on a host without TPU chips: about 0.1 s, and half a dozen libtpu
    warnings on stderr. This skips that when the user chose no platforms (JAX_PLATFORMS),
    this host has no TPU chip and no GPU plugin is installed, i.e. when the CPU is what JAX would
    end up with anyway. Call before the first device query.
    """
    from jax._src import hardware_utils, xla_bridge  # private: the checks JAX itself makes

    if (jax.config.jax_platforms is not None or xla_bridge.backends_are_initialized()
            or importlib.util.find_spec("libtpu") is None
            or any(importlib.util.find_spec(plugin) for plugin in GPU_PLUGINS)
            or hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0):
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


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
    coordinator_address, num_processes, process_id, distributed (auto). Before it, a host
    without accelerators gets the CPU as its only backend (`use_cpu_without_accelerators`)."""
    use_cpu_without_accelerators()
    def get(name: str) -> str | None:
        return options.get(name) or os.environ.get(ENV_PREFIX + name.upper())

    auto = (get("distributed") or "").lower() in ("1", "true", "yes")
    num_processes, process_id = get("num_processes"), get("process_id")
    return initialize(get("coordinator_address"),
                      None if num_processes is None else int(num_processes),
                      None if process_id is None else int(process_id), auto=auto)
