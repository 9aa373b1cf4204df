"""Attention arithmetic: softmax(q k^T / sqrt(d)) v with GQA, masks and causal query blocks.

The `Attention` module (`llamax.model.llama`) computes the projections, rotary embeddings and the
KV cache; this file only combines q, k and v, and holds one function per implementation
(`ModelConfig.attention_impl`): 'xla' (here), 'cudnn' (jax.nn.dot_product_attention) and
'splash' (the Pallas TPU kernel, `llamax.model.splash`).

`attend` takes keys/values as the projections give them ([batch, seq, kv_heads, head_dim]);
`attend_cached` takes them as the KV cache stores them, heads-major ([batch, kv_heads, length,
head_dim]), so that each (row, kv head) reads one contiguous [length, head_dim] matrix.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llamax.config import ModelConfig
from llamax.model import decode_kernels
from llamax.model.cpu_attention import blocked_causal_attention
from llamax.model.matmul import builds_for_cpu

Array = jax.Array


def attend(q: Array, k: Array, v: Array, mask: Array, config: ModelConfig,
           causal: bool = False, segment_ids: Array | None = None) -> Array:
    """softmax(q k^T / sqrt(d)) v where `mask` [batch, q_len, kv_len] is True; GQA without
    repeating k/v: query heads are grouped under the kv head they share.

    causal=True promises that `mask` already hides every key slot after the query's own slot
    (no cache: query i is key i). The XLA path then splits the queries into blocks of
    `config.attention_block_size` and lets block j read only keys [0, (j+1) * block): the
    masked upper triangle is never computed (about half the attention work and memory at long
    sequences); on CPU, `llamax.model.cpu_attention` computes the same blocks with its own
    backward pass. cuDNN gets `is_causal=True` and skips it itself. Splash builds its causal and
    same-segment mask from `segment_ids` [batch, seq] inside the kernel and ignores `mask`;
    without causal, splash does not apply and the XLA path runs. (The model attends over a KV
    cache with `attend_cached`.)
    """
    if config.attention_impl == "splash" and causal:
        from llamax.model.splash import splash_attention  # imports Pallas only when chosen

        if segment_ids is None:
            segment_ids = jnp.ones(q.shape[:2], jnp.int32)
        return splash_attention(q, k, v, segment_ids)
    if config.attention_impl == "cudnn":
        # GQA is native; `mask` (causal & same segment) becomes an additive bias inside jax.
        return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                            mask=mask[:, None], is_causal=causal,
                                            implementation="cudnn")
    q_len, block = q.shape[1], config.attention_block_size
    if not causal or not block or q_len <= block:
        return _attend_dense(q, k, v, mask)
    if builds_for_cpu():  # same blocks, a backward pass in the forms XLA:CPU runs fast
        return blocked_causal_attention(q, k, v, mask, block)
    outputs = []
    for start in range(0, q_len, block):  # static: a few blocks per layer
        end = min(start + block, q_len)
        outputs.append(_attend_dense(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end]))
    return jnp.concatenate(outputs, axis=1)  # [batch, q_len, heads, head_dim]


def _attend_dense(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """The full [q_len, kv_len] attention of `attend`, scores and softmax in float32."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    q = q.reshape(batch, q_len, kv_heads, groups, head_dim)  # [batch, q_len, kv_heads, groups, head_dim]
    scores = jnp.einsum("BTKGD,BSKD->BKGTS", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) * (head_dim ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [batch, kv_heads, groups, q_len, kv_len]
    out = jnp.einsum("BKGTS,BSKD->BTKGD", probs, v.astype(q.dtype))
    return out.reshape(batch, q_len, heads, head_dim)


def attend_cached(q: Array, k: Array, v: Array, mask: Array, config: ModelConfig) -> Array:
    """`attend` over a KV cache: q [batch, q_len, heads, head_dim]; k, v heads-major [batch,
    kv_heads, kv_len, head_dim]; mask [batch, q_len, kv_len]. Returns [batch, q_len, heads,
    head_dim].

    A decode step (q_len 1) on CPU runs one batched matrix-vector product per query head of a
    group: XLA:CPU turns a [groups, kv_len] x [kv_len, head_dim] product per (row, kv head)
    into a slow loop of tiny matmuls, but emits a vectorized kernel for matrix-vector products.
    AMD EPYC (Zen 3), one layer, 16 rows x 512 cached keys, 4 kv heads x 2 groups: 0.85 ms,
    where the grouped einsum took 3.4 ms (the old [batch, length, kv_heads, head_dim] cache
    order: 3.3 ms over 256 keys, two transposes). On accelerators, where the cache read bounds a
    decode step, the grouped einsum reads it once instead of once per group
    (docs/performance.md, change 5)."""
    if config.attention_impl == "cudnn":
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # cuDNN takes [batch, length, heads, dim]
        return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                            mask=mask[:, None], implementation="cudnn")
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if q_len == 1 and builds_for_cpu():
        return _one_query_per_head(q, k, v, mask)
    q = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    scores = jnp.einsum("BTKGD,BKSD->BKGTS", q, k, preferred_element_type=jnp.float32) * (head_dim ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [batch, kv_heads, groups, q_len, kv_len]
    out = jnp.einsum("BKGTS,BKSD->BTKGD", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)


def attend_step(q: Array, k_old: Array, v_old: Array, k_new: Array, v_new: Array, mask: Array,
                config: ModelConfig) -> Array:
    """One decode step on CPU over the KV cache as it was before the step, plus the step's own
    key/value (`llamax.model.kv_cache.update_and_attend` says why).

    q [batch, 1, heads, head_dim]; k_old, v_old heads-major [batch, kv_heads, kv_len, head_dim];
    k_new, v_new [batch, 1, kv_heads, head_dim]; mask [batch, 1, kv_len] without the step's own
    slot (the old cache holds something stale there). Like `attend_cached`'s CPU form: one
    batched matrix-vector product per query head of a group. Returns [batch, 1, heads, head_dim].
    """
    own = (k_new[:, 0].astype(q.dtype), v_new[:, 0].astype(q.dtype))  # [batch, kv_heads, head_dim]
    k_old, v_old = k_old.astype(q.dtype), v_old.astype(q.dtype)
    if decode_kernels.step_attention_applies(q):  # a CPU decode program, float32: one custom call
        batch, _, heads, head_dim = q.shape
        grouped = q.reshape(batch, k_old.shape[1], heads // k_old.shape[1], head_dim)
        out = decode_kernels.step_attention(grouped, k_old, v_old, mask[:, 0], *own)
        return out.reshape(batch, 1, heads, head_dim)
    return _one_query_per_head(q, k_old, v_old, mask, own)


def _one_query_per_head(q: Array, k: Array, v: Array, mask: Array,
                        own: tuple[Array, Array] | None = None) -> Array:
    """CPU decode attention: q [batch, 1, heads, head_dim] over heads-major k, v [batch, kv_heads,
    kv_len, head_dim] (q's dtype) where mask [batch, 1, kv_len], one batched matrix-vector product
    per query head of a group; `own` (key, value [batch, kv_heads, head_dim]) is one more key that
    every query sees. Returns [batch, 1, heads, head_dim]."""
    batch, _, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    outputs = []
    for group in range(q.shape[2]):  # static: one matrix-vector product per query head
        query = q[:, :, group]  # [batch, kv_heads, head_dim]
        scores = jnp.einsum("BKD,BKSD->BKS", query, k, preferred_element_type=jnp.float32) * (head_dim ** -0.5)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)  # [batch, kv_heads, kv_len]
        if own is not None:
            own_score = jnp.einsum("BKD,BKD->BK", query, own[0], preferred_element_type=jnp.float32)
            scores = jnp.concatenate([scores, own_score[..., None] * (head_dim ** -0.5)], axis=-1)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("BKS,BKSD->BKD", probs[..., :k.shape[2]], v)
        outputs.append(out if own is None else out + probs[..., -1:] * own[1])
    return jnp.stack(outputs, axis=2).reshape(batch, 1, heads, head_dim)
