"""A CPU decode step's projections and attention as custom calls (`decode_kernels.cc`).

A CPU decode step multiplies 1-8 rows by every weight matrix of the model and attends over the
KV cache once per new token. XLA:CPU's dot libraries (Eigen, YNNPACK) and PyTorch's MKL pack the
weight matrix for each product, which at that size costs more than the arithmetic: on an Intel
Xeon (family 6 model 167, 2 cores) the bench preset's 111 MB of projection weights, as a chain of
dependent products, took 10.5-12.9 ms for 8 rows (9-11 GB/s) and 4.3-5.7 ms for one row.
`thin_matmul` reads each weight row in place, in register tiles that walk along the rows: 6.7 ms
for 8 rows, 3.7 ms for one. It reads bfloat16 and int8 kernels (weight-only decode,
`llamax.model.quantize`) as they are, widening them in registers, so they cost half and a
quarter of the bytes per step (XLA widens them to a float32 copy once per call): batch-1
decode 258 / 340 / 594 tok/s for float32 / bfloat16 / int8 weights, same machine. XLA's decode attention is one batched matrix-vector product per query
head (2.2 ms per step at 8 rows); `step_attention` reads each kv head's cache once, and skips
the slots not filled yet (docs/performance.md, change 11).

The kernels are C++ (GCC/Clang vector extensions, so AVX-512 or AVX2 as the CPU has), built on
first use with the machine's C++ compiler, `-march=native`, into `~/.cache/llamax/kernels`
(`XDG_CACHE_HOME` moves it; `make install` builds them ahead), and registered with XLA as FFI
targets. Where they cannot be built (no compiler, not x86-64 Linux) or `LLAMAX_DECODE_KERNELS=0`,
`available()` says False (with one log line where a build failed) and decoding keeps XLA's ops.

Decode programs turn them on with `decode_kernels(True)` while they are traced: `project` then
takes `thin_matmul` for float32 products of at most THIN_MAX_ROWS rows, and `attend_step` takes
`step_attention` in float32. Training never does: the calls have no gradient, and a train
step's products have thousands of rows.
"""
from __future__ import annotations

import contextlib
import contextvars
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
import jax.numpy as jnp

logger = logging.getLogger(__name__)

THIN_MAX_ROWS = 8  # more rows: XLA's dots are as fast (16 rows: 11.5 vs 13.0 ms, same machine)
THIN_MATMUL, STEP_ATTENTION = "llamax_thin_matmul", "llamax_step_attention"  # the FFI targets
# The product's target and its library symbol per weight dtype (weight-only decode reads bfloat16
# and int8 kernels narrow; an int8 kernel's scales multiply the product outside).
_THIN_MATMULS = {jnp.dtype(jnp.float32): (THIN_MATMUL, "LlamaxThinMatmul"),
                 jnp.dtype(jnp.bfloat16): (THIN_MATMUL + "_bf16", "LlamaxThinMatmulBf16"),
                 jnp.dtype(jnp.int8): (THIN_MATMUL + "_s8", "LlamaxThinMatmulS8")}
SOURCE = Path(__file__).with_name("decode_kernels.cc")
SWITCH_ENV = "LLAMAX_DECODE_KERNELS"  # "0": never use the kernels
COMPILER_FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC", "-w")

_ENABLED = contextvars.ContextVar("llamax_decode_kernels", default=False)


@contextlib.contextmanager
def decode_kernels(enabled: bool):
    """Within this context (while a program is traced), float32 projections of at most
    THIN_MAX_ROWS rows and a decode step's attention use the kernels where `available()`."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


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
    """Where the kernels built by `compiler` for this source, jaxlib and CPU live."""
    import jaxlib

    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), compiler.encode(), " ".join(COMPILER_FLAGS).encode(),
                                     jaxlib.__version__.encode(), _cpu_signature()])).hexdigest()[:16]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "llamax" / "kernels" / f"decode_kernels-{key}.so"


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
    command = [compiler, *COMPILER_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", partial]
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
    where needed). False where `LLAMAX_DECODE_KERNELS=0`, off x86-64 Linux, or, with one warning
    line saying why, where they cannot be built."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return False
    return _supported_platform() and _load()


def _supported_platform() -> bool:
    """x86-64 Linux: what the compiler flags and the kernels' intrinsics are written for."""
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


@functools.cache
def _load() -> bool:
    """Builds (if needed), loads and registers the kernels, once per process."""
    try:
        library = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as error:
        logger.warning("llamax: the CPU decode kernels are unavailable (%s); decoding uses XLA's ops", error)
        return False
    for target, symbol in _THIN_MATMULS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    jax.ffi.register_ffi_target(STEP_ATTENTION, jax.ffi.pycapsule(library.LlamaxStepAttention), platform="cpu")
    return True


def thin_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [rows, K] float32 @ w [K, N] (float32, bfloat16 or int8, read as it is) in float32, by
    the custom call (only after `available()`)."""
    target = _THIN_MATMULS[jnp.dtype(w.dtype)][0]
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32))(x, w)


def thin_matmul_applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether `project` computes x [rows, K] @ w [K, N] by `thin_matmul`: inside
    `decode_kernels(True)`, x float32 with at most THIN_MAX_ROWS rows, w float32, bfloat16 or
    int8, and the kernels available."""
    return (_ENABLED.get() and x.shape[0] <= THIN_MAX_ROWS and x.dtype == jnp.float32
            and jnp.dtype(w.dtype) in _THIN_MATMULS and available())


def step_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, own_k: jax.Array,
                   own_v: jax.Array) -> jax.Array:
    """softmax over [cache slots where `mask`, own key] of q . key / sqrt(head_dim), times the
    values, float32 (only after `available()`). q [batch, kv_heads, groups, head_dim]; k, v
    [batch, kv_heads, kv_len, head_dim]; mask [batch, kv_len] bool; own_k, own_v [batch,
    kv_heads, head_dim]. Returns [batch, kv_heads, groups, head_dim]."""
    scaled = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    return jax.ffi.ffi_call(STEP_ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        scaled, k, v, mask, own_k, own_v)


def step_attention_applies(q: jax.Array) -> bool:
    """Whether `attend_step` runs `step_attention`: inside `decode_kernels(True)`, float32, and
    the kernels available."""
    return _ENABLED.get() and q.dtype == jnp.float32 and available()


def build_ahead() -> None:
    """`make install`: builds the kernels before the first decode needs them, and says where."""
    if not _supported_platform():
        print(f"CPU decode kernels: not built on {platform.system()} {platform.machine()} (x86-64 Linux only)")
        return
    try:
        print(f"CPU decode kernels: {build()}")
    except RuntimeError as error:
        print(f"CPU decode kernels unavailable ({error}): decoding will use XLA's ops")
