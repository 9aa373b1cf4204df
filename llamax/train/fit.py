"""The host training loop: data -> sharded train steps -> logs, evals, checkpoints, exact resume.

    fit(model_config, optim_config, mesh_config, data_config, train_config)

A run directory (`TrainConfig.model_dir`) holds `model_config.json`, `metrics.jsonl`,
`tensorboard/` and `checkpoints/<step>/`. Calling `fit` again with the same directory resumes
from the newest readable checkpoint: params, optimizer state, step, RNG and the data iterator's
position, so the resumed run sees exactly the batches (and on CPU computes exactly the losses) an
uninterrupted run would have. SIGTERM saves the current step and returns with status
"preempted". A non-finite loss stops the run naming the step (or is skipped, by flag); the update
of such a step is never applied, so no checkpoint ever holds NaN params.

Fine-tuning is the same loop: `init_params` (e.g. converted HF/Meta weights) replaces the random
init, and `DataConfig.sft_template` scores response tokens only. With `lora_config` the run trains
LoRA adapters of the frozen `init_params` (random init when None): checkpoints hold the adapters
and their optimizer state, `lora_config.json` records the adapter shape, and every call (a resume
too) must pass the same base params.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from llamax.train.checkpoint import Checkpointer
from llamax.config import ModelConfig
from llamax.data import sft
from llamax.data.corpus import shakespeare_passages
from llamax.data.loader import LoaderConfig, make_loader
from llamax.data.shakespeare_sft import shakespeare_sft_records
from llamax.data.sources import open_documents
from llamax.errors import ConfigError, DataError, LlamaxError
from llamax.infer.evaluate import sum_nll, summarize
from llamax.model.lora import LoraConfig
from llamax.train.metrics import MetricsLogger, truncate_metrics
from llamax.model.llama import init_params as random_params
from llamax.train.optim import OptimConfig
from llamax.convert.orbax import read_model_config  # noqa: F401  (a run dir is read like a params checkpoint)
from llamax.train.preemption import PreemptionGuard
from llamax.sharding import (LOGICAL_AXIS_RULES, MeshConfig, batch_sharding, check_batch_size,
                             check_heads_divisible, make_mesh, param_shardings, to_global_batch)
from llamax.tokenizer import Tokenizer, check_vocab
from llamax.train.flops import peak_flops_per_device, throughput
from llamax.train.step import (abstract_train_state, init_train_state, make_eval_step,
                               make_train_step, state_shardings)

logger = logging.getLogger(__name__)
MODEL_CONFIG_FILE = "model_config.json"
LORA_CONFIG_FILE = "lora_config.json"
SHAKESPEARE = "shakespeare"
SHAKESPEARE_SFT = "shakespeare_sft"


class NonFiniteLossError(LlamaxError):
    """Training produced a NaN/inf loss or gradient; the update was not applied."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where documents come from and how they become tokens.

    `train` / `validation`: 'shakespeare' (the bundled corpus), 'shakespeare_sft' (prompt/response
    exchanges built from it, `llamax.data.shakespeare_sft`; needs `sft_template`), local files (a
    path, directory or glob of .txt / .jsonl), or the name of a prepared tfds dataset (with
    `tfds_data_dir`).
    `sft_template` ('llama2', 'llama3', 'plain') switches to prompt/response data whose loss
    covers response tokens only.
    """

    tokenizer: str
    train: str = SHAKESPEARE
    validation: str | None = SHAKESPEARE
    train_split: str = "train"
    validation_split: str = "validation"
    tfds_data_dir: str | None = None
    text_split: str = "paragraph"
    text_key: str = "text"
    sft_template: str | None = None
    fill_rows: bool = True
    on_error: str = "raise"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The run: where it lives, how long, how often it logs, evaluates and checkpoints."""

    model_dir: str
    train_steps: int
    batch_size: int  # global, summed over processes
    seq_len: int
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    seed: int = 0
    on_nonfinite: str = "stop"  # or "skip": drop that update and go on
    progress_bar: bool = True

    def __post_init__(self):
        for name in ("train_steps", "batch_size", "seq_len", "log_every", "checkpoint_every",
                     "keep_checkpoints", "eval_every", "eval_batches", "seed"):
            value = getattr(self, name)
            minimum = 0 if name in ("eval_every", "seed") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= {minimum}, got {value!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if not isinstance(self.model_dir, str) or not self.model_dir:
            raise ConfigError(f"TrainConfig.model_dir must be a non-empty path string, got "
                              f"{self.model_dir!r}; set MODEL_DIR to the run directory")


@dataclasses.dataclass(frozen=True)
class FitResult:
    status: str  # "completed" or "preempted"
    step: int
    loss: float | None
    eval_loss: float | None


def open_split(data: DataConfig, source: str, split: str) -> Sequence[Any]:
    """The documents of one split of `source` (see DataConfig)."""
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


def write_model_config(run_dir: Path, config: ModelConfig) -> None:
    """Writes `model_config.json`, or checks a resumed run did not change the architecture."""
    path = run_dir / MODEL_CONFIG_FILE
    if path.exists():
        saved = ModelConfig.from_dict(json.loads(path.read_text()))
        if saved.architecture() != config.architecture():
            diff = {k: (v, config.architecture()[k]) for k, v in saved.architecture().items()
                    if config.architecture()[k] != v}
            raise ConfigError(f"{run_dir} holds a run of a different model ({diff} as saved vs now); "
                              "use a new MODEL_DIR or the original model config")
    if jax.process_index() == 0:
        # Write-then-rename: other processes may be reading it (the check above) right now.
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config.to_dict(), indent=2))
        tmp.replace(path)


