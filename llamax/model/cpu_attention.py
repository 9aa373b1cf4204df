"""Causal attention in query blocks with a hand-written backward pass: the CPU training path.

`llamax.model.attention.attend` splits causal queries into blocks (block j reads keys [0, end_j)).
Differentiated by JAX, that path saves every block's softmax probabilities and XLA:CPU runs the
backward products in a slow form: the key and value gradients contract the probabilities over
their rows, so XLA copies each [rows, keys] matrix into a transposed layout first, once for the
probabilities and once for their gradient. This module computes the same attention with a
flash-attention style backward (Dao et al., 2022), in forms XLA:CPU's dot library takes as they
are:

* forward: per block, scores = q k^T, mask, row max m, p = exp(scores - m), l = sum(p),
  out = (p v) / l; only out, m and l are saved (not p).
* backward: per block, p is recomputed from q, k, m and l; dp = dout v^T;
  dscores = p * (dp - rowsum(dout * out)); dq = dscores k; and the key/value gradients are
  computed transposed, dk^T = q^T dscores and dv^T = dout^T p, whose large operand is read in
  its own row-major layout. One transpose of the small [head_dim, keys] results at the end.

Heads-major with query heads grouped under their kv head: each (row, kv head) multiplies one
[block rows * groups, head_dim] matrix by [keys, head_dim] keys, with the queries of a block
contiguous, pre-scaled by 1/sqrt(head_dim). Bench preset on an Intel Xeon (family 6 model 167),
one layer, 4 x 512, GQA 8/4, fwd+bwd: 48-50 ms against 68-72 ms for the autodiff path (torch's
scaled_dot_product_attention: 40 ms; docs/performance.md, change 9).
Values and gradients equal the autodiff path (tests/test_attention.py). Used for programs built
for CPU devices (`llamax.model.matmul.builds_for_cpu`); TPU and GPU programs keep the autodiff
path (or splash / cuDNN).

A train step on one CPU device (`attention_kernel(True)`, set by the train setup) computes the
same blocks in float32 by two C++ custom calls instead (`train_attention.cc`, built with the other
CPU kernels, `llamax.model.cpu_kernels`): they read q, k, v and write the gradients in the
[batch, seq, heads, head_dim] layout, without the heads-major copies, and keep a block's scores in
the cache between its products and its softmax. Same machine, same layer: 25 ms fwd+bwd
(docs/performance.md, change 12). `LLAMAX_TRAIN_KERNELS=0` keeps XLA's form.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np

from llamax.model import cpu_kernels

Array = jax.Array
_MASKED = jnp.finfo(jnp.float32).min
SWITCH_ENV = cpu_kernels.TRAIN_SWITCH_ENV  # "0": never use the kernels
FORWARD, BACKWARD = "llamax_train_attention_fwd", "llamax_train_attention_bwd"  # the FFI targets
_KERNEL = contextvars.ContextVar("llamax_train_attention_kernel", default=False)


@contextlib.contextmanager
def attention_kernel(enabled: bool):
    """Within this context (while a program is traced), `blocked_causal_attention` of float32
    q, k, v runs the C++ kernels where they are available. Only for programs on one CPU device:
    XLA cannot split a custom call across devices."""
    token = _KERNEL.set(enabled)
    try:
        yield
    finally:
        _KERNEL.reset(token)


def kernel_applies(q: Array, k: Array, v: Array, mask: Array) -> bool:
    """Whether `blocked_causal_attention` runs the C++ kernels: inside `attention_kernel(True)`,
    q, k, v float32, head_dim a multiple of 16, a bool mask of [batch, seq, seq], the kernels
    available and not switched off."""
    batch, seq = q.shape[:2]
    return (_KERNEL.get() and q.dtype == k.dtype == v.dtype == jnp.float32 and q.shape[-1] % 16 == 0
            and mask.dtype == jnp.bool_ and mask.shape == (batch, seq, seq)
            and cpu_kernels.train_kernels_available())


def blocked_causal_attention(q: Array, k: Array, v: Array, mask: Array, block: int) -> Array:
    """softmax(q k^T / sqrt(d)) v where `mask` [batch, seq, seq] is True, computed in query blocks
    of `block` (block j reads keys [0, end_j); `mask` must hide every later key, as a causal mask
    does). q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim]. Returns
    [batch, seq, heads, head_dim] in q's dtype."""
    batch, seq, heads, head_dim = q.shape
    if kernel_applies(q, k, v, mask):
        return _kernel_attention(q * jnp.asarray(head_dim ** -0.5, q.dtype), k, v, mask, block)
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    # [batch, kv_heads, seq * groups, head_dim]: a query block's rows are contiguous
    rows = q.reshape(batch, seq, kv_heads, groups, head_dim).transpose(0, 2, 1, 3, 4)
    rows = rows.reshape(batch, kv_heads, seq * groups, head_dim)
    keys = jnp.swapaxes(k, 1, 2).astype(q.dtype)  # [batch, kv_heads, seq, head_dim]
    values = jnp.swapaxes(v, 1, 2).astype(q.dtype)
    bounds = [(start, min(start + block, seq)) for start in range(0, seq, block)]
    # Scaled once here, on [rows, head_dim]: a scalar multiply of a [rows, keys] matrix, fused
    # into XLA:CPU's dot, would have it materialize the scalar's broadcast at full size.
    rows = rows * jnp.asarray(head_dim ** -0.5, rows.dtype)
    # [batch, 1, block rows, end]: each query's mask row, repeated for its group's heads
    mask_blocks = tuple(jnp.repeat(mask[:, None, start:end, :end], groups, axis=2) for start, end in bounds)
    out = _attention(rows, keys, values, mask_blocks).reshape(batch, kv_heads, seq, groups, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, seq, heads, head_dim)


