"""benchmarks: speed, memory and reliability measurements (`python -m benchmarks.<name>`).

Like `experiments`, importing the package keeps a CPU-only host on the CPU when libtpu is
installed (`llamax.backends.use_cpu_without_accelerators`), so no run pays libtpu's probe or
prints its warnings.
"""
import importlib.util
import os

if "JAX_PLATFORMS" not in os.environ and importlib.util.find_spec("libtpu") is not None:
    from llamax.backends import use_cpu_without_accelerators

    use_cpu_without_accelerators()