def write_lora_config(run_dir: Path, lora_config: LoraConfig | None) -> None:
    """Records the adapter shape of a LoRA run, or checks a resume kept it (or kept it off)."""
    path = run_dir / LORA_CONFIG_FILE
    saved = LoraConfig.from_dict(json.loads(path.read_text())) if path.exists() else None
    has_checkpoints = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    if saved != lora_config and has_checkpoints:
        raise ConfigError(f"{run_dir} holds a run trained with lora_config={saved} but this run "
                          f"asks for {lora_config}; its checkpoints would not fit. Use a new "
                          "MODEL_DIR or the original LoRA setting")
    if jax.process_index() == 0:
        if lora_config is None:
            path.unlink(missing_ok=True)
        else:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(lora_config.to_dict(), indent=2))
            tmp.replace(path)


def read_lora_config(run_dir: str | Path) -> LoraConfig | None:
    """The LoraConfig a run trained with, or None for a full-training run."""
    path = Path(run_dir) / LORA_CONFIG_FILE
    return LoraConfig.from_dict(json.loads(path.read_text())) if path.exists() else None


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


def all_loader_states(loader) -> list[dict]:
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


def this_process_loader_state(saved: list | dict, run_dir: Path) -> dict:
    """This process's entry of `all_loader_states` as saved (a lone dict: a one-process run)."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) != jax.process_count():
        raise ConfigError(f"the checkpoint in {run_dir} was saved by {len(states)} process(es) but "
                          f"this run has {jax.process_count()}; each process's data position "
                          "cannot be mapped onto another process count. Resume with the same "
                          "number of processes, or start a new MODEL_DIR")
    return states[jax.process_index()]


def _evaluate(eval_step, params, batches: list, sharding, frozen: Any = None) -> dict[str, float]:
    result = summarize(*sum_nll(eval_step, params, batches, sharding, frozen))
    return {f"eval_{key}": value for key, value in result.items()}


def fit(model_config: ModelConfig, optim_config: OptimConfig, mesh_config: MeshConfig,
        data_config: DataConfig, train_config: TrainConfig,
        init_params: Any | None = None, lora_config: LoraConfig | None = None) -> FitResult:
    """Trains (or resumes) the run in `train_config.model_dir`; see the module docstring.

    `init_params`: optional params pytree (e.g. converted HF/Meta weights) to start from instead
    of a random init; ignored when the run resumes from its own checkpoint (unless LoRA).
    `lora_config`: train LoRA adapters of the frozen `init_params` instead of all params.
    """
    tc = train_config
    run_dir = Path(tc.model_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_model_config(run_dir, model_config)
    write_lora_config(run_dir, lora_config)
    mesh = make_mesh(mesh_config)
    rules = LOGICAL_AXIS_RULES
    check_heads_divisible(model_config, mesh, rules)
    check_batch_size(tc.batch_size, mesh, rules)

    tokenizer = Tokenizer(data_config.tokenizer)
    check_vocab(tokenizer, model_config.vocab_size)
    train_documents = open_split(data_config, data_config.train, data_config.train_split)
    if data_config.sft_template is not None:
        check_has_responses(train_documents, data_config.train)
    loader = make_loader(train_documents, tokenizer,
                         LoaderConfig(seq_len=tc.seq_len, global_batch_size=tc.batch_size, seed=tc.seed,
                                      sft_template=data_config.sft_template,
                                      fill_rows=data_config.fill_rows))
    eval_batches: list = []
    if data_config.validation:
        eval_loader = make_loader(
            open_split(data_config, data_config.validation, data_config.validation_split), tokenizer,
            LoaderConfig(seq_len=tc.seq_len, global_batch_size=tc.batch_size, seed=tc.seed, shuffle=False,
                         num_epochs=1, sft_template=data_config.sft_template,
                         fill_rows=data_config.fill_rows))
        eval_batches = [b for _, b in zip(range(tc.eval_batches), eval_loader)]

    checkpointer = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints,
                                async_save=tc.async_checkpointing)
    shardings = state_shardings(model_config, optim_config, mesh, rules, lora_config)
    frozen = None  # LoRA: the base params, an input of every step, never updated or checkpointed
    if lora_config is not None:
        base_shardings = param_shardings(model_config, mesh, rules)
        frozen = (jax.jit(lambda: random_params(model_config, tc.seed), out_shardings=base_shardings)()
                  if init_params is None else jax.device_put(init_params, base_shardings))
    start_step = 0
    if checkpointer.latest_step() is not None:
        abstract = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                            sharding=sharding),
                                abstract_train_state(model_config, optim_config, lora_config),
                                shardings)
        state, extras = checkpointer.restore(abstract_state=abstract)
        loader.set_state(this_process_loader_state(extras["data"], run_dir))
        start_step = int(extras["step"])
        truncate_metrics(run_dir, start_step)
        logger.info("resumed %s from step %d", run_dir, start_step)
    else:
        state = init_train_state(model_config, optim_config, mesh, rules, rng=tc.seed,
                                 lora_config=lora_config)
        if init_params is not None and lora_config is None:
            state = state.replace(params=jax.device_put(init_params, shardings.params))

    train_step = make_train_step(model_config, optim_config, mesh, rules, lora_config)
    eval_step = make_eval_step(model_config, mesh, rules, lora_config)
    data_sharding = batch_sharding(mesh, rules)
    log = MetricsLogger(run_dir, tc.train_steps, start_step, progress_bar=tc.progress_bar)
    peak = peak_flops_per_device()
    result_loss = eval_loss = None
    status = "completed"
    step = start_step
    window_start, window_steps = None, 0

    def check(step_done: int, metrics: dict) -> dict:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not values.pop("finite"):
            message = (f"non-finite loss or gradient at step {step_done} (loss={values['loss']}, "
                       f"grad_norm={values['grad_norm']}); the update was not applied")
            if tc.on_nonfinite == "stop":
                raise NonFiniteLossError(f"{message}. The last checkpoint (step "
                                         f"{checkpointer.latest_step()}) holds the last good state.")
            log.message(f"warning: {message}; skipping it (on_nonfinite='skip')")
        return values

    try:
        with PreemptionGuard() as guard:
            pending = None  # the previous step's metrics: checked while the next step runs
            while step < tc.train_steps:
                batch = to_global_batch(next(loader), data_sharding)
                state, metrics = train_step(state, batch, frozen)
                step += 1
                if pending is not None:
                    check(*pending)
                pending = (step, metrics)
                window_steps += 1
                preempted = guard.should_stop(step)
                at_checkpoint = step % tc.checkpoint_every == 0 or step == tc.train_steps or preempted
                at_eval = bool(eval_batches) and (
                    (tc.eval_every and step % tc.eval_every == 0) or step == tc.train_steps)
                if at_checkpoint or at_eval or step % tc.log_every == 0:
                    values = check(*pending)  # never checkpoint before knowing the step was finite
                    pending = None
                    result_loss = values["loss"]
                    if window_start is not None:  # the first window holds compilation: not timed
                        values.update(throughput(model_config, tc.batch_size, tc.seq_len,
                                                 (time.perf_counter() - window_start) / window_steps,
                                                 mesh.size, peak))
                    if at_eval:
                        values.update(_evaluate(eval_step, state.params, eval_batches,
                                                data_sharding, frozen))
                        eval_loss = values.get("eval_loss")
                    log.log(step, values)
                    if at_checkpoint:
                        extras = {"data": all_loader_states(loader), "step": step}
                        checkpointer.save(step, state, extras, force=True)
                    window_start, window_steps = time.perf_counter(), 0
                log.advance(step)
                if preempted:
                    status = "preempted"
                    log.message(f"preemption signal: saved step {step}, exiting")
                    break
            checkpointer.wait()
    finally:
        checkpointer.close()
        log.close()
    return FitResult(status=status, step=step, loss=result_loss, eval_loss=eval_loss)

