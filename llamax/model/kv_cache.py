"""The KV cache: its buffers, how a step writes them, and how a step attends over them.

A layer's keys and values live in heads-major buffers, [batch, kv_heads, length, head_dim] (HF's
order): each (row, kv head) reads one contiguous [length, head_dim] matrix.

`update_and_attend` is the one place a layer writes its new keys/values and attends. A one-token
step on CPU over a whole buffer (the `generate` loop) attends over the cache as it was BEFORE
the step plus the step's own key/value, and writes after the attention (a data dependency
orders them). Attending over the freshly written buffer instead made XLA:CPU copy every layer's
whole cache four times per step: the in-place write was duplicated into the attention's operand
and each copy had to be copied again (AMD EPYC, bench preset, `generate` at batch 1: 64 copies
of the 16 cache buffers per step, none in this order; docs/performance.md, change 6).
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from llamax.config import ModelConfig
from llamax.model.attention import attend_cached, attend_step
from llamax.model.matmul import builds_for_cpu

Array = jax.Array

# A stacked KVCache buffer; a per-layer buffer drops "layers". Heads-major, as HF stores it.
CACHE_AXES = ("layers", "batch", "act_kv_heads", "length", "head_dim")


@flax.struct.dataclass
class KVCache:
    """Preallocated keys/values for incremental decoding, GQA-shaped (kv_heads, not heads).

    Slot s of every row holds the token fed at step s. Rows may be left-padded: padding slots
    carry segment id 0 and real tokens segment id 1, so no real token attends to padding.

    `index` is one write position for the whole batch ([], as `create` makes it) or one per row
    ([batch]): rows of a serving batch hold unrelated requests that have reached different
    lengths (`llamax.infer.engine`), and each writes its new keys at its own position. A per-row
    index may cover only the first rows of the cache: a server at low load runs just the slots in
    use, and the other rows are left untouched (not copied).

    `key`/`value` are one stacked array, or (unscanned layers only, `per_layer=True`) a tuple of
    per-layer arrays: a call that is not inside a loop then updates each layer's buffer in place,
    where a stacked cache is sliced and re-stacked, i.e. copied whole, by every call.
    """

    key: Array | tuple[Array, ...]  # [layers, batch, kv_heads, max_length, head_dim], or per layer
    value: Array | tuple[Array, ...]  # same layout as key
    segment_ids: Array  # [batch, max_length]; 0 = empty slot or padding
    index: Array  # [] or [batch] int32: the next slot to write
    # Static: queries attend to slots [0, attend_length) only (None: all). A server whose rows
    # are all shorter than the cache reads just that much of it; every query must lie inside.
    attend_length: int | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, config: ModelConfig, batch_size: int, max_length: int,
               per_layer: bool = False) -> "KVCache":
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)

        def buffers():
            if per_layer:
                return tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.num_layers))
            return jnp.zeros((config.num_layers, *shape), config.compute_dtype)

        return cls(key=buffers(), value=buffers(),
                   segment_ids=jnp.zeros((batch_size, max_length), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.key[0].shape[2]  # layer 0: [batch, kv_heads, max_length, head_dim]


def write_at(buffer: Array, update: Array, index: Array, length_axis: int = 1) -> Array:
    """`update` [batch, seq, ...] written into `buffer` from slot `index` of its `length_axis`
    (segment ids [rows, length]: 1; a heads-major cache [rows, kv_heads, length, head_dim]: 2):
    one slot for every row ([], rows = batch), or one per row ([batch], a scatter into the first
    `batch` rows; later rows are left as they are)."""
    if index.ndim == 0:
        update = jnp.moveaxis(update, 1, length_axis)  # seq to the buffer's length axis
        start = [0] * buffer.ndim
        start[length_axis] = index
        return jax.lax.dynamic_update_slice(buffer, update, tuple(start))
    batch, seq = update.shape[:2]
    rows = jnp.arange(batch)[:, None]  # [batch, 1]
    slots = index[:, None] + jnp.arange(seq)  # [batch, seq]
    where = (rows,) + (slice(None),) * (length_axis - 1) + (slots,)  # view: [batch, seq, rest...]
    return buffer.at[where].set(update)  # out-of-range slots are dropped


def update_and_attend(q: Array, k: Array, v: Array, layer_cache: tuple[Array, Array], index: Array,
                      mask: Array, config: ModelConfig) -> tuple[Array, tuple[Array, Array]]:
    """Writes this call's keys/values k, v [batch, seq, kv_heads, head_dim] into a layer's cache
    (keys, values: [rows, kv_heads, length, head_dim]) at `index` and attends q [batch, seq,
    heads, head_dim] over its first mask.shape[-1] positions (mask [batch, seq, window]).
    Returns (attention output [batch, seq, heads, head_dim], the layer's new (keys, values))."""
    cached_key, cached_value = layer_cache
    k, v = k.astype(cached_key.dtype), v.astype(cached_value.dtype)
    rows, window = q.shape[0], mask.shape[-1]
    whole = (cached_key.shape[0], cached_key.shape[2]) == (rows, window)
    if q.shape[1] == 1 and whole and builds_for_cpu():
        old_mask = mask & (jnp.arange(window) != jnp.reshape(index, (-1, 1, 1)))  # own slot: stale
        out = attend_step(q, cached_key, cached_value, k, v, old_mask, config)
        # 0 * out makes the writes depend on the attention, so they come after its reads of the
        # old buffers (out is finite: every query attends at least to its own key).
        after = jnp.zeros((), k.dtype) * out[:, :, :1, :1].astype(k.dtype)  # [batch, 1, 1, 1]
        return out, (write_at(cached_key, k + after, index, length_axis=2),
                     write_at(cached_value, v + after, index, length_axis=2))
    keys = write_at(cached_key, k, index, length_axis=2)
    values = write_at(cached_value, v, index, length_axis=2)
    read_k, read_v = keys, values
    if not whole:  # a serving cache: this batch is its first rows, `mask` its first slots
        read_k, read_v = keys[:rows, :, :window], values[:rows, :, :window]
    return attend_cached(q, read_k, read_v, mask, config), (keys, values)
