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
           advances all active sequences together; idle slots compute and are ignored.

Sampling settings are per-slot arrays (`SlotSampling`), so greedy and sampled requests with
different temperature/top-k/top-p/seed share a step. A slot draws its step-s token with
`fold_in(fold_in(key(seed), s), 0)`, the key `llamax.infer.generate` gives a single prompt, and
filters logits with the same arithmetic, so a seeded request samples what `generate` would alone.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from llamax.config import ModelConfig
from llamax.infer.generate import CACHE_AXES, decoding_config, unstack_layers
from llamax.model.llama import KVCache, Llama

Array = jax.Array
Rules = Sequence[tuple[str, Any]]

TOP_LOGPROBS = 5  # alternatives returned per token (OpenAI's completions allow up to 5)
LAYER_CACHE_AXES = CACHE_AXES[1:]  # one layer's buffer: [batch, length, kv_heads, head_dim]


@flax.struct.dataclass
class SlotSampling:
    """Per-slot sampling settings; each field is [slots] (or [slots, *key_shape])."""

    greedy: Array  # bool: argmax, the other fields unused
    temperature: Array  # float32 (1 for greedy rows)
    top_k: Array  # int32; 0 = no top-k filter
    top_p: Array  # float32; 1 = no nucleus filter
    tail_cutoff: Array  # float32 of (1 - top_p) computed in float64, as `filter_logits` sees it
    key_data: Array  # uint32 [slots, *key_shape]: jax.random.key_data(key(seed))


@flax.struct.dataclass
class SlotBatch:
    """Everything the device keeps between steps."""

    cache: KVCache  # per-layer buffers (updated in place); index [slots]: where `last` goes next
    last: Array  # [slots] int32: the newest token of each slot, fed at the next step
    steps: Array  # [slots] int32: new tokens sampled so far (selects the RNG stream)
    active: Array  # [slots] bool: slot holds a running request
    sampling: SlotSampling


class StepOutput(NamedTuple):
    """What the host reads after a step: one sampled token per row, with log-probabilities
    under the model's distribution (before temperature and filters)."""

    tokens: Array  # [rows] int32
    logprobs: Array  # [rows] float32: log p(token)
    top_ids: Array  # [rows, TOP_LOGPROBS] int32: the most likely tokens
    top_logprobs: Array  # [rows, TOP_LOGPROBS] float32


def make_sampling(temperature: float, top_k: int, top_p: float, seed: int) -> SlotSampling:
    """Settings of one request as a 1-row SlotSampling (host arrays)."""
    import numpy as np

    greedy = temperature == 0
    key_data = np.asarray(jax.random.key_data(jax.random.key(seed)))
    return SlotSampling(greedy=np.array([greedy]), temperature=np.array([1.0 if greedy else temperature],
                                                                       np.float32),
                        top_k=np.array([top_k], np.int32), top_p=np.array([top_p], np.float32),
                        tail_cutoff=np.array([1.0 - top_p], np.float32), key_data=key_data[None])


def filter_rows(logits: Array, sampling: SlotSampling) -> Array:
    """`generate.filter_logits` with per-row top_k/top_p: logits [rows, vocab] float32."""
    vocab = logits.shape[-1]
    descending = -jnp.sort(-logits, axis=-1)  # [rows, vocab]
    k = jnp.where(sampling.top_k > 0, sampling.top_k, vocab)
    kth_largest = jnp.take_along_axis(descending, (k - 1)[:, None], axis=-1)  # [rows, 1]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    sorted_logits = jnp.sort(logits, axis=-1)  # [rows, vocab] ascending
    tail_mass = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    dropped = tail_mass <= sampling.tail_cutoff[:, None]
    num_dropped = jnp.minimum(jnp.sum(dropped, axis=-1, keepdims=True), vocab - 1)
    threshold = jnp.take_along_axis(sorted_logits, num_dropped, axis=-1)  # [rows, 1]
    nucleus = jnp.where(logits < threshold, -jnp.inf, logits)
    return jnp.where((sampling.top_p < 1)[:, None], nucleus, logits)


def sample_rows(logits: Array, sampling: SlotSampling, steps: Array) -> StepOutput:
    """Next token of each row (logits [rows, vocab], steps [rows]) and its log-probabilities."""

    def draw(logits):
        scaled = filter_rows(logits / sampling.temperature[:, None], sampling)

        def one_row(key_data, step, row_logits):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key_data), step), 0)
            return jax.random.categorical(key, row_logits)

        sampled = jax.vmap(one_row)(sampling.key_data, steps, scaled)
        return jnp.where(sampling.greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)

    # Greedy-only batches (the common serving case) skip the two vocabulary sorts.
    tokens = jax.lax.cond(jnp.all(sampling.greedy),
                          lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), draw, logits)
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # [rows, vocab]
    top_logprobs, top_ids = jax.lax.top_k(log_probs, TOP_LOGPROBS)
    chosen = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
    return StepOutput(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)


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
        self.decode_config = decoding_config(config)
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
        self._decode = jax.jit(self._decode_slots, donate_argnums=(1,), static_argnums=(2,))

    @contextlib.contextmanager
    def _context(self, rules: Rules | None) -> Iterator[None]:
        if self.mesh is None:
            yield
            return
        with self.mesh, nn.logical_axis_rules(rules):
            yield

    # ---- host-facing calls ------------------------------------------------------------------

    def place_params(self, params: Any) -> Any:
        """Params on device(s) in the decoding layout (per-layer `layers_N`), sharded under a mesh."""
        if self.mesh is None:
            params = jax.device_put(params)
        else:
            from llamax.sharding import param_shardings
            params = jax.device_put(params, param_shardings(self.config, self.mesh, self.rules))
        with self._context(self.rules):
            return jax.jit(functools.partial(unstack_layers, self.config))(params)

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

    def decode(self, params: Any, batch: SlotBatch, rows: int | None = None) -> tuple[SlotBatch, StepOutput]:
        """One token for each of the first `rows` slots (default all; one executable per value:
        use `row_buckets`). Donates `batch`; rows of idle slots are meaningless."""
        with self._context(self.rules):
            return self._decode(params, batch, rows or self.max_batch)

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
            tail_cutoff=jnp.zeros((slots,), jnp.float32),
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
            {"params": params}, tokens, positions=places, segment_ids=segment_ids, cache=fresh)
        last_logits = jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=True)  # [1, vocab]
        first = sample_rows(last_logits, sampling, jnp.zeros((1,), jnp.int32))

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

    def _decode_slots(self, params, batch: SlotBatch, rows: int):
        # Only the first `rows` slots run: at low load a step costs what its requests need, not
        # what max_batch would. The model writes their keys into the full cache in place and
        # reads just those rows; the rest of the cache is not touched.
        cache = batch.cache
        part = lambda x: x[:rows]  # noqa: E731
        logits, new_cache = Llama(self.decode_config).apply(
            {"params": params}, part(batch.last)[:, None], positions=part(cache.index)[:, None],
            segment_ids=jnp.ones((rows, 1), jnp.int32), cache=cache.replace(index=part(cache.index)))
        active = part(batch.active)
        out = sample_rows(logits[:, 0], jax.tree.map(part, batch.sampling), part(batch.steps))
        # Idle rows keep their index: they never run past the cache however long they idle.
        index = cache.index.at[:rows].set(jnp.where(active, new_cache.index, part(cache.index)))
        steps = batch.steps.at[:rows].add(active.astype(jnp.int32))
        batch = batch.replace(cache=self._constrain(new_cache.replace(index=index)),
                              last=batch.last.at[:rows].set(out.tokens), steps=steps)
        return batch, out
