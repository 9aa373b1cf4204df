"""What a training run reads: `DataConfig` -> documents -> the train loader and eval batches.

`DataConfig.train` / `validation` name a source: 'shakespeare' (the bundled corpus),
'shakespeare_sft' (prompt/response exchanges built from it; needs `sft_template`),
'shakespeare_dpo' (preference pairs built from it), Parquet files or a Hugging Face dataset saved
to disk (`llamax.data.tables`), local files (a path, directory or glob of .txt / .jsonl), or a
prepared tfds dataset (with `tfds_data_dir`). `train` may also be a weighted mixture,
`[(source, weight), ...]` (`llamax.data.mixture`).

Preference data (DPO) is read with `preference=True` (fit passes it when the objective is DPO):
records become (chosen, rejected) pairs packed whole into rows (`llamax.data.preference`).

Multi-host runs checkpoint every process's loader position (`all_loader_states`), because each
process reads its own slice of the documents; a resume gives each process its own entry back.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import numpy as np

from llamax.data import sft
from llamax.data.corpus import shakespeare_passages
from llamax.data.loader import Loader, LoaderConfig, make_loader
from llamax.data.mixture import MixtureLoader, parse_mixture
from llamax.data.shakespeare_sft import shakespeare_dpo_records, shakespeare_sft_records
from llamax.data.sources import open_documents
from llamax.errors import ConfigError, DataError, check_field_types

SHAKESPEARE = "shakespeare"
SHAKESPEARE_SFT = "shakespeare_sft"
SHAKESPEARE_DPO = "shakespeare_dpo"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where documents come from and how they become tokens (see the module docstring).

    `sft_template` ('checkpoint', 'llama2', 'llama3', 'plain') switches to prompt/response data
    whose loss covers response tokens only; for preference data it renders the pairs (None:
    text pairs). `tokenizer`: a tokenizer file or folder; None takes the tokenizer of the
    checkpoint the run starts from (`fit`'s `init_from`). `train`: a source, or a mixture
    `[(source, weight), ...]`. `text_key`: the JSONL field / Parquet column of pretraining text.
    `shuffle_window`: see `LoaderConfig`.
    """

    tokenizer: str | None = None
    train: str | tuple | list = SHAKESPEARE
    validation: str | None = SHAKESPEARE
    train_split: str = "train"
    validation_split: str = "validation"
    tfds_data_dir: str | None = None
    text_split: str = "paragraph"
    text_key: str = "text"
    sft_template: str | None = None
    fill_rows: bool = True
    on_error: str = "raise"
    shuffle_window: int | None = None

    def __post_init__(self):
        check_field_types(self)
        mixture = parse_mixture(self.train)
        if mixture is not None:
            object.__setattr__(self, "train", mixture)  # normalized, hashable

    @property
    def mixture(self) -> tuple[tuple[str, float], ...] | None:
        """((source, weight), ...) with weights summing to 1, or None for one source."""
        return None if isinstance(self.train, str) else self.train


def open_split(data: DataConfig, source: str, split: str, preference: bool = False) -> Sequence[Any]:
    """The documents of one split of `source` (see DataConfig); preference records when
    `preference`."""
    if source == SHAKESPEARE_DPO or preference:
        if source == SHAKESPEARE_DPO:
            if not preference:
                raise ConfigError("data 'shakespeare_dpo' is preference pairs: train it with the DPO "
                                  "objective (configs/runs/dpo_tiny.gin)")
            return shakespeare_dpo_records("train" if split == "train" else "validation")
        return open_documents(source, split, data_dir=data.tfds_data_dir, preference_format=True,
                              text_key=data.text_key, on_error=data.on_error)
    if source == SHAKESPEARE:
        return shakespeare_passages("train" if split == "train" else "validation")
    if source == SHAKESPEARE_SFT:
        if data.sft_template is None:
            raise ConfigError("data 'shakespeare_sft' is prompt/response records; set "
                              "DataConfig.sft_template ('plain', 'llama2' or 'llama3')")
        records = shakespeare_sft_records("train" if split == "train" else "validation")
        return [{"messages": sft.parse_record(record)} for record in records]
    return open_documents(source, split, data_dir=data.tfds_data_dir,
                          sft_format=data.sft_template is not None, text_key=data.text_key,
                          text_split=data.text_split, on_error=data.on_error)


