"""Training objectives: what a step differentiates, as sums over a batch.

    CrossEntropy()       next-token cross-entropy (+ z-loss): pretraining and SFT
    DPO(beta=0.1)        Direct Preference Optimization (Rafailov et al. 2023) on preference pairs

An objective is the one seam between the step functions (`llamax.train.step`) and the loss: the
step asks it for `count(batch)` (what the batch mean divides by: scored tokens, or pairs) and
`sums(model, variables, reference, batch)` (a dict of sums whose 'loss' entry is differentiated),
and turns the summed values into logged metrics with `metrics(sums, count)`. Micro-batches add
their sums and every one divides by the count of the whole batch, so accumulation is exact.

DPO reads preference batches (`llamax.data.preference`): rows of packed pairs where segment
2j-1 is pair j's chosen sequence and segment 2j its rejected one, and `loss_mask` marks the
completion tokens. With `reference='model'` the reference log-probs come from a forward pass of
the frozen reference params (`reference` variables: the starting checkpoint in full fine-tuning,
the base without adapters with LoRA); with `reference='precomputed'` they come from the batch's
`ref_logps` (each sequence's reference log-prob on its first token), so no reference is held.
Metric names are TRL's: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from llamax.errors import ConfigError, check_field_types
from llamax.model.llama import Llama

Array = jax.Array
Batch = dict[str, Array]

DPO_LOSSES = ("sigmoid", "ipo")
DPO_REFERENCES = ("model", "precomputed")
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


def _logits(model: Llama, variables: dict, batch: Batch) -> Array:
    return model.apply(variables, batch["tokens"], positions=batch.get("positions"),
                       segment_ids=batch.get("segment_ids"))  # [batch, seq, vocab] float32


def token_log_probs(logits: Array, targets: Array, loss_mask: Array) -> tuple[Array, Array]:
    """(log p(target) where scored else 0, logsumexp(logits)) per token, both [batch, seq].

    Masked positions give exactly 0 even when their target is out of range (padding)."""
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)  # [batch, seq]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1, mode="clip")[..., 0]
    scored = loss_mask > 0
    return jnp.where(scored, target_logit - log_normalizer, 0.0), log_normalizer


def cross_entropy_sums(logits: Array, targets: Array, loss_mask: Array) -> tuple[Array, Array]:
    """(sum of masked cross-entropy, sum of masked logsumexp^2) over all tokens.

    logits [batch, seq, vocab] float32; targets [batch, seq] int; loss_mask [batch, seq].
    """
    log_probs, log_normalizer = token_log_probs(logits, targets, loss_mask)
    weight = loss_mask.astype(jnp.float32)
    z_term = jnp.where(loss_mask > 0, jnp.square(log_normalizer), 0.0) * weight
    return jnp.sum(-log_probs * weight), jnp.sum(z_term)


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
    """Mean token cross-entropy over `loss_mask`, plus `z_loss_weight` * mean logsumexp^2.

    Logged: loss (cross-entropy alone), z_loss, scored_tokens. Evaluation: loss, perplexity.
    """

    z_loss_weight: float = 0.0

    preference_data = False  # reads packed documents, not preference pairs
    needs_reference_model = False
    batch_keys = ("tokens", "targets", "loss_mask")

    def __post_init__(self):
        check_field_types(self)
        if not self.z_loss_weight >= 0:
            raise ConfigError(f"CrossEntropy.z_loss_weight must be >= 0, got {self.z_loss_weight}")

    def count(self, batch: Batch) -> Array:
        return jnp.sum(batch["loss_mask"].astype(jnp.float32))

    def sums(self, model: Llama, variables: dict, reference: dict | None, batch: Batch) -> dict:
        cross_entropy, z_term = cross_entropy_sums(_logits(model, variables, batch), batch["targets"],
                                                   batch["loss_mask"])
        return {"loss": cross_entropy + self.z_loss_weight * z_term, "cross_entropy": cross_entropy,
                "z_loss": z_term}

    def metrics(self, sums: dict, count: Array) -> dict:
        normalizer = jnp.maximum(count, 1.0)
        return {"loss": sums["cross_entropy"] / normalizer, "z_loss": sums["z_loss"] / normalizer,
                "scored_tokens": count}

    def eval_sums(self, model: Llama, variables: dict, reference: dict | None, batch: Batch) -> dict:
        cross_entropy, _ = cross_entropy_sums(_logits(model, variables, batch), batch["targets"],
                                              batch["loss_mask"])
        return {"loss_sum": cross_entropy, "scored_tokens": self.count(batch)}

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        from llamax.infer.evaluate import summarize

        return summarize(totals.get("loss_sum", 0.0), totals.get("scored_tokens", 0.0))


def sequence_sums(values: Array, segment_ids: Array, max_pairs: int) -> tuple[Array, Array]:
    """Per-pair sums of a [batch, seq] array over a preference batch's segments.

    Returns (chosen, rejected), each [batch, max_pairs]: the sum over segment 2j+1 (chosen) and
    segment 2j+2 (rejected) of each row, for pair j = 0 .. max_pairs-1.
    """
    num_segments = 2 * max_pairs + 1  # 0 = padding, then chosen/rejected alternate
    per_segment = jax.vmap(lambda v, ids: jax.ops.segment_sum(v, ids, num_segments=num_segments))(
        values, segment_ids)  # [batch, 2 * max_pairs + 1]
    return per_segment[:, 1::2], per_segment[:, 2::2]


@dataclasses.dataclass(frozen=True)
class DPO:
    """Direct Preference Optimization on preference batches (see the module docstring).

    beta: strength of the implicit KL penalty; the reward of a sequence is beta * (log pi(y|x) -
      log pi_ref(y|x)).
    loss: 'sigmoid' (the DPO paper's -log sigmoid(beta * margin); with label_smoothing e it is
      the conservative cDPO -(1-e) log sigmoid(m) - e log sigmoid(-m)) or 'ipo' (Azar et al.
      2023: (margin / tokens - 1 / (2 beta))^2 with the log-ratios averaged per completion token,
      as TRL computes it).
    label_smoothing: probability that a preference label is flipped (sigmoid loss only).
    reference: 'model' (a forward of the frozen reference) or 'precomputed' (the batch's
      `ref_logps`; see `llamax.data.preference.precompute_reference_logps`).
    """

    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = "model"

    preference_data = True

    def __post_init__(self):
        check_field_types(self)
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"DPO.beta must be a positive number, got {self.beta!r} (typical: 0.1)")
        if self.loss not in DPO_LOSSES:
            raise ConfigError(f"DPO.loss must be one of {DPO_LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"DPO.label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"DPO.label_smoothing applies to loss='sigmoid' only, not {self.loss!r}")
        if self.reference not in DPO_REFERENCES:
            raise ConfigError(f"DPO.reference must be one of {DPO_REFERENCES}, got {self.reference!r}")

    @property
    def needs_reference_model(self) -> bool:
        return self.reference == "model"

    @property
    def batch_keys(self) -> tuple[str, ...]:
        keys = ("tokens", "targets", "loss_mask", "positions", "segment_ids")
        return keys if self.reference == "model" else (*keys, "ref_logps")

    def count(self, batch: Batch) -> Array:
        """Pairs in the batch: chosen segments (odd ids) counted at their first token."""
        starts = (batch["positions"] == 0) & (batch["segment_ids"] % 2 == 1)
        return jnp.sum(starts.astype(jnp.float32))

    def _pair_values(self, model: Llama, variables: dict, reference: dict | None, batch: Batch) -> dict:
        """Per-pair [batch, max_pairs] log-probs, reference log-probs, lengths and validity."""
        segment_ids, loss_mask = batch["segment_ids"], batch["loss_mask"]
        max_pairs = segment_ids.shape[1] // 2
        sums = lambda values: sequence_sums(values, segment_ids, max_pairs)  # noqa: E731
        log_probs, _ = token_log_probs(_logits(model, variables, batch), batch["targets"], loss_mask)
        chosen, rejected = sums(log_probs * loss_mask)
        if self.reference == "model":
            ref_log_probs, _ = token_log_probs(jax.lax.stop_gradient(_logits(model, reference, batch)),
                                               batch["targets"], loss_mask)
            ref_chosen, ref_rejected = sums(ref_log_probs * loss_mask)
        else:
            ref_chosen, ref_rejected = sums(batch["ref_logps"])
        chosen_tokens, rejected_tokens = sums(loss_mask.astype(jnp.float32))
        starts = ((batch["positions"] == 0) & (segment_ids > 0)).astype(jnp.float32)
        valid, _ = sums(starts)  # 1.0 where pair j exists in the row
        return dict(chosen=chosen, rejected=rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected,
                    chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens, valid=valid)

    def pair_losses(self, chosen: Array, rejected: Array, ref_chosen: Array, ref_rejected: Array,
                    chosen_tokens: Array | None = None, rejected_tokens: Array | None = None) -> Array:
        """The loss of each pair from sequence log-probs (any matching shapes)."""
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if self.loss == "ipo":
            margin = (chosen_ratio / jnp.maximum(chosen_tokens, 1.0)
                      - rejected_ratio / jnp.maximum(rejected_tokens, 1.0))
            return jnp.square(margin - 1.0 / (2.0 * self.beta))
        logits = self.beta * (chosen_ratio - rejected_ratio)
        smoothing = self.label_smoothing
        return -(1.0 - smoothing) * jax.nn.log_sigmoid(logits) - smoothing * jax.nn.log_sigmoid(-logits)

    def sums(self, model: Llama, variables: dict, reference: dict | None, batch: Batch) -> dict:
        pair = self._pair_values(model, variables, reference, batch)
        valid = pair["valid"]
        losses = self.pair_losses(pair["chosen"], pair["rejected"], pair["ref_chosen"],
                                  pair["ref_rejected"], pair["chosen_tokens"], pair["rejected_tokens"])
        chosen_reward = jax.lax.stop_gradient(self.beta * (pair["chosen"] - pair["ref_chosen"]))
        rejected_reward = jax.lax.stop_gradient(self.beta * (pair["rejected"] - pair["ref_rejected"]))
        per_pair = {
            "rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
            "rewards/accuracies": (chosen_reward > rejected_reward).astype(jnp.float32),
            "rewards/margins": chosen_reward - rejected_reward,
            "logps/chosen": jax.lax.stop_gradient(pair["chosen"]),
            "logps/rejected": jax.lax.stop_gradient(pair["rejected"]),
        }
        sums = {name: jnp.sum(jnp.where(valid > 0, value, 0.0)) for name, value in per_pair.items()}
        sums["loss"] = jnp.sum(jnp.where(valid > 0, losses, 0.0))
        sums["scored_tokens"] = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        return sums

    def metrics(self, sums: dict, count: Array) -> dict:
        normalizer = jnp.maximum(count, 1.0)
        metrics = {name: sums[name] / normalizer for name in ("loss", *DPO_METRICS)}
        metrics.update(pairs=count, scored_tokens=sums["scored_tokens"])
        return metrics

    def eval_sums(self, model: Llama, variables: dict, reference: dict | None, batch: Batch) -> dict:
        sums = self.sums(model, variables, reference, batch)
        return {**sums, "pairs": self.count(batch)}

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        pairs = totals.get("pairs", 0.0)
        if not pairs:
            return {}
        return {"loss": totals["loss"] / pairs, "pairs": pairs,
                **{name: totals[name] / pairs for name in DPO_METRICS}}


Objective = Any  # CrossEntropy | DPO: count, sums, metrics, eval_sums, summarize


def check_objective(objective: Objective) -> None:
    """ConfigError unless `objective` is one of this module's objectives."""
    if not isinstance(objective, (CrossEntropy, DPO)):
        raise ConfigError(f"objective must be llamax.train.objectives.CrossEntropy() or DPO(), got "
                          f"{type(objective).__name__}")
