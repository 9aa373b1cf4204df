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
targets, with the other CPU kernels (`llamax.model.cpu_kernels`). Where they cannot be built (no
compiler, not x86-64 Linux) or `LLAMAX_DECODE_KERNELS=0`, `available()` says False (with one log
line where a build failed) and decoding keeps XLA's ops.

Decode programs turn them on with `decode_kernels(True)` while they are traced: `project` then
takes `thin_matmul` for float32 products of at most THIN_MAX_ROWS rows, and `attend_step` takes
`step_attention` in float32. Training never does: the calls have no gradient, and a train
step's products have thousands of rows.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import jax
import jax.numpy as jnp

from llamax.model import cpu_kernels
from llamax.model.cpu_kernels import _compiler, _load, build  # noqa: F401  (the library's, re-exported)

THIN_MAX_ROWS = 8  # more rows: XLA's dots are as fast (16 rows: 11.5 vs 13.0 ms, same machine)
THIN_MATMUL, STEP_ATTENTION = "llamax_thin_matmul", "llamax_step_attention"  # the FFI targets
# The product's target and its library symbol per weight dtype (weight-only decode reads bfloat16
# and int8 kernels narrow; an int8 kernel's scales multiply the product outside).
_THIN_MATMULS = {jnp.dtype(jnp.float32): THIN_MATMUL, jnp.dtype(jnp.bfloat16): THIN_MATMUL + "_bf16",
                 jnp.dtype(jnp.int8): THIN_MATMUL + "_s8"}
SWITCH_ENV = "LLAMAX_DECODE_KERNELS"  # "0": never use the kernels

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


def available() -> bool:
    """Whether the kernels are built and registered with XLA (`llamax.model.cpu_kernels`, built on
    the first call of a process where needed). False where `LLAMAX_DECODE_KERNELS=0`, off x86-64
    Linux, or, with one warning line saying why, where they cannot be built."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return False
    return cpu_kernels.available()


def thin_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [rows, K] float32 @ w [K, N] (float32, bfloat16 or int8, read as it is) in float32, by
    the custom call (only after `available()`)."""
    target = _THIN_MATMULS[jnp.dtype(w.dtype)]
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
