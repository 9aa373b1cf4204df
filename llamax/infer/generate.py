"""Autoregressive generation: prefill + a jitted decode loop over a preallocated KV cache.

Ragged prompts are left-padded into one batch: padding carries segment id 0 (so no real token
attends to it) and every row gets its own RoPE positions (0, 1, ... from its first real token),
so each prompt continues exactly as it would alone. The decode loop is a `lax.while_loop` that
keeps all tokens on device (one host transfer per call) and exits early once every row has
produced a stop id: `eos_id` or any of `stop_ids` (Llama-3-Instruct ends a turn with `<|eot_id|>`
and a document with `<|end_of_text|>`; pass a tokenizer's `stop_ids`).

With a `stop` callback (stop strings, say) the loop runs in chunks of `check_every` tokens; between
chunks the host asks `stop` about every unfinished row and ends the rows it names, so a batch
whose answers are short does not decode all `max_new_tokens`. Chunking never changes the tokens:
row r's step-s sample always draws with the same key.

Sharded (`mesh=`) generation runs on every process of a multi-process mesh: each process passes
the same prompts and gets every row back.

Compilation is cached per (batch bucket, prompt-length bucket, max_new_tokens, sampler): batch
sizes round up to a power of two and prompt lengths to a power of two (>= 16, then multiples of
256), so prompts of similar length reuse one executable.

Returned sequences follow `transformers.generate` (whose `eos_token_id` may be a list): new
tokens only, up to and *including* the first stop id; nothing after it.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llamax.config import ModelConfig
from llamax.errors import ConfigError
from llamax.infer.checks import all_stop_ids, check_generate_args
from llamax.infer.sampling import Sampler, filter_logits, sample_tokens  # noqa: F401 (re-exported)
from llamax.model import decode_kernels
from llamax.model.kv_cache import CACHE_AXES, KVCache
from llamax.model.llama import Llama, kernels_out_in
from llamax.model.matmul import flat_matmuls_for, runs_on_cpu, runs_on_one_cpu_device
from llamax.model.quantize import model_variables

Array = jax.Array
Rules = Sequence[tuple[str, Any]]
StopFn = Callable[[int, list[int]], bool]

STOP_IDS_BUCKET = 8  # stop-id arrays are padded to a multiple of this, so most share one executable


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries from one step to the next."""

    step: Array  # [] int32: new tokens produced so far
    cache: KVCache
    tokens: Array  # [batch, max_new_tokens] int32 new tokens (-1 = not produced)
    last: Array  # [batch] int32: the token produced at step - 1, fed next
    positions: Array  # [batch] int32: RoPE position of `last`
    done: Array  # [batch] bool: row has produced a stop id (or is batch padding)


# ---- padding ------------------------------------------------------------------------------

