"""`needs_kernel`: skips a test where llamax's C++ CPU kernels cannot be built (not x86-64 Linux,
no C++ compiler); there `available()` is False by design."""
import pytest

from llamax.model import cpu_kernels

needs_kernel = pytest.mark.skipif(
    cpu_kernels._compiler() is None or not cpu_kernels.supported_platform(),
    reason="the kernels build on x86-64 Linux with a C++ compiler")
