"""JAX's persistent compilation cache, on by default for every llamax command.

A second run of the same program (a rerun, a resume, the next point of a sweep) loads the
compiled executables instead of compiling them again: the tiny model's 1-step run spends most of
its time in XLA compilation. The cache lives in the user's cache folder
(`llamax.files.cache_dir('jax')`); `LLAMAX_COMPILATION_CACHE=/path` moves it, `=off` turns it off. Multi-process runs use it only
when a location is given (`enable`).
"""
from __future__ import annotations

import os

import jax

from llamax.files import cache_dir

ENV = "LLAMAX_COMPILATION_CACHE"


def enable(location: str | None = None, *, multi_process: bool = False) -> str | None:
    """Turns the cache on at `location` (default: $LLAMAX_COMPILATION_CACHE, else JAX's own
    $JAX_COMPILATION_CACHE_DIR if set, else the user's cache); 'off' leaves it off. Returns the
    folder used, or None. Call before compiling.

    `multi_process`: the run has several processes. The default cache then stays off (only an
    explicit location turns it on): each host's private cache can hold different programs, so one
    process would load a step while another compiles it for a minute, and the first one's
    collective times out waiting (Gloo's 30 s on CPU)."""
    location = location or os.environ.get(ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if location is None and multi_process:
        return None
    location = location or str(cache_dir("jax"))
    if location.lower() in ("off", "none", "0", "false"):
        return None
    os.makedirs(location, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", location)
    # Every program counts: a run is many small programs (init, step, eval) of ~1 s each.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return location