def _row_blocks(rows: Array, mask_blocks) -> list[Array]:
    """`rows` [batch, kv_heads, seq * groups, head_dim] cut into the query blocks of `mask_blocks`."""
    blocks, start = [], 0
    for mask in mask_blocks:
        blocks.append(rows[:, :, start:start + mask.shape[2]])
        start += mask.shape[2]
    return blocks


def _scores(query: Array, keys: Array, mask: Array) -> Array:
    """Masked float32 scores [batch, kv_heads, rows, keys] of pre-scaled queries."""
    scores = jnp.einsum("BKRD,BKSD->BKRS", query, keys, preferred_element_type=jnp.float32)
    return jnp.where(mask, scores, _MASKED)


def _forward(rows, keys, values, mask_blocks):
    """(output rows, row maxima, row sums); a block reads the keys its mask covers."""
    outputs, maxima, sums = [], [], []
    for query, mask in zip(_row_blocks(rows, mask_blocks), mask_blocks):
        end = mask.shape[-1]
        scores = _scores(query, keys[:, :, :end], mask)
        row_max = jnp.max(scores, axis=-1, keepdims=True)  # [batch, kv_heads, rows, 1]
        weights = jnp.exp(scores - row_max)
        row_sum = jnp.sum(weights, axis=-1, keepdims=True)
        out = jnp.einsum("BKRS,BKSD->BKRD", weights.astype(query.dtype), values[:, :, :end],
                         preferred_element_type=jnp.float32)
        outputs.append((out / row_sum).astype(query.dtype))
        maxima.append(row_max)
        sums.append(row_sum)
    return jnp.concatenate(outputs, axis=2), tuple(maxima), tuple(sums)


@jax.custom_vjp
def _attention(rows, keys, values, mask_blocks):
    return _forward(rows, keys, values, mask_blocks)[0]


def _attention_fwd(rows, keys, values, mask_blocks):
    out, maxima, sums = _forward(rows, keys, values, mask_blocks)
    return out, (rows, keys, values, mask_blocks, out, maxima, sums)


def _attention_bwd(saved, out_grad_rows):
    rows, keys, values, mask_blocks, out_rows, maxima, sums = saved
    batch, kv_heads, seq, head_dim = keys.shape
    dtype = keys.dtype
    # Transposed key/value gradients [batch, kv_heads, head_dim, seq] (see the module docstring).
    keys_grad_t = jnp.zeros((batch, kv_heads, head_dim, seq), jnp.float32)
    values_grad_t = jnp.zeros((batch, kv_heads, head_dim, seq), jnp.float32)
    query_grads = []
    for query, mask, out, row_max, row_sum, out_grad in zip(
            _row_blocks(rows, mask_blocks), mask_blocks, _row_blocks(out_rows, mask_blocks), maxima, sums,
            _row_blocks(out_grad_rows, mask_blocks)):
        end = mask.shape[-1]
        block_keys, block_values = keys[:, :, :end], values[:, :, :end]
        probs = jnp.exp(_scores(query, block_keys, mask) - row_max) / row_sum  # [batch, kv_heads, rows, end]
        probs_grad = jnp.einsum("BKRD,BKSD->BKRS", out_grad, block_values, preferred_element_type=jnp.float32)
        out_dot = jnp.sum(out_grad.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
        scores_grad = (probs * (probs_grad - out_dot)).astype(dtype)  # of the pre-scaled queries' scores
        query_grads.append(jnp.einsum("BKRS,BKSD->BKRD", scores_grad, block_keys,
                                      preferred_element_type=jnp.float32).astype(dtype))
        keys_grad_t = keys_grad_t.at[..., :end].add(
            jnp.einsum("BKRD,BKRS->BKDS", query, scores_grad, preferred_element_type=jnp.float32))
        values_grad_t = values_grad_t.at[..., :end].add(
            jnp.einsum("BKRD,BKRS->BKDS", out_grad, probs.astype(dtype), preferred_element_type=jnp.float32))
    keys_grad = jnp.swapaxes(keys_grad_t, 2, 3).astype(dtype)
    values_grad = jnp.swapaxes(values_grad_t, 2, 3).astype(dtype)
    return jnp.concatenate(query_grads, axis=2), keys_grad, values_grad, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ---- the C++ kernels ----------------------------------------------------------------------------

def _kernel_forward(q, k, v, mask, block):
    """(out [batch, seq, heads, head_dim], row max, row sum [batch, seq, heads]) of pre-scaled q."""
    stats = jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)
    return jax.ffi.ffi_call(FORWARD, (jax.ShapeDtypeStruct(q.shape, jnp.float32), stats, stats))(
        q, k, v, mask, block=np.int64(block))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kernel_attention(q, k, v, mask, block):
    return _kernel_forward(q, k, v, mask, block)[0]


def _kernel_attention_fwd(q, k, v, mask, block):
    out, row_max, row_sum = _kernel_forward(q, k, v, mask, block)
    return out, (q, k, v, mask, out, row_max, row_sum)


def _kernel_attention_bwd(block, saved, out_grad):
    q, k, v, mask, out, row_max, row_sum = saved
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    q_grad, k_grad, v_grad = jax.ffi.ffi_call(BACKWARD, shapes)(
        q, k, v, mask, out, row_max, row_sum, out_grad, block=np.int64(block))
    return q_grad, k_grad, v_grad, None


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)
