"""Perplexity: summed token NLL over batches, divided by the number of scored tokens.

    result = evaluate_perplexity(config, params, batches)  # {'loss', 'perplexity', 'tokens'}

Batches follow the train-step contract (`llamax.train.step`): only targets with `loss_mask` > 0 count,
so padding rows, document ends, the cut between the pieces of a document split across rows and
SFT prompt tokens are never scored, and packed documents never attend to each other
(`segment_ids`). `loss` is the mean NLL in nats per scored token; perplexity = exp(loss).
Weight-only int8 params are evaluated with their scales: `evaluate_perplexity(..., quant=quant)`
(`llamax.model.quantize`); bfloat16 params need nothing more.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax

from llamax.config import ModelConfig
from llamax.sharding import to_global_batch
from llamax.errors import DataError
from llamax.sharding import (LOGICAL_AXIS_RULES, MeshConfig, Rules, batch_sharding, make_mesh,
                             param_shardings)
from llamax.train.setup import make_eval_step

Batch = dict[str, Any]
MAX_LOG_PERPLEXITY = 80.0  # exp(80) ~ 5e34: keeps an untrained model's perplexity finite


def sum_eval(eval_step: Callable[..., dict], params: Any, batches: Iterable[Batch],
             sharding: jax.sharding.NamedSharding, frozen: Any = None) -> dict[str, float]:
    """Every value `eval_step` returns, summed over host batches in float64 on the host (long
    evaluations do not lose precision); an objective's `summarize` turns them into metrics."""
    totals: dict[str, float] = {}
    for batch in batches:
        global_batch = to_global_batch(batch, sharding)
        args = (params, global_batch) if frozen is None else (params, global_batch, frozen)
        for key, value in jax.device_get(eval_step(*args)).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def sum_nll(eval_step: Callable[..., dict], params: Any, batches: Iterable[Batch],
            sharding: jax.sharding.NamedSharding, frozen: Any = None) -> tuple[float, float]:
    """(total NLL, total scored tokens) of a cross-entropy `eval_step`
    (`llamax.train.setup.make_eval_step`) over host batches."""
    totals = sum_eval(eval_step, params, batches, sharding, frozen)
    return totals.get("loss_sum", 0.0), totals.get("scored_tokens", 0.0)


def summarize(loss_sum: float, tokens: float) -> dict[str, float]:
    """{'loss': mean NLL per scored token, 'perplexity': exp(loss), 'tokens'}; {} without tokens."""
    if tokens == 0:
        return {}
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, MAX_LOG_PERPLEXITY)), "tokens": tokens}


def evaluate_perplexity(config: ModelConfig, params: Any, batches: Iterable[Batch],
                        mesh: jax.sharding.Mesh | None = None,
                        rules: Rules | None = None, quant: Any = None) -> dict[str, float]:
    """Perplexity of `params` on host batches of `[batch, seq]` arrays (see the module docstring).

    Args:
      config: the model's config.
      params: params pytree (numpy or jax arrays); placed on the mesh here.
      batches: iterable of batch dicts (tokens, targets, loss_mask[, positions, segment_ids]),
        e.g. an evaluation `llamax.data.loader.make_loader(..., num_epochs=1, shuffle=False)`.
      mesh: default: FSDP over all devices (the batch size must be a multiple of their number).
      rules: logical axis rules (default `LOGICAL_AXIS_RULES`).
      quant: the int8 scales of params from `llamax.model.quantize.quantize_weights`.

    Returns:
      {'loss', 'perplexity', 'tokens'}; raises DataError if no token was scored.
    """
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    mesh = make_mesh(MeshConfig()) if mesh is None else mesh
    placed = jax.device_put(params, param_shardings(config, mesh, rules))
    # int8: the scales ride as the step's frozen argument (`make_trainable(quantized=True)`).
    eval_step = make_eval_step(config, mesh, rules, quantized=quant is not None)
    result = summarize(*sum_nll(eval_step, placed, batches, batch_sharding(mesh, rules), quant))
    if not result:
        raise DataError("no scored tokens in the evaluation batches (every loss_mask is 0); "
                         "check the data is not empty and seq_len >= 2")
    return result