def check_has_responses(documents: Sequence[Any], source: str) -> None:
    """Raises DataError when in-memory SFT records hold no response text at all (training would
    score nothing but end-of-sequence tokens). Lazy (tfds) sources are not scanned."""
    if not isinstance(documents, list):
        return
    if not any(message["role"] == "assistant" and message["content"].strip()
               for document in documents for message in document["messages"]):
        raise DataError(f"SFT data {source!r}: all {len(documents)} records have empty responses, "
                        "so there are no response tokens to train on; fill the 'response' (or "
                        "assistant 'content') fields")


def _source_loader(data: DataConfig, source: str, tokenizer, seq_len: int, batch_size: int, seed: int,
                   preference: bool) -> Loader:
    documents = open_split(data, source, data.train_split, preference)
    if data.sft_template is not None and not preference:
        check_has_responses(documents, source)
    return make_loader(documents, tokenizer, LoaderConfig(
        seq_len=seq_len, global_batch_size=batch_size, seed=seed, sft_template=data.sft_template,
        fill_rows=data.fill_rows and not preference, preference=preference,
        shuffle_window=data.shuffle_window))


def train_loader(data: DataConfig, tokenizer, seq_len: int, batch_size: int, seed: int,
                 preference: bool = False) -> Loader | MixtureLoader:
    """The endless, shuffled training loader of `data.train` (a `MixtureLoader` for a mixture:
    each source has its own loader of one-row batches and seed)."""
    if data.mixture is None:
        return _source_loader(data, data.train, tokenizer, seq_len, batch_size, seed, preference)
    processes = jax.process_count()
    loaders, sources, weights = [], [], []
    for index, (source, weight) in enumerate(data.mixture):
        if weight == 0:
            continue  # a source switched off: not even opened
        source_seed = (seed + 7919 * index) % 2**32  # each source its own shuffle
        loaders.append(_source_loader(data, source, tokenizer, seq_len, processes, source_seed, preference))
        sources.append(source)
        weights.append(weight)
    return MixtureLoader(loaders, sources, weights, batch_size // processes, seed)


def eval_loader(data: DataConfig, tokenizer, seq_len: int, batch_size: int, seed: int,
                preference: bool = False) -> Loader | None:
    """One ordered pass over `data.validation` (None when the run has no validation data)."""
    if not data.validation:
        return None
    documents = open_split(data, data.validation, data.validation_split, preference)
    return make_loader(documents, tokenizer, LoaderConfig(
        seq_len=seq_len, global_batch_size=batch_size, seed=seed, shuffle=False, num_epochs=1,
        sft_template=data.sft_template, fill_rows=data.fill_rows and not preference,
        preference=preference))


def loader_metrics(loader: Loader | MixtureLoader) -> dict[str, float]:
    """What a loader reports for the metrics log: a mixture's realized tokens per source, summed
    over processes ({} for a single source)."""
    metrics = loader.metrics() if isinstance(loader, MixtureLoader) else {}
    if not metrics or jax.process_count() == 1:
        return metrics
    from jax.experimental import multihost_utils

    names = sorted(metrics)
    summed = multihost_utils.process_allgather(np.asarray([metrics[n] for n in names])).sum(axis=0)
    return dict(zip(names, map(float, summed)))


def all_loader_states(loader: Loader | MixtureLoader) -> list[dict]:
    """Every process's loader state, in process order, on every process.

    The checkpoint's JSON extras are written by process 0 alone, but each process reads its own
    slice of the documents, so a resume needs each process's own position.
    """
    state = loader.get_state()
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray(len(encoded), np.int32))  # [processes]
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(encoded)] = encoded
    gathered = multihost_utils.process_allgather(padded)  # [processes, longest]
    return [json.loads(bytes(row[:length])) for row, length in zip(gathered, lengths)]


def this_process_loader_state(saved: list | dict, where: str) -> dict:
    """This process's entry of `all_loader_states` as saved (a lone dict: a one-process run)."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) != jax.process_count():
        raise ConfigError(f"the checkpoint in {where} was saved by {len(states)} process(es) but "
                          f"this run has {jax.process_count()}; each process's data position "
                          "cannot be mapped onto another process count. Resume with the same "
                          "number of processes, or start a new MODEL_DIR")
    return states[jax.process_index()]
