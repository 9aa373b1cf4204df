"""The C++ kernels llamax runs on CPU, as one library of XLA FFI custom calls.

* `decode_kernels.cc` (`llamax.model.decode_kernels`): a decode step's projections and attention.
* `train_attention.cc` (`llamax.model.cpu_attention`): causal attention of a train step, forward
  and backward.
* `adamw.cc` (`llamax.train.optim.cpu_adamw_update`): a train step's AdamW update, in place.

They are built on first use with the machine's C++ compiler, `-march=native`, into
`~/.cache/llamax/kernels` (`XDG_CACHE_HOME` moves it; `make install` builds them ahead), and
registered with XLA as FFI targets. Where they cannot be built (no compiler, not x86-64 Linux),
`available()` says False (with one log line where a build failed) and the programs keep XLA's
ops. Each use has its own switch besides: `LLAMAX_DECODE_KERNELS=0` (decoding),
`LLAMAX_TRAIN_KERNELS=0` (train steps: attention and AdamW).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("decode_kernels.cc", "train_attention.cc", "adamw.cc"))
HEADERS = (Path(__file__).with_name("parallel_for.h"),)  # included by the sources
# -ffp-contract=fast: a * b + c as one fused multiply-add (ISO C++ mode would keep two roundings
# and half the arithmetic rate); -fno-math-errno: sqrt vectorizes (nothing reads errno).
COMPILER_FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=fast", "-fno-math-errno",
                  "-std=c++17", "-shared", "-fPIC", "-w")
# FFI target -> the library's handler symbol
TARGETS = {
    "llamax_thin_matmul": "LlamaxThinMatmul",
    "llamax_thin_matmul_bf16": "LlamaxThinMatmulBf16",
    "llamax_thin_matmul_s8": "LlamaxThinMatmulS8",
    "llamax_step_attention": "LlamaxStepAttention",
    "llamax_train_attention_fwd": "LlamaxTrainAttentionFwd",
    "llamax_train_attention_bwd": "LlamaxTrainAttentionBwd",
    "llamax_adamw": "LlamaxAdamW",
}


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_signature() -> bytes:
    """The CPU's model name and flags: a library built with -march=native runs only on its kind."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(wanted[:2]).encode()


def library_path(compiler: str) -> Path:
    """Where the kernels built by `compiler` for these sources, jaxlib and CPU live."""
    import jaxlib

    key = hashlib.sha256(b"\0".join([*(source.read_bytes() for source in SOURCES + HEADERS), compiler.encode(),
                                     " ".join(COMPILER_FLAGS).encode(), jaxlib.__version__.encode(),
                                     _cpu_signature()])).hexdigest()[:16]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "llamax" / "kernels" / f"cpu_kernels-{key}.so"


def build() -> Path:
    """Compiles the kernels unless this machine already has them; returns the library's path.
    Raises RuntimeError saying why it could not."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    path = library_path(compiler)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, suffix=".so.partial")
    os.close(handle)
    command = [compiler, *COMPILER_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", partial]
    try:
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except OSError as error:  # CXX names no program
            raise RuntimeError(f"{compiler} could not run: {error.strerror}") from None
        if result.returncode:
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise RuntimeError(f"{compiler} exited with {result.returncode}: {last}")
        os.replace(partial, path)  # atomic: concurrent builders each write their own file
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def available() -> bool:
    """Whether the kernels are built and registered with XLA (built on the first call of a process
    where needed). False off x86-64 Linux, or, with one warning line saying why, where they
    cannot be built."""
    return supported_platform() and _load()


TRAIN_SWITCH_ENV = "LLAMAX_TRAIN_KERNELS"  # "0": train steps never use the kernels


def train_kernels_available() -> bool:
    """Whether a train step may use the kernels: `available()` and not `LLAMAX_TRAIN_KERNELS=0`."""
    return os.environ.get(TRAIN_SWITCH_ENV, "1") != "0" and available()


def supported_platform() -> bool:
    """x86-64 Linux: what the compiler flags and the kernels' intrinsics are written for."""
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


@functools.cache
def _load() -> bool:
    """Builds (if needed), loads and registers the kernels, once per process."""
    try:
        library = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as error:
        logger.warning("llamax: the CPU kernels are unavailable (%s); XLA's ops run instead", error)
        return False
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return True


def build_ahead() -> None:
    """`make install`: builds the kernels before the first program needs them, and says where."""
    if not supported_platform():
        print(f"CPU kernels: not built on {platform.system()} {platform.machine()} (x86-64 Linux only)")
        return
    try:
        print(f"CPU kernels: {build()}")
    except RuntimeError as error:
        print(f"CPU kernels unavailable ({error}): programs will use XLA's ops")
