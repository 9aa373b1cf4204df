"""Test setup: 8 fake CPU devices so sharding is exercised on one host."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite runs on the CPU. With the `tpu` extra installed, JAX would otherwise load libtpu at
# the first device query of every process (subprocess CLIs included) only to find no TPU chip,
# printing libtpu's warnings on stderr. TPU compiles (tests/test_compile.py) need no backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Property tests draw the same examples on every run: CI must not pass or fail by chance.
# Per-test @settings (max_examples, deadline) inherit this profile.
from hypothesis import settings  # noqa: E402

settings.register_profile("llamax", derandomize=True, deadline=None, database=None)
settings.load_profile("llamax")