def bucket_length(length: int) -> int:
    """Padded prompt length: next power of two >= 16 up to 256, then the next multiple of 256."""
    if length <= 256:
        return max(16, 1 << (length - 1).bit_length())
    return -(-length // 256) * 256


def bucket_batch(batch: int, multiple_of: int = 1) -> int:
    """Padded batch size: next power of two, rounded up to a multiple of `multiple_of`."""
    size = 1 << (batch - 1).bit_length()
    return -(-size // multiple_of) * multiple_of


def left_pad(prompts: Sequence[np.ndarray], length: int, batch: int | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-aligns prompts in a [batch, length] grid.

    Returns (tokens, positions, segment_ids), each [batch, length] int32: padding has token 0,
    position 0 and segment 0; real tokens have positions 0..len-1 and segment 1. Rows past
    len(prompts) (batch padding) hold a single token 0.
    """
    batch = batch or len(prompts)
    tokens = np.zeros((batch, length), np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    for row in range(batch):
        prompt = prompts[row] if row < len(prompts) else np.zeros(1, np.int32)
        tokens[row, length - len(prompt):] = prompt
        segment_ids[row, length - len(prompt):] = 1
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    return tokens, positions, segment_ids


# ---- model calls ----------------------------------------------------------------------------

def decoding_config(config: ModelConfig, kernel_layout: str = "in_out") -> ModelConfig:
    """The same model with unscanned layers (`layers_0`, `layers_1`, ...), no remat, and
    projection kernels in `kernel_layout`.

    Under `lax.while_loop`, a scanned layer stack reads the cache as scan input and writes it as
    scan output, which copies the whole KV cache every step (3x slower decoding at batch 8 on
    CPU); unscanned layers update it in place. 'out_in' kernels make a CPU decode step faster
    but cost a transposed copy of every weight: worth it where params are placed once (the
    serving engine, `llamax.infer.slots`), and per `generate` call from a few rows
    (`decode_kernel_layout`; docs/performance.md, changes 8 and 10).
    """
    return config.replace(scan_layers=False, remat_policy="none", kernel_layout=kernel_layout)


def decoding_params(config: ModelConfig, params: Any, kernel_layout: str = "in_out") -> Any:
    """Params (or int8 params, or their scales) of `config` in the layout of
    `decoding_config(config, kernel_layout)`. Call inside jit: the per-layer slices (and kernel
    transposes) are then made once per call, outside the decode loop."""
    if params is None:  # no int8 scales (`quant`)
        return None
    if config.scan_layers:
        params = dict(params)
        stacked = params.pop("layers")
        for layer in range(config.num_layers):
            params[f"layers_{layer}"] = jax.tree.map(lambda x, i=layer: x[i], stacked)
    if kernel_layout != config.kernel_layout:
        if config.kernel_layout != "in_out":
            raise ValueError(f"no conversion from kernel_layout {config.kernel_layout!r} to {kernel_layout!r}")
        params = kernels_out_in(params)
    return params


def _constrain_cache(buffers: Array | tuple[Array, ...]) -> Array | tuple[Array, ...]:
    """Shards a stacked cache buffer, or each per-layer buffer, by CACHE_AXES."""
    if isinstance(buffers, tuple):  # per layer: [batch, kv_heads, length, head_dim]
        return tuple(nn.with_logical_constraint(b, CACHE_AXES[1:]) for b in buffers)
    return nn.with_logical_constraint(buffers, CACHE_AXES)


def decode_compiler_options(mesh: jax.sharding.Mesh | None = None,
                            kernel_layout: str = "in_out") -> dict[str, str] | None:
    """XLA options for programs that decode (a few rows per step) on the mesh's platform. On CPU
    a decode step's dots are thin ([batch <= 16, embed] @ [embed, out]): with [inputs, outputs]
    kernels Eigen runs them faster than the YNNPACK fusions XLA picks by default (AMD EPYC, bench
    preset, batch 8: 15.2 vs 17.4 ms per step), while a train step's large dots gain from YNNPACK
    (3.55 vs 3.77 s). [outputs, inputs] kernels run faster with YNNPACK: they keep the default
    (docs/performance.md, changes 8 and 10)."""
    return {"xla_cpu_experimental_ynn_fusion_type": ""} if runs_on_cpu(mesh) and kernel_layout == "in_out" else None


# From this many rows (the bucketed batch) a CPU `generate` decodes with [outputs, inputs] kernels
# where the CPU decode kernel does not apply.
OUT_IN_MIN_ROWS = 4


def uses_decode_kernels(mesh: jax.sharding.Mesh | None, rows: int, config: ModelConfig | None = None) -> bool:
    """Whether a CPU decode program of `rows` rows (the bucketed batch) computes its projections
    with the CPU decode kernels (`llamax.model.decode_kernels`): one CPU device, float32 compute
    (`config`, when given; the kernels read float32, bfloat16 and int8 weights), at most
    THIN_MAX_ROWS rows, and the kernels built."""
    float32 = config is None or config.compute_dtype == jnp.float32
    return (runs_on_one_cpu_device(mesh) and float32 and rows <= decode_kernels.THIN_MAX_ROWS
            and decode_kernels.available())


def decode_kernel_layout(mesh: jax.sharding.Mesh | None, rows: int, config: ModelConfig | None = None) -> str:
    """The kernel layout `generate` decodes `rows` rows with: the trained 'in_out' where the CPU
    decode kernels take the products (`uses_decode_kernels`) or below OUT_IN_MIN_ROWS rows, else
    'out_in' on CPU. Without the kernels, Intel Xeon (family 6 model 167), bench preset, 128 new
    tokens, tokens/s in_out + Eigen -> out_in + YNNPACK: 2 rows 274 -> 237, 4 rows 418 -> 452,
    8 rows 517 -> 649, 16 rows 790 -> 870; 1 row 200-215 -> 160 (docs/performance.md, change 10).
    The conversion (one transposed copy of every kernel per call) is inside those figures."""
    if uses_decode_kernels(mesh, rows, config):
        return "in_out"
    return "out_in" if runs_on_cpu(mesh) and rows >= OUT_IN_MIN_ROWS else "in_out"


def with_decode_kernels(fn: Callable, mesh: jax.sharding.Mesh | None) -> Callable:
    """`fn`, traced with the CPU decode kernels on where its programs run on one CPU device
    (`project` then takes them for float32 products of few rows, `attend_step` in float32)."""
    enabled = runs_on_one_cpu_device(mesh)

    @functools.wraps(fn)
    def traced(*args):
        with decode_kernels.decode_kernels(enabled):
            return fn(*args)

    return traced


def prefill(config: ModelConfig, params: Any, tokens: Array, positions: Array, segment_ids: Array,
            cache_length: int, *, quant: Any = None, last_only: bool = False) -> tuple[Array, KVCache]:
    """Runs the left-padded prompts [batch, prompt_len] through a fresh cache of `cache_length`.

    Returns (logits [batch, prompt_len, vocab], cache with index = prompt_len); with `last_only`,
    the last position's logits [batch, vocab] alone (the others are never computed).
    """
    cache = KVCache.create(config, tokens.shape[0], cache_length, per_layer=not config.scan_layers)
    cache = cache.replace(key=_constrain_cache(cache.key), value=_constrain_cache(cache.value))
    last = jnp.full((tokens.shape[0],), tokens.shape[1] - 1, jnp.int32) if last_only else None  # left padding
    logits, cache = Llama(config).apply(model_variables(params, quant), tokens, positions=positions,
                                        segment_ids=segment_ids, cache=cache, logits_at=last)
    return (logits[:, 0] if last_only else logits), cache


def decode_step(config: ModelConfig, params: Any, tokens: Array, positions: Array,
                cache: KVCache, *, quant: Any = None) -> tuple[Array, KVCache]:
    """Feeds one token per row (tokens, positions: [batch]); returns (logits [batch, vocab], cache)."""
    logits, cache = Llama(config).apply(
        model_variables(params, quant), tokens[:, None], positions=positions[:, None],
        segment_ids=jnp.ones_like(tokens)[:, None], cache=cache)
    return logits[:, 0], cache


def _is_stop(token: Array, stop_ids: Array) -> Array:
    """[batch] bool: whether each token (tokens: [batch]) is one of stop_ids ([num_stop], -1 pads)."""
    return jnp.any(token[:, None] == stop_ids[None, :], axis=-1)


def _start(config: ModelConfig, sampler: Sampler, max_new_tokens: int, params: Any, tokens: Array,
           positions: Array, segment_ids: Array, num_real: Array, key: Array, temperature: Array,
           stop_ids: Array) -> DecodeState:
    """Prefill and sample the first new token."""
    batch, prompt_len = tokens.shape
    logits, cache = prefill(config, params[0], tokens, positions, segment_ids, prompt_len + max_new_tokens,
                            quant=params[1], last_only=True)  # params: (params, int8 scales or None)
    first = sample_tokens(logits, jax.random.fold_in(key, 0), temperature, sampler)
    padding_row = jnp.arange(batch) >= num_real
    out = jnp.full((batch, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
    return DecodeState(step=jnp.ones((), jnp.int32), cache=cache, tokens=out, last=first,
                       positions=positions[:, -1] + 1, done=padding_row | _is_stop(first, stop_ids))


def _advance(config: ModelConfig, sampler: Sampler, params: Any, state: DecodeState, key: Array,
             temperature: Array, stop_ids: Array) -> DecodeState:
    """One decode step: feed `last`, sample the next token; finished rows record -1."""
    logits, cache = decode_step(config, params[0], state.last, state.positions, state.cache, quant=params[1])
    token = sample_tokens(logits, jax.random.fold_in(key, state.step), temperature, sampler)
    recorded = jnp.where(state.done, -1, token)
    out = jax.lax.dynamic_update_slice(state.tokens, recorded[:, None], (0, state.step))
    return DecodeState(step=state.step + 1, cache=cache, tokens=out, last=token,
                       positions=state.positions + 1, done=state.done | _is_stop(token, stop_ids))


@functools.lru_cache(maxsize=64)
def _compiled_generate(config: ModelConfig, sampler: Sampler, max_new_tokens: int,
                       mesh: Any, rules: Any, kernel_layout: str = "in_out"):
    """The jitted prefill + while_loop; one per static key (jit adds one executable per shape)."""

    def run(params, tokens, positions, segment_ids, num_real, key_data, temperature, stop_ids):
        decode_config = decoding_config(config, kernel_layout)
        params = tuple(decoding_params(config, w, kernel_layout) for w in params)
        key = jax.random.wrap_key_data(key_data)
        state = _start(decode_config, sampler, max_new_tokens, params, tokens, positions, segment_ids,
                       num_real, key, temperature, stop_ids)
        state = jax.lax.while_loop(
            lambda s: (s.step < max_new_tokens) & ~jnp.all(s.done),
            lambda s: _advance(decode_config, sampler, params, s, key, temperature, stop_ids), state)
        return state.tokens

    return jax.jit(with_decode_kernels(run, mesh), out_shardings=_replicated(mesh),
                   compiler_options=decode_compiler_options(mesh, kernel_layout))


@functools.lru_cache(maxsize=64)
def _compiled_stream(config: ModelConfig, sampler: Sampler, max_new_tokens: int, mesh: Any, rules: Any,
                     kernel_layout: str = "in_out"):
    """(to_decoding, start, advance, extend, peek): the decode loop in pieces. Params are converted to
    the decoding layout once per call; `extend` runs the loop up to a given step; `peek` copies
    (step, tokens, done) to every process."""
    decode_config = decoding_config(config, kernel_layout)
    to_decoding = jax.jit(lambda weights: tuple(decoding_params(config, w, kernel_layout)
                                                for w in weights))  # (params, quant)

    def start(params, tokens, positions, segment_ids, num_real, key_data, temperature, stop_ids):
        return _start(decode_config, sampler, max_new_tokens, params, tokens, positions, segment_ids,
                      num_real, jax.random.wrap_key_data(key_data), temperature, stop_ids)

    def advance(params, state, key_data, temperature, stop_ids):
        return _advance(decode_config, sampler, params, state, jax.random.wrap_key_data(key_data),
                        temperature, stop_ids)

    def extend(params, state, until_step, stopped, key_data, temperature, stop_ids):
        state = state.replace(done=state.done | stopped)  # rows the host ended (stop strings)
        return jax.lax.while_loop(lambda s: (s.step < until_step) & ~jnp.all(s.done),
                                  lambda s: advance(params, s, key_data, temperature, stop_ids), state)

    peek = jax.jit(lambda state: (state.step, state.tokens, state.done), out_shardings=_replicated(mesh))
    options = decode_compiler_options(mesh, kernel_layout)
    start, advance, extend = (with_decode_kernels(fn, mesh) for fn in (start, advance, extend))
    return (to_decoding, jax.jit(start, compiler_options=options),
            jax.jit(advance, donate_argnums=(1,), compiler_options=options),
            jax.jit(extend, donate_argnums=(1,), compiler_options=options), peek)


# ---- public API -----------------------------------------------------------------------------

def _replicated(mesh: jax.sharding.Mesh | None) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def _on_mesh(value: np.ndarray, mesh: jax.sharding.Mesh | None) -> Any:
    """A host value every process holds alike, as a global replicated array when the mesh spans
    several processes (jit refuses host arrays there); unchanged otherwise."""
    if mesh is None or jax.process_count() == 1:
        return value
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, _replicated(mesh), lambda index: value[index])


def _stop_array(stops: Sequence[int]) -> np.ndarray:
    """[k * STOP_IDS_BUCKET] int32: the stop ids padded with -1 (a token no model produces)."""
    size = max(1, -(-len(stops) // STOP_IDS_BUCKET)) * STOP_IDS_BUCKET
    array = np.full(size, -1, np.int32)
    array[:len(stops)] = stops
    return array


def _prepare(config, params, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_id,
             stop_ids, mesh, rules, quant=None):
    """Shared setup of generate/generate_stream: checks, static key, padded device inputs."""
    arrays = check_generate_args(config, prompts, max_new_tokens, temperature, top_k, top_p, eos_id,
                                 stop_ids)
    stops = all_stop_ids(eos_id, stop_ids)
    sampler = Sampler(greedy=temperature == 0, top_k=None if temperature == 0 else top_k,
                      top_p=None if temperature == 0 or top_p == 1 else top_p)
    data_parallel = 1
    if mesh is not None:
        from llamax.sharding import LOGICAL_AXIS_RULES, mesh_axis_size
        rules = tuple(tuple(rule) for rule in (LOGICAL_AXIS_RULES if rules is None else rules))
        data_parallel = mesh_axis_size(mesh, nn.logical_to_mesh_axes(("batch",), rules)[0])
        params = jax.device_put(params, _param_shardings(config, mesh, rules))
        quant = None if quant is None else jax.device_put(quant, _replicated(mesh))
    else:
        params, quant = jax.device_put((params, quant))
        rules = None
    batch = bucket_batch(len(arrays), data_parallel)
    length = bucket_length(max(len(a) for a in arrays))
    host = (*left_pad(arrays, length, batch), np.int32(len(arrays)),
            np.asarray(jax.random.key_data(jax.random.key(seed))), np.float32(temperature or 1.0),
            _stop_array(stops))
    return sampler, mesh, rules, ((params, quant), *(_on_mesh(value, mesh) for value in host)), stops


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh | None, rules: Rules | None) -> Iterator[None]:
    """`with mesh, nn.logical_axis_rules(rules)` when sharded; nothing otherwise. Either way the
    model's products take the form of the devices the program is built for (`flat_matmuls_for`)."""
    if mesh is None:
        yield
        return
    with mesh, nn.logical_axis_rules(rules), flat_matmuls_for(mesh):
        yield


@functools.lru_cache(maxsize=16)
def _param_shardings(config: ModelConfig, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    from llamax.sharding import param_shardings  # only sharded generation needs it
    return param_shardings(config, mesh, rules)


def generate(config: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, eos_id: int | None = None, stop_ids: Sequence[int] = (),
             stop: StopFn | None = None, check_every: int = 16, mesh: jax.sharding.Mesh | None = None,
             rules: Rules | None = None, quant: Any = None) -> list[list[int]]:
    """Continues each prompt by up to `max_new_tokens` tokens.

    Args:
      config, params: the model (params as from `init_params`/`load_hf`; pass device arrays to
        avoid a host-to-device copy per call).
      prompts: token-id lists of any lengths (include <s> yourself).
      max_new_tokens: tokens to generate per prompt (fewer if a stop id comes first).
      temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature).
      top_k, top_p: keep only the k likeliest tokens / the smallest nucleus of probability
        >= top_p before sampling (ignored when greedy).
      seed: sampling seed; the same seed, prompts and settings give the same samples.
      eos_id: stop a row once it produces this token (the token is returned).
      stop_ids: more ids that stop a row, like eos_id (pass `tokenizer.stop_ids`: Llama-3-Instruct
        ends turns with `<|eot_id|>`, ChatML models with `<|im_end|>`).
      stop: `stop(row, new_tokens) -> bool`, asked on the host every `check_every` tokens about
        each unfinished row (its new tokens so far); True ends that row. The row's result is
        what it had generated by then (up to `check_every - 1` tokens past the point `stop`
        looks for: cut them yourself, e.g. at the stop string).
      mesh, rules: run sharded: params are placed by the logical-axis `rules` (default
        `llamax.sharding.LOGICAL_AXIS_RULES`) and the batch is split over the data axes.
      quant: the int8 scales of params quantized by `llamax.model.quantize.quantize_weights`.

    Returns:
      The new tokens of each prompt, in order: up to and including the first stop id.
    """
    if stop is not None and (isinstance(check_every, bool) or not isinstance(check_every, int)
                             or check_every < 1):
        raise ConfigError(f"check_every must be a positive integer, got {check_every!r}")
    sampler, mesh, rules, dynamic, stops = _prepare(config, params, prompts, max_new_tokens, temperature,
                                                    top_k, top_p, seed, eos_id, stop_ids, mesh, rules, quant)
    with sharding_context(mesh, rules):
        layout = decode_kernel_layout(mesh, dynamic[1].shape[0], config)  # the bucketed batch
        if stop is None:
            tokens = _compiled_generate(config, sampler, max_new_tokens, mesh, rules, layout)(*dynamic)
            tokens = np.asarray(jax.device_get(tokens))  # [batch, max_new_tokens]; the one host sync
        else:
            tokens = _generate_in_chunks(config, sampler, max_new_tokens, mesh, rules, dynamic,
                                         len(prompts), stops, stop, check_every, layout)
    return [_until_stop(row, stops) for row in tokens[:len(prompts)]]


def _generate_in_chunks(config, sampler, max_new_tokens, mesh, rules, dynamic, num_prompts, stops,
                        stop, check_every, kernel_layout) -> np.ndarray:
    """The decode loop `check_every` steps at a time; between chunks `stop` ends rows on the host."""
    to_decoding, start, _, extend, peek = _compiled_stream(config, sampler, max_new_tokens, mesh, rules,
                                                           kernel_layout)
    params, key_temperature_stops = to_decoding(dynamic[0]), dynamic[5:]
    state = start(params, *dynamic[1:])
    stopped = np.zeros(dynamic[1].shape[0], bool)  # [batch] rows ended by `stop`
    step = 1
    while True:
        until = min((step // check_every + 1) * check_every, max_new_tokens)  # the next multiple: > step
        state = extend(params, state, _on_mesh(np.int32(until), mesh), _on_mesh(stopped, mesh),
                       *key_temperature_stops)
        step, tokens, done = (np.asarray(x) for x in jax.device_get(peek(state)))
        for row in range(num_prompts):
            if not (done[row] or stopped[row]):
                stopped[row] = bool(stop(row, _until_stop(tokens[row], stops)))
        if step >= max_new_tokens or np.all(done | stopped):
            return tokens


def _until_stop(row: np.ndarray, stops: Sequence[int]) -> list[int]:
    """The produced tokens of one row, cut after its first stop id."""
    row = row[row >= 0].tolist()
    ends = [index for index, token in enumerate(row) if token in stops]
    return row[:ends[0] + 1] if ends else row


def generate_stream(config: ModelConfig, params: Any, prompt: Sequence[int], max_new_tokens: int,
                    *, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int = 0, eos_id: int | None = None,
                    stop_ids: Sequence[int] = (), mesh: jax.sharding.Mesh | None = None,
                    rules: Rules | None = None, quant: Any = None) -> Iterator[int]:
    """Like `generate` for one prompt, but yields each new token as soon as it is sampled.

    Syncs with the host once per token (use `generate` for throughput). With the same arguments
    it yields exactly `generate(config, params, [prompt], ...)[0]`.
    """
    sampler, mesh, rules, dynamic, stops = _prepare(config, params, [prompt], max_new_tokens, temperature,
                                                    top_k, top_p, seed, eos_id, stop_ids, mesh, rules, quant)
    to_decoding, start, advance, _, _ = _compiled_stream(config, sampler, max_new_tokens, mesh, rules)
    key, temperature_, stop_array = dynamic[5:]
    with sharding_context(mesh, rules):  # entered per call: the caller runs between yields
        params = to_decoding(dynamic[0])
        state = start(params, *dynamic[1:])
    for step in range(max_new_tokens):
        if step:
            with sharding_context(mesh, rules):
                state = advance(params, state, key, temperature_, stop_array)
        token = int(state.last[0])  # the per-token host sync
        yield token
        if token in stops:
            return
