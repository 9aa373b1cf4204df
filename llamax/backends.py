"""Which JAX backends a process uses on a host without accelerators.

With libtpu installed (the `tpu` extra, e.g. for `experiments.compile`; `test` and `all` include
it) JAX loads it at the first device query of every process, even on a host without TPU chips:
it finds none and falls back to the CPU, having spent ~0.1 to 0.4 s and printed half a dozen
libtpu warnings on stderr (benchmarks/jax_startup.py). The CLIs call
`use_cpu_without_accelerators` when the `experiments` package is imported; the library never
changes JAX's platforms by itself.
"""
from __future__ import annotations

import importlib.util

import jax

GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def use_cpu_without_accelerators() -> bool:
    """Makes the CPU JAX's only backend when nothing else could work here. Returns True if it did.

    It acts only when the user chose no platforms (JAX_PLATFORMS), libtpu is installed, this
    host has no TPU chip and no GPU plugin is installed, i.e. when the CPU is what JAX would end
    up with anyway. Compile-only TPU devices (`llamax.aot`) still work after it. Call before the
    first device query.
    """
    from jax._src import hardware_utils, xla_bridge  # private: the checks JAX itself makes

    if (jax.config.jax_platforms is not None or xla_bridge.backends_are_initialized()
            or importlib.util.find_spec("libtpu") is None
            or any(importlib.util.find_spec(plugin) for plugin in GPU_PLUGINS)
            or hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0):
        return False
    jax.config.update("jax_platforms", "cpu")
    return True
