"""Projection products: `einsum(equation, x, kernel)`, computed as one 2-D matmul on CPU.

Every projection of the model has the form `<lead><in>,<in><out>-><lead><out>` (e.g.
'BTE,EHD->BTHD'): x's leading axes pass through, the kernel's input axes contract. XLA:CPU runs
the backward pass of such einsums poorly when the lead is two axes (batch, seq): measured on an
Intel Xeon, the SwiGLU MLP's gradient took 208 ms as 3-D einsums and 122 ms as the same math on
`[batch * seq, embed]` matrices (torch: 108 ms). Reshaping to 2-D is free (row-major), so on CPU
the products are 2-D matmuls; on TPU and GPU, where the einsum form is what the compiler and the
sharding annotations expect, they stay einsums. The choice follows the devices a program is built
for (`flat_matmuls`, set by the train setup from its mesh), so compiling for a TPU topology on a
CPU host still builds the TPU program; outside any setting it follows `jax.default_backend()`.

A CPU decode step multiplies a few rows by every weight. Up to 8 float32 rows, `project` hands
them to `llamax.model.decode_kernels`, a custom call that reads the weights in place, when the decode
program turns it on; otherwise (more rows, other dtypes, no C++ compiler) CPU decoding stores each
kernel as one [outputs, inputs] matrix (`project_out_in`), which XLA:CPU multiplies faster as the
left operand.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import re

import jax
import jax.numpy as jnp

from llamax.model import decode_kernels

_FLAT = contextvars.ContextVar("llamax_flat_matmuls", default=None)


@contextlib.contextmanager
def flat_matmuls(enabled: bool | None):
    """Within this context, projections are 2-D matmuls (True), einsums (False) or follow the
    default backend (None)."""
    token = _FLAT.set(enabled)
    try:
        yield
    finally:
        _FLAT.reset(token)


def flat_matmuls_for(mesh: jax.sharding.Mesh | None):
    """`flat_matmuls` for programs built for `mesh`'s devices (2-D on CPU, einsums on TPU/GPU,
    even when a CPU host compiles them ahead of time); no mesh: follow the default backend."""
    return flat_matmuls(None if mesh is None else runs_on_cpu(mesh))


def runs_on_cpu(mesh: jax.sharding.Mesh | None) -> bool:
    """Whether programs built for `mesh` (None: the default backend) run on CPU."""
    return (jax.default_backend() if mesh is None else mesh.devices.flat[0].platform) == "cpu"


def runs_on_one_cpu_device(mesh: jax.sharding.Mesh | None) -> bool:
    """Whether programs built for `mesh` (None: the default backend) run on a single CPU device:
    where llamax's C++ CPU kernels may run (XLA cannot split a custom call across devices)."""
    return runs_on_cpu(mesh) and (mesh is None or mesh.devices.size == 1)


def builds_for_cpu() -> bool:
    """Whether the program being traced is built for CPU devices: the `flat_matmuls` setting, or
    the default backend outside one. Beyond 2-D projections it picks the other CPU forms: the
    causal attention of `llamax.model.cpu_attention` and an unrolled layer stack."""
    setting = _FLAT.get()
    return jax.default_backend() == "cpu" if setting is None else setting


def _pass_through_form(equation: str) -> tuple[int, int] | None:
    """(number of lead axes, number of input axes) when `equation` is `<lead><in>,<in><out>->
    <lead><out>` with every letter distinct, else None."""
    match = re.fullmatch(r"(\w+),(\w+)->(\w+)", equation)
    if not match:
        return None
    x_letters, kernel_letters, out_letters = match.groups()
    n_in = len(x_letters) - len(out_letters) + len(kernel_letters)
    if n_in % 2:
        return None
    n_in //= 2
    lead, contracted = x_letters[:len(x_letters) - n_in], x_letters[len(x_letters) - n_in:]
    if (n_in < 1 or kernel_letters[:n_in] != contracted or out_letters != lead + kernel_letters[n_in:]
            or len(set(x_letters + kernel_letters)) != len(x_letters) + len(kernel_letters) - n_in):
        return None
    return len(lead), n_in


def project(equation: str, x: jax.Array, kernel: jax.Array, dtype: jnp.dtype | None = None) -> jax.Array:
    """`jnp.einsum(equation, x, kernel)`; a reshaped 2-D matmul where `builds_for_cpu()`. With
    `dtype`, the kernel is widened to it for the product, except where the CPU decode kernel
    reads it as it is (bfloat16 and int8 weight-only decoding)."""
    widen = (lambda k: k) if dtype is None else (lambda k: k.astype(dtype))  # noqa: E731
    form = _pass_through_form(equation) if builds_for_cpu() else None
    if form is None:
        return jnp.einsum(equation, x, widen(kernel))
    n_lead, n_in = form
    lead_shape, out_shape = x.shape[:n_lead], kernel.shape[n_in:]
    inputs = math.prod(kernel.shape[:n_in])
    rows, matrix = x.reshape(-1, inputs), kernel.reshape(inputs, -1)
    # [lead..., outputs...] flattened; a decode step's few rows by the CPU decode kernel
    if decode_kernels.thin_matmul_applies(rows, matrix):
        flat = decode_kernels.thin_matmul(rows, matrix)
    else:
        flat = rows @ widen(matrix)
    return flat.reshape(*lead_shape, *out_shape)


# Up to this many rows, `project_out_in` takes the weight-major form.
OUT_IN_MAX_ROWS = 64


def project_out_in(equation: str, x: jax.Array, kernel: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`jnp.einsum(equation, x, K)` for a kernel K of declared shape `shape` [inputs...,
    outputs...] stored as one [outputs, inputs] matrix `kernel` (ModelConfig.kernel_layout
    'out_in', the CPU decoding layout)."""
    n_lead, n_in = _projection_form(equation)
    rows = x.reshape(-1, math.prod(shape[:n_in]))  # [rows, inputs]
    if rows.shape[0] <= OUT_IN_MAX_ROWS:
        # A decode step's few rows: with the weights as the left operand and an [outputs, rows]
        # product, XLA:CPU's dots run 1.1-2x faster than rows @ [inputs, outputs] (AMD EPYC, 16
        # rows, bench shapes: 69 -> 158 GFLOP/s for the lm_head). The barrier keeps XLA from
        # folding the small transpose into the dot, which would make it the slow form again.
        flat = jax.lax.optimization_barrier(jnp.einsum("OI,RI->OR", kernel, rows)).T
    else:  # a prefill's many rows: as fast as the [inputs, outputs] kernel
        flat = jnp.einsum("RI,OI->RO", rows, kernel)
    return flat.reshape(*x.shape[:n_lead], *shape[n_in:])


def out_in_shape(equation: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The [outputs, inputs] matrix shape of a kernel of declared shape `shape` in `equation`."""
    n_in = _projection_form(equation)[1]
    return math.prod(shape[n_in:]), math.prod(shape[:n_in])


def _projection_form(equation: str) -> tuple[int, int]:
    form = _pass_through_form(equation)
    if form is None:
        raise ValueError(f"{equation!r} is not a projection <lead><in>,<in><out>-><lead><out>")
    return form
