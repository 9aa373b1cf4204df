"""Loglikelihood of continuations, batched and sharded: the arithmetic behind lm-eval requests.

    scorer = SequenceScorer(config, mesh, batch_size=8)
    params = scorer.place(params)
    results = scorer.score(params, sequences, num_scored)   # [(log p, is_greedy), ...]

A sequence is context + continuation tokens. The model reads all but its last token and the
last `num_scored` next-token predictions are scored: the result is the summed log-probability
of the continuation given the context (float32 log-softmax, as lm-eval's hf backend computes
it) and whether greedy decoding would have produced exactly the continuation.

Sequences are sorted by length and right-padded into batches of a fixed number of rows and a
bucketed length (`llamax.infer.batching.bucket_length`), so a whole evaluation compiles one
executable per length bucket. The batch is split over the mesh's data axes and the params are
sharded by the logical-axis rules, like training. On a multi-process mesh every process must
pass the same sequences (`llamax.infer.lm_eval_backend` gathers them) and gets every result.
Memory: the logits of one batch, rows x length x vocab float32 values, are materialised.
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
from llamax.infer.batching import bucket_length
from llamax.model.llama import Llama
from llamax.sharding import (LOGICAL_AXIS_RULES, MeshConfig, Rules, batch_sharding, data_parallel_size,
                             make_mesh, param_shardings)

Array = jax.Array


def score_batch(config: ModelConfig, params: Any, tokens: Array, targets: Array, scored: Array,
                segment_ids: Array) -> tuple[Array, Array]:
    """(summed log-prob [batch] float32, all-greedy [batch] bool) of the `scored` targets.

    tokens, targets, segment_ids: [batch, length] int32 (segment 0 = padding); scored: [batch,
    length] bool, True where targets[b, t] is a continuation token predicted at position t.
    """
    logits = Llama(config).apply({"params": params}, tokens, segment_ids=segment_ids)  # [batch, length, vocab]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [batch, length]
    log_prob = target_logit - jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
    greedy = jnp.argmax(logits, axis=-1) == targets  # [batch, length]
    return (jnp.sum(jnp.where(scored, log_prob, 0.0), axis=-1),
            jnp.all(jnp.where(scored, greedy, True), axis=-1))


@functools.lru_cache(maxsize=16)
def _compiled_scorer(config: ModelConfig, mesh: jax.sharding.Mesh, rules: Rules):
    """The jitted `score_batch` of one model on one mesh (shared by every scorer of them; jit
    adds one executable per batch shape)."""
    def run(params, tokens, targets, scored, segment_ids):
        with nn.logical_axis_rules(rules):
            return score_batch(config, params, tokens, targets, scored, segment_ids)

    rows, replicated = batch_sharding(mesh, rules), NamedSharding(mesh, PartitionSpec())
    return jax.jit(run, in_shardings=(param_shardings(config, mesh, rules), rows, rows, rows, rows),
                   out_shardings=(replicated, replicated))


class SequenceScorer:
    """Scores token sequences on a mesh; see the module docstring.

    Args:
      config: the model.
      mesh: where to run (default: FSDP over every device).
      rules: logical-axis rules (default `LOGICAL_AXIS_RULES`).
      batch_size: rows per batch, rounded up to a multiple of the data-parallel size.
      max_length: the longest model input (sequence length - 1) accepted.
    """

    def __init__(self, config: ModelConfig, mesh: jax.sharding.Mesh | None = None,
                 rules: Rules | None = None, batch_size: int = 8, max_length: int | None = None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.config = config.replace(remat_policy="none")  # forward only: nothing to rematerialize
        self.mesh = make_mesh(MeshConfig()) if mesh is None else mesh
        self.rules = tuple(tuple(rule) for rule in (LOGICAL_AXIS_RULES if rules is None else rules))
        data_parallel = data_parallel_size(self.mesh, self.rules)
        self.batch_rows = -(-batch_size // data_parallel) * data_parallel
        self.max_length = max_length or config.max_position_embeddings
        self.param_shardings = param_shardings(self.config, self.mesh, self.rules)
        self._rows = batch_sharding(self.mesh, self.rules)

    def place(self, params: Any) -> Any:
        """The params sharded on the mesh (a no-op for params already placed so)."""
        return jax.device_put(params, self.param_shardings)

    @property
    def _compiled(self):
        return _compiled_scorer(self.config, self.mesh, self.rules)

    def score(self, params: Any, sequences: Sequence[Sequence[int]], num_scored: Sequence[int]
              ) -> list[tuple[float, bool]]:
        """[(summed log-prob of the last num_scored tokens, is_greedy)] per sequence, in order.

        DataError if a sequence is longer than max_length + 1 tokens or scores no token.
        """
        for index, (sequence, count) in enumerate(zip(sequences, num_scored, strict=True)):
            if not 1 <= count < len(sequence):
                raise DataError(f"sequence {index} has {len(sequence)} tokens and asks to score "
                                f"{count}; a scored token needs at least one token before it")
            if len(sequence) - 1 > self.max_length:
                raise DataError(f"sequence {index} has {len(sequence)} tokens: the model would read "
                                f"{len(sequence) - 1} > max_length={self.max_length}")
        # Equal requests are scored once (lm-eval repeats some, e.g. to even out processes).
        unique: dict[tuple[tuple[int, ...], int], int] = {}
        slots = [unique.setdefault((tuple(s), int(c)), len(unique)) for s, c in zip(sequences, num_scored)]
        keys = list(unique)
        order = sorted(range(len(keys)), key=lambda i: -len(keys[i][0]))  # longest first
        pending = []  # every batch is dispatched before the first result is read back
        with self.mesh:
            for start in range(0, len(order), self.batch_rows):
                chunk = order[start:start + self.batch_rows]
                arrays = self._pad([keys[i][0] for i in chunk], [keys[i][1] for i in chunk])
                pending.append((chunk, self._compiled(params, *arrays)))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(keys)
        for chunk, (log_probs, greedy) in jax.device_get(pending):
            for row, index in enumerate(chunk):
                results[index] = (float(log_probs[row]), bool(greedy[row]))
        return [results[slot] for slot in slots]

    def _pad(self, sequences: list[Sequence[int]], num_scored: list[int]) -> list[Array]:
        """Right-padded [batch_rows, bucket] global arrays: tokens, targets, scored, segment_ids."""
        length = min(bucket_length(max(len(s) for s in sequences) - 1), self.max_length)
        tokens = np.zeros((self.batch_rows, length), np.int32)
        targets = np.zeros((self.batch_rows, length), np.int32)
        scored = np.zeros((self.batch_rows, length), bool)
        segment_ids = np.zeros((self.batch_rows, length), np.int32)
        for row, (sequence, count) in enumerate(zip(sequences, num_scored)):
            inputs = len(sequence) - 1
            tokens[row, :inputs] = sequence[:-1]
            targets[row, :inputs] = sequence[1:]
            scored[row, inputs - count:inputs] = True
            segment_ids[row, :inputs] = 1
        return [jax.make_array_from_callback(a.shape, self._rows, lambda index, a=a: a[index])
                for a in (tokens, targets, scored, segment_ids)]
