"""The device side of batched serving: a slot-based KV cache and the two jitted steps over it.

A `SlotBatch` holds `max_batch` unrelated sequences, one per slot (a row of the KV cache of
`max_seq_len` positions). In a slot, cache position p holds the token at RoPE position p: a prompt
is written from position 0 and decoding continues right after its last token, so each row has its
own write index (`KVCache.index` is [slots]) and attends only to its own filled positions
(segment id 1 up to its index); nothing leaks between slots.

  prefill  runs one prompt, right-padded to a length bucket, through a fresh cache of that length,
           copies its keys/values into a slot, and samples the first new token. One executable
           per length bucket, reused by every request.
  decode   feeds every slot's last token at its own position and samples the next ones: ONE step
           advances all active sequences together (the slots up to the highest one in use).

Sampling settings are per-slot arrays (`llamax.infer.row_sampling`), so greedy and sampled
requests with different temperature/top-k/top-p/seed share a step.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from llamax.config import ModelConfig
from llamax.infer.generate import (decoding_config, decoding_params, sharding_context, uses_decode_kernels,
                                   with_decode_kernels)
from llamax.infer.row_sampling import SlotSampling, StepOutput, sample_rows
from llamax.model.kv_cache import CACHE_AXES, KVCache
from llamax.model.llama import Llama
from llamax.model.matmul import runs_on_cpu

Array = jax.Array
Rules = Sequence[tuple[str, Any]]

LAYER_CACHE_AXES = CACHE_AXES[1:]  # one layer's buffer: [batch, kv_heads, length, head_dim]


@flax.struct.dataclass
class SlotBatch:
    """Everything the device keeps between steps."""

    cache: KVCache  # per-layer buffers (updated in place); index [slots]: where `last` goes next
    last: Array  # [slots] int32: the newest token of each slot, fed at the next step
    steps: Array  # [slots] int32: new tokens sampled so far (selects the RNG stream)
    active: Array  # [slots] bool: slot holds a running request
    sampling: SlotSampling


def _set_row(array: Array, slot: Array, row: Array) -> Array:
    """array [slots, ...] with row `slot` replaced by row [1, ...]."""
    return jax.lax.dynamic_update_slice(array, row.astype(array.dtype), (slot,) + (0,) * (array.ndim - 1))


class SlotProgram:
    """The compiled steps of one engine: model, slot count, cache length and device layout.

    Args:
      config: the model (scanned or not; decoding always runs unscanned layers).
      max_batch: number of slots (a multiple of the data-parallel size under a mesh).
      max_seq_len: positions per slot: prompt plus generated tokens.
      mesh, rules: shard params by the logical-axis rules (default `LOGICAL_AXIS_RULES`) and the
        slots over the data axes; None runs on the default device.
    """

    def __init__(self, config: ModelConfig, max_batch: int, max_seq_len: int,
                 mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None):
        self.config, self.max_batch, self.max_seq_len = config, max_batch, max_seq_len
        # On CPU the kernels are [outputs, inputs] matrices, transposed once by `place_params`:
        # with XLA's default (YNNPACK) dots, a decode step of 1-16 rows is then 5-45% faster
        # (docs/performance.md, change 8). Up to 8 slots the CPU decode kernels take the trained
        # layout, and every CPU decode step attends with them (change 11).
        thin = uses_decode_kernels(mesh, max_batch, config)
        self.kernel_layout = "out_in" if runs_on_cpu(mesh) and not thin else "in_out"
        self.decode_config = decoding_config(config, self.kernel_layout)
        self.mesh = mesh
        if mesh is not None:
            from llamax.sharding import LOGICAL_AXIS_RULES
            rules = tuple(tuple(rule) for rule in (LOGICAL_AXIS_RULES if rules is None else rules))
        self.rules = rules
        # A 1-row prefill cannot be split over the data axes: its batch stays whole.
        self.prefill_rules = None if rules is None else tuple(
            (name, None if name == "batch" else axes) for name, axes in rules)
        self._empty = jax.jit(self._empty_batch)
        self._prefill = jax.jit(self._prefill_slot, donate_argnums=(1,))
        self._decode = jax.jit(with_decode_kernels(self._decode_slots, mesh), donate_argnums=(1,),
                               static_argnums=(2, 3))

    def _context(self, rules: Rules | None):
        return sharding_context(self.mesh, rules)

    # ---- host-facing calls ------------------------------------------------------------------

    def place_params(self, params: Any) -> Any:
        """Params on device(s) in the decoding layout (per-layer `layers_N`; on CPU, [outputs,
        inputs] kernels), sharded under a mesh."""
        if self.mesh is None:
            params = jax.device_put(params)
        else:
            from llamax.sharding import param_shardings
            params = jax.device_put(params, param_shardings(self.config, self.mesh, self.rules))
        with self._context(self.rules):
            return jax.jit(functools.partial(decoding_params, self.config, kernel_layout=self.kernel_layout))(params)

    def empty(self) -> SlotBatch:
        """A batch with every slot idle."""
        with self._context(self.rules):
            return self._empty()

    def prefill(self, params: Any, batch: SlotBatch, slot: int, tokens: Any, length: int,
                sampling: SlotSampling) -> tuple[SlotBatch, StepOutput]:
        """Starts a request in `slot`: tokens [1, bucket] holds the prompt in its first `length`
        places. Donates `batch`. Returns the new batch and the first token ([1] rows)."""
        with self._context(self.prefill_rules):
            return self._prefill(params, batch, jnp.int32(slot), tokens, jnp.int32(length), sampling)

    def decode(self, params: Any, batch: SlotBatch, rows: int | None = None,
               window: int | None = None) -> tuple[SlotBatch, StepOutput]:
        """One token for each of the first `rows` slots (default all), attending to cache
        positions [0, window) (default all: every active slot's position must be below it).
        One executable per (rows, window): use `row_buckets` and `window_buckets`. Donates
        `batch`; rows of idle slots are meaningless."""
        with self._context(self.rules):
            return self._decode(params, batch, rows or self.max_batch, window or self.max_seq_len)

    def window_buckets(self, smallest: int = 128) -> list[int]:
        """The `window` values decode is compiled for: powers of two from `smallest`, then
        max_seq_len."""
        sizes, size = [], smallest
        while size < self.max_seq_len:
            sizes.append(size)
            size *= 2
        return sizes + [self.max_seq_len]

    def row_buckets(self, multiple_of: int = 1) -> list[int]:
        """The `rows` values decode is compiled for: powers of two (multiples of the data-parallel
        size) up to max_batch, which is always one."""
        sizes, size = [], multiple_of
        while size < self.max_batch:
            sizes.append(size)
            size *= 2
        return sizes + [self.max_batch]

    def release(self, batch: SlotBatch, slot: int) -> SlotBatch:
        """Marks `slot` idle (host-side flag update; the cache row is overwritten on reuse)."""
        return batch.replace(active=batch.active.at[slot].set(False))

    # ---- traced bodies ----------------------------------------------------------------------

    def _constrain(self, cache: KVCache) -> KVCache:
        constrain = lambda layers: tuple(nn.with_logical_constraint(x, LAYER_CACHE_AXES) for x in layers)  # noqa: E731
        return cache.replace(key=constrain(cache.key), value=constrain(cache.value))

    def _empty_batch(self) -> SlotBatch:
        c, slots = self.config, self.max_batch
        cache = KVCache.create(c, slots, self.max_seq_len, per_layer=True)
        cache = self._constrain(cache.replace(index=jnp.zeros((slots,), jnp.int32)))
        key_shape = jax.random.key_data(jax.random.key(0)).shape
        sampling = SlotSampling(
            greedy=jnp.ones((slots,), bool), temperature=jnp.ones((slots,), jnp.float32),
            top_k=jnp.zeros((slots,), jnp.int32), top_p=jnp.ones((slots,), jnp.float32),
            key_data=jnp.zeros((slots, *key_shape), jnp.uint32))
        zeros = jnp.zeros((slots,), jnp.int32)
        return SlotBatch(cache=cache, last=zeros, steps=zeros, active=jnp.zeros((slots,), bool),
                         sampling=sampling)

    def _prefill_slot(self, params, batch: SlotBatch, slot, tokens, length, sampling: SlotSampling):
        bucket = tokens.shape[1]
        places = jnp.arange(bucket, dtype=jnp.int32)[None]  # [1, bucket]
        segment_ids = (places < length).astype(jnp.int32)  # right padding: segment 0
        fresh = KVCache.create(self.decode_config, 1, bucket, per_layer=True)
        logits, prompt_cache = Llama(self.decode_config).apply(
            {"params": params}, tokens, positions=places, segment_ids=segment_ids, cache=fresh,
            logits_at=length[None] - 1)  # the prompt's last token only: [1, 1, vocab]
        first = sample_rows(logits[:, 0], sampling, jnp.zeros((1,), jnp.int32))

        cache = batch.cache
        into_slot = lambda layers, rows: tuple(  # noqa: E731
            jax.lax.dynamic_update_slice(layer, row, (slot, 0, 0, 0)) for layer, row in zip(layers, rows))
        row_segments = jnp.zeros((1, self.max_seq_len), jnp.int32).at[:, :bucket].set(segment_ids)
        cache = self._constrain(KVCache(
            key=into_slot(cache.key, prompt_cache.key), value=into_slot(cache.value, prompt_cache.value),
            segment_ids=_set_row(cache.segment_ids, slot, row_segments),
            index=_set_row(cache.index, slot, length[None])))
        batch = SlotBatch(
            cache=cache, last=_set_row(batch.last, slot, first.tokens),
            steps=_set_row(batch.steps, slot, jnp.ones((1,), jnp.int32)),
            active=_set_row(batch.active, slot, jnp.ones((1,), bool)),
            sampling=jax.tree.map(lambda all_rows, row: _set_row(all_rows, slot, row),
                                  batch.sampling, sampling))
        return batch, first

    def _decode_slots(self, params, batch: SlotBatch, rows: int, window: int):
        # Only the first `rows` slots run, and they read only the first `window` positions: a
        # step costs what the running requests need, not what max_batch x max_seq_len would.
        # The model writes their keys into the full cache in place; the rest is not touched.
        cache = batch.cache
        part = lambda x: x[:rows]  # noqa: E731
        logits, new_cache = Llama(self.decode_config).apply(
            {"params": params}, part(batch.last)[:, None], positions=part(cache.index)[:, None],
            segment_ids=jnp.ones((rows, 1), jnp.int32),
            cache=cache.replace(index=part(cache.index), attend_length=window))
        new_cache = new_cache.replace(attend_length=None)
        active = part(batch.active)
        out = sample_rows(logits[:, 0], jax.tree.map(part, batch.sampling), part(batch.steps))
        # Idle rows keep their index: they never run past the cache however long they idle.
        index = cache.index.at[:rows].set(jnp.where(active, new_cache.index, part(cache.index)))
        steps = batch.steps.at[:rows].add(active.astype(jnp.int32))
        batch = batch.replace(cache=self._constrain(new_cache.replace(index=index)),
                              last=batch.last.at[:rows].set(out.tokens), steps=steps)
        return batch, out
