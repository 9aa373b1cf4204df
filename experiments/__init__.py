"""experiments: the command-line tools (gin lives only here).

  train.py, sweep/, eval.py, sample.py, convert.py, export_lora.py, compile.py (TPU slices
  without a TPU), tokenizer.py, demo.py, smollm2.py, ablations/; gin_config.py parses gin for
  every CLI.

Importing the package keeps CPU-only hosts on the CPU: with libtpu installed (the `tpu`, `test`
and `all` extras) JAX would otherwise load it at every CLI's first device query only to find no
TPU chip, which costs ~0.2 s and prints libtpu's warnings on stderr. See
`llamax.backends.use_cpu_without_accelerators`; it leaves TPU hosts, GPU installs and a
user's JAX_PLATFORMS alone.
"""
import importlib.util
import os

if "JAX_PLATFORMS" not in os.environ and importlib.util.find_spec("libtpu") is not None:
    # Only installs with libtpu pay for importing JAX here; every CLI imports it anyway.
    from llamax.backends import use_cpu_without_accelerators

    use_cpu_without_accelerators()
