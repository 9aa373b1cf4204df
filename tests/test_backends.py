"""llamax.backends.retain_freed_host_memory: a CPU process reuses the memory XLA frees."""
import statistics
import subprocess
import sys

import pytest

# The gradient of a small layer, like a train step: its 64 MB temporaries ([8192, 2048] f32)
# are allocated and freed by every run. The child prints the page faults of runs 2 to 12.
PROGRAM = """
import resource, sys
from llamax.backends import retain_freed_host_memory
retained = retain_freed_host_memory() if sys.argv[1] == "retain" else False
import jax, jax.numpy as jnp
step = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)))
w, x = jnp.full((512, 2048), 0.01), jnp.ones((8192, 512))
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(step(w, x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(retained, *faults[1:])
"""
PAGES = (64 << 20) // 4096  # pages of one [8192, 2048] f32 temporary


def _faults(mode: str) -> tuple[bool, list[int]]:
    """(whether the setting took, the page faults of each warm run)."""
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                         check=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
                                          "PYTHONPATH": ":".join(sys.path)}).stdout.split()
    return out[0] == "True", [int(count) for count in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_temporaries_are_reused_instead_of_faulted_in_again():
    retained, faults = _faults("retain")
    _, default_faults = _faults("default")
    quiet = lambda counts: sum(count < PAGES // 20 for count in counts)  # noqa: E731
    assert retained
    # By default glibc maps the temporaries afresh at every run: their pages fault every time.
    assert quiet(default_faults) == 0 and statistics.median(default_faults) > PAGES // 2
    # Retained: most runs reuse freed blocks and touch (almost) no new page. Not every run: a
    # block freed only after the next run began allocating makes the heap grow once more.
    assert quiet(faults) >= len(faults) // 2, faults


def test_it_leaves_processes_that_run_on_an_accelerator_alone(monkeypatch):
    from llamax import backends

    monkeypatch.setattr(backends, "_cpu_is_the_backend", lambda: False)
    assert backends.retain_freed_host_memory() is False


def test_it_does_nothing_once_jax_has_picked_its_devices():
    import jax

    from llamax import backends

    jax.devices()  # this test process has initialized its backends
    assert backends.retain_freed_host_memory() is False
