"""Which JAX backends a process uses on a host without accelerators, and how it keeps host memory.

With libtpu installed (the `tpu` extra, e.g. for `experiments.compile`; `test` and `all` include
it) JAX loads it at the first device query of every process, even on a host without TPU chips:
it finds none and falls back to the CPU, having spent ~0.1 to 0.4 s and printed half a dozen
libtpu warnings on stderr (benchmarks/jax_startup.py). The CLIs call
`use_cpu_without_accelerators` when the `experiments` package is imported; the library never
changes JAX's platforms by itself.
"""
from __future__ import annotations

import ctypes
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
    from jax._src import xla_bridge  # private: whether a device query has happened

    if (jax.config.jax_platforms is not None or xla_bridge.backends_are_initialized()
            or importlib.util.find_spec("libtpu") is None or not _no_accelerator()):
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


def _no_accelerator() -> bool:
    """No GPU plugin installed and no TPU chip on this host (JAX's own probe, no backend init)."""
    from jax._src import hardware_utils  # private: the check JAX itself makes

    return (not any(importlib.util.find_spec(plugin) for plugin in GPU_PLUGINS)
            and hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0)


def _cpu_is_the_backend() -> bool:
    """Whether this process's JAX will run on the CPU (asked without initializing a backend)."""
    platforms = jax.config.jax_platforms
    return platforms == "cpu" if platforms else _no_accelerator()


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def retain_freed_host_memory() -> bool:
    """Makes a CPU-only process keep the memory it frees for reuse (glibc). Returns True if set.

    XLA:CPU allocates a program's temporaries afresh at every run: a bench-preset train step
    (4 x 512 tokens) takes 1.6 GB of them. glibc serves allocations that large with mmap and
    unmaps them on free, so every step touches ~410,000 new pages, and the kernel spends ~1 s of
    CPU per step zeroing and mapping them (AMD EPYC, 2 cores: 3.55 s steps, 3.06 s without the
    faults). With one arena, no mmap and no trimming, freed blocks stay in the heap and the next
    step reuses them (most steps: a block freed only after the next step has started allocating
    still makes the heap grow now and then). The cost: the process does not return freed memory
    to the OS, which a training process that reaches its peak every step would not do anyway.

    Call it at the start of a process, before JAX's first device query: threads that already
    hold their own malloc arena keep using it, so after that query (a notebook or test process
    calling a CLI's `main`) it does nothing. It acts only where the CPU is JAX's backend and the
    C library is glibc.
    """
    from jax._src import xla_bridge  # private: whether a device query has happened

    if xla_bridge.backends_are_initialized() or not _cpu_is_the_backend():
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError where libc is not glibc
    except (OSError, AttributeError):  # musl, macOS: nothing to tune
        return False
    return all(libc.mallopt(option, value) == 1 for option, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
