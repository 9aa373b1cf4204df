"""Reference log-probs for DPO, computed once and stored with the data.

    precompute_reference_logps(config, params, "prefs.jsonl", "prefs_ref.jsonl", tokenizer,
                               seq_len=2048, sft_template="checkpoint")

Each record is written back with `ref_chosen_logps` / `ref_rejected_logps`: the reference
model's summed log-probs of the chosen and rejected completions, encoded exactly as the DPO loader
encodes them (same template, same cut to `seq_len`). A run with `DPO(reference='precomputed')`
then reads them from the batch (`ref_logps`) and holds no reference model, which saves its
memory and a forward pass per step in full fine-tuning. Use the seq_len and template of the run.
Records the loader would skip (no completion left after the cut) are left out, with a warning.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llamax.config import ModelConfig
from llamax.data import preference
from llamax.data.packing import stack_rows
from llamax.data.sources import open_documents
from llamax.files import atomic_write_text
from llamax.model.llama import Llama
from llamax.sharding import MeshConfig, batch_sharding, make_mesh, param_shardings, to_global_batch
from llamax.train.objectives import sequence_sums, token_log_probs

log = logging.getLogger(__name__)


def _pair_logps_fn(config: ModelConfig, mesh):
    model = Llama(config)

    @jax.jit
    def pair_logps(params, batch):  # -> chosen, rejected: [rows, max_pairs] float32
        logits = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"])  # [rows, seq, vocab]
        log_probs, _ = token_log_probs(logits, batch["targets"], batch["loss_mask"])
        return sequence_sums(log_probs * batch["loss_mask"], batch["segment_ids"],
                             batch["segment_ids"].shape[1] // 2)

    return pair_logps


def precompute_reference_logps(config: ModelConfig, params: Any, source: str | os.PathLike,
                               out: str | os.PathLike, tokenizer, *, seq_len: int,
                               sft_template: str | None = None, batch_size: int = 8,
                               mesh=None) -> Path:
    """Writes `source`'s preference records (JSONL, Parquet or a saved dataset) to the JSONL file
    `out` with the reference log-probs of `params` added (see the module docstring)."""
    mesh = make_mesh(MeshConfig()) if mesh is None else mesh
    placed = jax.device_put(params, param_shardings(config, mesh))
    pair_logps = _pair_logps_fn(config, mesh)
    documents = open_documents(source, preference_format=True)
    packer = preference.PairPacker(seq_len)
    rows, kept, lines, skipped = [], [], [], 0

    def flush(final: bool = False) -> None:
        nonlocal rows, kept
        if not rows or (len(rows) < batch_size and not final):
            return
        batch = to_global_batch(stack_rows(rows, batch_size), batch_sharding(mesh))
        chosen, rejected = (np.asarray(x) for x in jax.device_get(pair_logps(placed, batch)))
        index = 0
        for row, row_data in enumerate(rows):
            for pair in range(int(row_data["segment_ids"].max()) // 2):
                record = dict(kept[index])
                record["ref_chosen_logps"] = float(chosen[row, pair])
                record["ref_rejected_logps"] = float(rejected[row, pair])
                lines.append(json.dumps(record))
                index += 1
        rows, kept = [], kept[index:]

    for number in range(len(documents)):
        pair = preference.encode_pair(documents[number], tokenizer, sft_template, seq_len)
        if pair is None:
            skipped += 1
            continue
        tokens, weights, split, _ = pair
        packer.set_document(tokens, weights, split)
        while not packer.place():
            rows.append(packer.finish_row())
            flush()
        kept.append(_plain_record(documents[number]))
    row = packer.finish_row()
    if row is not None:
        rows.append(row)
    flush(final=True)
    if skipped:
        log.warning("left out %d record(s) of %s: cut to seq_len=%d they keep no completion token",
                    skipped, source, seq_len)
    return atomic_write_text(Path(out), "".join(line + "\n" for line in lines))


def _plain_record(parsed: dict) -> dict:
    """A parsed preference record back in the JSONL form it is read from."""
    return {"prompt": parsed["prompt"], "chosen": parsed["chosen"], "rejected": parsed["rejected"]}
