"""Loglikelihood of continuations, batched and sharded: the arithmetic behind lm-eval requests.

    scorer = SequenceScorer(config, mesh, batch_size=8)
    params = scorer.place(params)
    results = scorer.score(params, [(context, continuation), ...])  # [(log p, is_greedy), ...]

The result of a request (two token lists, the context non-empty) is the summed log-probability
of the continuation given the context (float32 log-softmax of float32 logits, as lm-eval's hf
backend computes it) and whether greedy decoding would produce exactly the continuation.

Two batched paths, each compiled once per bucketed shape (`llamax.infer.generate.bucket_length`)
with a fixed number of rows, split over the mesh's data axes:

  flat    context + continuation as one right-padded row; used for requests whose context is
          their own (rolling windows, generation-free QA scoring)
  shared  several continuations of one context (the choices of a multiple-choice question): the
          context is run once into a KV cache (left-padded, like generation's prefill), the last
          context logit scores every continuation's first token, and the continuations run
          against copies of that cache. A 4-choice question costs one context instead of four;
          one-token continuations (MMLU's letters) cost the context alone.

Equal requests are scored once. On a multi-process mesh every process must pass the same
requests (`llamax.infer.lm_eval_backend` gathers them) and gets every result. Memory: the
logits of one batch (rows x length x vocab float32) are materialised.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llamax.config import ModelConfig
from llamax.errors import ConfigError, DataError
from llamax.infer.generate import bucket_length, left_pad
from llamax.model.kv_cache import CACHE_AXES, KVCache
from llamax.model.llama import Llama
from llamax.model.matmul import flat_matmuls_for
from llamax.model.quantize import model_variables
from llamax.sharding import (LOGICAL_AXIS_RULES, MeshConfig, Rules, batch_sharding, data_parallel_size,
                             make_mesh, param_shardings)

Array = jax.Array
Request = tuple[Sequence[int], Sequence[int]]  # (context tokens, continuation tokens)


def _target_scores(logits: Array, targets: Array) -> tuple[Array, Array]:
    """(log p(target), target is the argmax), both [...]: logits [..., vocab], targets [...]."""
    safe = jnp.maximum(targets, 0)  # -1 marks padding; its score is masked by the caller
    target_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets


def score_flat(config: ModelConfig, params: Any, tokens: Array, targets: Array, scored: Array,
               segment_ids: Array, quant: Any = None) -> tuple[Array, Array]:
    """(summed log-prob [batch], all-greedy [batch]) of the `scored` targets of right-padded rows.

    tokens, targets, segment_ids: [batch, length] int32 (segment 0 = padding); scored: [batch,
    length] bool, True where targets[b, t] is a continuation token predicted at position t.
    quant: int8 scales (`llamax.model.quantize`).
    """
    logits = Llama(config).apply(model_variables(params, quant), tokens,
                                 segment_ids=segment_ids)  # [batch, length, vocab]
    log_prob, greedy = _target_scores(logits, targets)  # [batch, length]
    return (jnp.sum(jnp.where(scored, log_prob, 0.0), axis=-1),
            jnp.all(jnp.where(scored, greedy, True), axis=-1))


def score_shared(config: ModelConfig, params: Any, context: Array, positions: Array, segment_ids: Array,
                 firsts: Array, inputs: Array, targets: Array, quant: Any = None) -> tuple[Array, Array]:
    """(summed log-prob [groups, choices], all-greedy [groups, choices]) of continuations that
    share their group's context.

    context, positions, segment_ids: [groups, ctx_len] left-padded contexts; firsts: [groups,
    choices] first continuation tokens (-1: no such choice); inputs, targets: [groups, choices,
    cont_len] the rest of each continuation, as model inputs and the tokens they predict (-1 =
    padding); cont_len may be 0 (one-token continuations).
    """
    groups, ctx_len = context.shape
    choices, cont_len = inputs.shape[1:]
    cache = KVCache.create(config, groups, ctx_len + cont_len)
    cache = cache.replace(key=nn.with_logical_constraint(cache.key, CACHE_AXES),
                          value=nn.with_logical_constraint(cache.value, CACHE_AXES))
    logits, cache = Llama(config).apply(model_variables(params, quant), context, positions=positions,
                                        segment_ids=segment_ids, cache=cache)  # [groups, ctx_len, vocab]
    last = jnp.broadcast_to(logits[:, -1:], (groups, choices, logits.shape[-1]))  # [groups, choices, vocab]
    total, greedy = _target_scores(last, firsts)  # [groups, choices]
    if cont_len == 0:
        return total, greedy
    # Every choice continues its own copy of the context's cache, at the positions after it.
    copies = cache.replace(key=jnp.repeat(cache.key, choices, axis=1), value=jnp.repeat(cache.value, choices, axis=1),
                           segment_ids=jnp.repeat(cache.segment_ids, choices, axis=0))
    copies = copies.replace(key=nn.with_logical_constraint(copies.key, CACHE_AXES),
                            value=nn.with_logical_constraint(copies.value, CACHE_AXES))
    after = positions[:, -1:] + 1 + jnp.arange(cont_len)  # [groups, cont_len]
    rows = groups * choices
    logits, _ = Llama(config).apply(
        model_variables(params, quant), inputs.reshape(rows, cont_len), positions=jnp.repeat(after, choices, axis=0),
        segment_ids=jnp.ones((rows, cont_len), jnp.int32), cache=copies)  # [rows, cont_len, vocab]
    log_prob, is_argmax = _target_scores(logits, targets.reshape(rows, cont_len))  # [rows, cont_len]
    real = targets.reshape(rows, cont_len) >= 0
    total = total + jnp.sum(jnp.where(real, log_prob, 0.0), axis=-1).reshape(groups, choices)
    greedy = greedy & jnp.all(jnp.where(real, is_argmax, True), axis=-1).reshape(groups, choices)
    return total, greedy


@functools.lru_cache(maxsize=16)
def _compiled(config: ModelConfig, mesh: jax.sharding.Mesh, rules: Rules):
    """(flat, shared): `score_flat` and `score_shared` jitted for one model on one mesh (shared by
    every scorer of them; jit adds one executable per batch shape). Both take (params, quant)."""
    def traced(fn):
        def run(weights, *arrays):
            with nn.logical_axis_rules(rules), flat_matmuls_for(mesh):
                return fn(config, weights[0], *arrays, quant=weights[1])
        return run

    rows, replicated = batch_sharding(mesh, rules), NamedSharding(mesh, PartitionSpec())
    shardings = (param_shardings(config, mesh, rules), replicated)  # int8 scales: small, replicated
    flat = jax.jit(traced(score_flat), in_shardings=(shardings, rows, rows, rows, rows),
                   out_shardings=(replicated, replicated))
    shared = jax.jit(traced(score_shared), in_shardings=(shardings, *[rows] * 6),
                     out_shardings=(replicated, replicated))
    return flat, shared


class SequenceScorer:
    """Scores requests on a mesh; see the module docstring.

    Args:
      config: the model.
      mesh: where to run (default: FSDP over every device).
      rules: logical-axis rules (default `LOGICAL_AXIS_RULES`).
      batch_size: rows per batch, rounded up to a multiple of the data-parallel size.
      max_length: the longest model input (context + continuation - 1) accepted.
    """

    def __init__(self, config: ModelConfig, mesh: jax.sharding.Mesh | None = None,
                 rules: Rules | None = None, batch_size: int = 8, max_length: int | None = None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.config = config.replace(remat_policy="none")  # forward only: nothing to rematerialize
        self.mesh = make_mesh(MeshConfig()) if mesh is None else mesh
        self.rules = tuple(tuple(rule) for rule in (LOGICAL_AXIS_RULES if rules is None else rules))
        self.data_parallel = data_parallel_size(self.mesh, self.rules)
        self.batch_rows = self._round(batch_size)
        self.max_length = max_length or config.max_position_embeddings
        self.param_shardings = param_shardings(self.config, self.mesh, self.rules)
        self._rows = batch_sharding(self.mesh, self.rules)

    def _round(self, rows: int) -> int:
        return -(-rows // self.data_parallel) * self.data_parallel

    def place(self, params: Any) -> Any:
        """The params sharded on the mesh (a no-op for params already placed so)."""
        return jax.device_put(params, self.param_shardings)

    def score(self, params: Any, requests: Sequence[Request], quant: Any = None) -> list[tuple[float, bool]]:
        """[(summed log-prob of the continuation given the context, is_greedy)] per request.

        DataError if a context is empty, a continuation is empty, or context + continuation is
        longer than max_length + 1 tokens.
        """
        unique: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        for index, (context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise DataError(f"request {index} has {len(context)} context and {len(continuation)} "
                                "continuation tokens; both need at least one")
            if len(context) + len(continuation) - 1 > self.max_length:
                raise DataError(f"request {index} has {len(context) + len(continuation)} tokens: the "
                                f"model would read {len(context) + len(continuation) - 1} > "
                                f"max_length={self.max_length}")
        slots = [unique.setdefault((tuple(c), tuple(k)), len(unique)) for c, k in requests]
        by_context: dict[tuple[int, ...], list[int]] = {}
        for index, (context, _) in enumerate(unique):
            by_context.setdefault(context, []).append(index)
        keys = list(unique)
        shared = [group for group in by_context.values() if len(group) > 1]
        flat = [group[0] for group in by_context.values() if len(group) == 1]
        flat_fn, shared_fn = _compiled(self.config, self.mesh, self.rules)
        pending = []  # every batch is dispatched before the first result is read back
        with self.mesh:
            flat.sort(key=lambda i: -len(keys[i][0]) - len(keys[i][1]))  # similar lengths together
            for start in range(0, len(flat), self.batch_rows):
                chunk = flat[start:start + self.batch_rows]
                pending.append(([[i] for i in chunk], flat_fn((params, quant), *self._flat_arrays([keys[i] for i in chunk]))))
            shared.sort(key=lambda group: (-len(keys[group[0]][0]), -len(group)))
            width = 1 << (max((len(group) for group in shared), default=1) - 1).bit_length()  # choices bucket
            groups_per_batch = self._round(max(1, self.batch_rows // width))
            for start in range(0, len(shared), groups_per_batch):
                chunk = shared[start:start + groups_per_batch]
                arrays = self._shared_arrays([[keys[i] for i in group] for group in chunk], groups_per_batch, width)
                pending.append((chunk, shared_fn((params, quant), *arrays)))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(keys)
        for chunk, (log_probs, greedy) in jax.device_get(pending):
            for row, group in enumerate(chunk):
                for choice, index in enumerate(group):
                    at = (row, choice) if np.ndim(log_probs) == 2 else (row,)
                    results[index] = (float(log_probs[at]), bool(greedy[at]))
        return [results[slot] for slot in slots]

    def _global(self, array: np.ndarray) -> Array:
        """A host array (the same on every process) split over the mesh's data axes."""
        return jax.make_array_from_callback(array.shape, self._rows, lambda index: array[index])

    def _flat_arrays(self, requests: list[tuple]) -> list[Array]:
        """Right-padded [batch_rows, bucket] arrays: tokens, targets, scored, segment_ids."""
        length = min(bucket_length(max(len(c) + len(k) for c, k in requests) - 1), self.max_length)
        tokens, targets, segment_ids = (np.zeros((self.batch_rows, length), np.int32) for _ in range(3))
        scored = np.zeros((self.batch_rows, length), bool)
        for row, (context, continuation) in enumerate(requests):
            sequence = [*context, *continuation]
            inputs = len(sequence) - 1
            tokens[row, :inputs], targets[row, :inputs] = sequence[:-1], sequence[1:]
            scored[row, inputs - len(continuation):inputs] = True
            segment_ids[row, :inputs] = 1
        return [self._global(a) for a in (tokens, targets, scored, segment_ids)]

    def _shared_arrays(self, groups: list[list[tuple]], num_groups: int, width: int) -> list[Array]:
        """Left-padded contexts [num_groups, ctx bucket] (+ positions, segments), first tokens
        [num_groups, width] and the continuations' rest [num_groups, width, cont bucket]."""
        contexts = [np.asarray(group[0][0], np.int32) for group in groups]
        context_length = bucket_length(max(len(c) for c in contexts))
        tokens, positions, segment_ids = left_pad(contexts, context_length, num_groups)
        longest = max(len(continuation) for group in groups for _, continuation in group)
        rest = 0 if longest == 1 else bucket_length(longest - 1)
        firsts = np.full((num_groups, width), -1, np.int32)
        inputs = np.zeros((num_groups, width, rest), np.int32)
        targets = np.full((num_groups, width, rest), -1, np.int32)
        for row, group in enumerate(groups):
            for choice, (_, continuation) in enumerate(group):
                firsts[row, choice] = continuation[0]
                inputs[row, choice, :len(continuation) - 1] = continuation[:-1]
                targets[row, choice, :len(continuation) - 1] = continuation[1:]
        return [self._global(a) for a in (tokens, positions, segment_ids, firsts, inputs, targets)]
