"""The host training loop: data -> sharded train steps -> logs, evals, checkpoints, exact resume.

    fit(model_config, optim_config, mesh_config, data_config, train_config)

Reading top to bottom: check everything (run directory, mesh, tokenizer, data, starting weights)
-> commit the run directory (`llamax.run_dir`) -> `make_train_setup` (abstract state, shardings,
jitted steps, once) -> restore the newest checkpoint or init sharded -> the loop.

Calling `fit` again with the same directory resumes from the newest readable checkpoint: params,
optimizer state, step, RNG and the data iterator's position, so the resumed run sees exactly the
batches (and on CPU computes exactly the losses) an uninterrupted run would have. SIGTERM saves
the current step and returns with status "preempted". A non-finite loss stops the run naming the
step (or is skipped, by flag); the update of such a step is never applied, so no checkpoint ever
holds NaN params.

Fine-tuning is the same loop: `init_from` (an HF/Meta/orbax path, or a params pytree) replaces
the random init, and `DataConfig.sft_template` scores response tokens only. With `lora_config`
the run trains LoRA adapters of the frozen `init_from` weights (random when None): checkpoints
hold the adapters and their optimizer state, and every resume loads the same base again.

Preference tuning is the same loop too: `objective=DPO(...)` (`llamax.train.objectives`) reads
the data as preference pairs and scores them against a frozen reference, `init_from` itself:
loaded again on every resume, held sharded and never donated (LoRA: the base, adapters off).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Mapping, Protocol, Sequence

import jax

from llamax.config import ModelConfig
from llamax.convert.identity import training_identity
from llamax.data.pipeline import (DataConfig, all_loader_states, eval_loader,  # noqa: F401 (gin: fit.DataConfig)
                                  loader_metrics, this_process_loader_state, train_loader)
from llamax.distributed import wait_for_peers
from llamax.errors import ConfigError, LlamaxError, check_field_types, check_int
from llamax.infer.evaluate import sum_eval
from llamax.model.llama import init_params
from llamax.model.lora import LoraConfig
from llamax.run_dir import RunDir
from llamax.sharding import MeshConfig, check_batch_size, make_mesh, to_global_batch
from llamax.tokenizer import check_vocab, load_tokenizer
from llamax.train.checkpoint import Checkpointer
from llamax.train.flops import peak_flops_per_device, throughput
from llamax.train.metrics import MetricsLogger, truncate_metrics
from llamax.train.objectives import Objective
from llamax.train.optim import OptimConfig
from llamax.train.preemption import PreemptionGuard
from llamax.train.profiling import StepTrace, check_profile_steps
from llamax.train.setup import TrainSetup, make_train_setup

logger = logging.getLogger(__name__)


class NonFiniteLossError(LlamaxError):
    """Training produced a NaN/inf loss or gradient; the update was not applied."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The run: where it lives, how long, how often it logs, evaluates and checkpoints.

    eval_batches: how many validation batches `eval_loss` scores (the first ones, in order; the
        logged `eval_tokens` says how many tokens that was); 0 scores the whole validation split.
    profile_steps: (first, last) steps to trace with JAX's profiler into `<run>/tensorboard`
        (`llamax.train.profiling`), or None.
    """

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
    profile_steps: tuple[int, int] | None = None

    def __post_init__(self):
        check_field_types(self)
        for name in ("train_steps", "batch_size", "seq_len", "log_every", "checkpoint_every",
                     "keep_checkpoints", "eval_every", "eval_batches", "seed"):
            minimum = 0 if name in ("eval_every", "eval_batches", "seed") else 1
            check_int(getattr(self, name), f"TrainConfig.{name}", minimum)
        check_profile_steps(self.profile_steps, self.train_steps)
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if not isinstance(self.model_dir, str) or not self.model_dir:
            raise ConfigError(f"TrainConfig.model_dir must be a non-empty path string, got "
                              f"{self.model_dir!r}; set MODEL_DIR to the run directory")


class Evaluator(Protocol):
    """More evaluation at chosen steps (e.g. `llamax.infer.lm_eval_tasks.TaskEvaluator`): when
    `due(step, final_step)`, called with the setup, trained params and frozen params (LoRA base or
    None); its metrics join that step's record."""

    def due(self, step: int, final_step: int) -> bool: ...

    def __call__(self, step: int, setup: TrainSetup, params: Any, frozen: Any) -> dict[str, float]: ...


@dataclasses.dataclass(frozen=True)
class FitResult:
    status: str  # "completed" or "preempted"
    step: int
    loss: float | None
    eval_loss: float | None


def load_init_params(init_from: str | os.PathLike, model_config: ModelConfig) -> dict:
    """Params of the HF, Meta or orbax checkpoint (or run) `init_from`, laid out for
    `model_config`; ConfigError if that checkpoint holds a different architecture."""
    from llamax.convert.hub import architecture_differences, load_any

    loaded_config, params = load_any(init_from, scan_layers=model_config.scan_layers,
                                     param_dtype=model_config.param_dtype)
    # Meta's params.json does not record the context length; it does not shape the weights.
    differences = architecture_differences(loaded_config, model_config, ignore=("max_position_embeddings",))
    if differences:
        raise ConfigError(f"init_from={init_from} holds a different model than the run's model "
                          f"config (checkpoint vs run): {differences}; include the model gin file "
                          "that matches the checkpoint or override those fields")
    return params


def fit(model_config: ModelConfig, optim_config: OptimConfig, mesh_config: MeshConfig,
        data_config: DataConfig, train_config: TrainConfig, *,
        init_from: str | os.PathLike | Mapping | None = None, lora_config: LoraConfig | None = None,
        operative_config: str | None = None, objective: Objective | None = None,
        adapters_from: str | os.PathLike | None = None, evaluators: Sequence[Evaluator] = ()) -> FitResult:
    """Trains (or resumes) the run in `train_config.model_dir`; see the module docstring.

    `init_from`: the weights to start from: a checkpoint path (recorded in the run) or a params
      pytree; a resumed full fine-tuning run continues from its own checkpoint and never reads it.
    `lora_config`: train LoRA adapters of the frozen `init_from` weights instead of all params.
    `operative_config`: the text of the config that launched the run (kept as its config.gin).
    `objective`: what is trained for (`llamax.train.objectives`; default cross-entropy, DPO for
      preference data).
    `adapters_from`: a PEFT LoRA adapter folder (`llamax.convert.peft`) whose adapters a fresh
      LoRA run starts from; its rank/alpha/targets are the LoraConfig unless `lora_config` says
      (then they must agree).
    `evaluators`: more evaluation (e.g. lm-eval tasks) at the steps each chooses.
    """
    tc = train_config
    start_adapters = None
    if adapters_from is not None:
        lora_config, start_adapters = _peft_start(adapters_from, model_config, lora_config)
    run = RunDir(tc.model_dir)
    run.check_writable()
    resuming = run.check_resumable(model_config, lora_config)
    mesh = make_mesh(mesh_config)
    check_batch_size(tc.batch_size, mesh)
    identity = training_identity(data_config.tokenizer, init_from)  # None: INIT_FROM's own tokenizer
    tokenizer = load_tokenizer(identity.tokenizer)
    check_vocab(tokenizer, model_config.vocab_size)
    setup = make_train_setup(model_config, optim_config, mesh, lora_config=lora_config, objective=objective)
    preference = setup.objective.preference_data
    loader = train_loader(data_config, tokenizer, tc.seq_len, tc.batch_size, tc.seed, preference)
    validation = eval_loader(data_config, tokenizer, tc.seq_len, tc.batch_size, tc.seed, preference)
    eval_batches = [] if validation is None else list(
        validation if tc.eval_batches == 0 else (b for _, b in zip(range(tc.eval_batches), validation)))
    # A resumed full fine-tuning run continues from its own checkpoint: reading INIT_FROM again
    # (tens of GB for a large model) would be wasted. Frozen params (a LoRA base, a DPO
    # reference) are needed every time.
    start_params = init_from
    if isinstance(init_from, (str, os.PathLike)):
        needed = setup.frozen_shardings is not None or not resuming
        start_params = load_init_params(init_from, model_config) if needed else None
    # Everything is checked, on every process (one that failed ends the others): only now does
    # the run directory change.
    wait_for_peers("run checks")
    run.commit(model_config, lora_config=lora_config, init_from=init_from, tokenizer=identity.tokenizer,
               special_ids=identity.special_ids, config_text=operative_config, resuming=resuming)
    checkpointer = Checkpointer(run.checkpoints, keep=tc.keep_checkpoints, async_save=tc.async_checkpointing)
    try:
        state, frozen, start_step = _start_state(setup, checkpointer, loader, run, start_params, tc.seed,
                                                 start_adapters)
        result = _loop(setup, tc, run, checkpointer, loader, eval_batches, state, frozen, start_step,
                       evaluators)
    finally:
        checkpointer.close()
    run.write_outcome(result.status, result.step, loss=result.loss, eval_loss=result.eval_loss)
    return result


def _peft_start(path: str | os.PathLike, model_config: ModelConfig,
                lora_config: LoraConfig | None) -> tuple[LoraConfig, Any]:
    """(the run's LoraConfig, the adapters) of a PEFT adapter folder a LoRA run starts from."""
    from llamax.convert.peft import load_peft

    peft_lora, adapters = load_peft(path, model_config)
    if lora_config is None:
        return peft_lora, adapters
    shape = lambda c: (c.rank, c.alpha, tuple(sorted(c.targets)))  # noqa: E731
    if shape(lora_config) != shape(peft_lora):
        raise ConfigError(f"adapters_from={path} holds LoRA rank {peft_lora.rank}, alpha {peft_lora.alpha}, "
                          f"targets {peft_lora.targets}, but lora_config asks for rank {lora_config.rank}, "
                          f"alpha {lora_config.alpha}, targets {lora_config.targets}; drop lora_config "
                          "(the adapter's own is used) or make them agree")
    return lora_config, jax.tree.map(lambda a: a.astype(lora_config.dtype), adapters)


def _start_state(setup: TrainSetup, checkpointer: Checkpointer, loader, run: RunDir,
                 start_params: Any, seed: int, start_adapters: Any = None) -> tuple[Any, Any, int]:
    """(state, frozen params or None, start step): restored from the newest checkpoint (loader
    position included), or a fresh sharded init from `start_params` or `seed`."""
    # The LoRA base or the DPO reference: an input of every step, never updated, donated or
    # checkpointed. may_alias=False: the trained params (donated) never share its buffers.
    frozen = None
    if setup.frozen_shardings is not None:
        frozen = (jax.device_put(start_params, setup.frozen_shardings, may_alias=False)
                  if start_params is not None
                  else jax.jit(lambda: init_params(setup.model_config, seed),
                               out_shardings=setup.frozen_shardings)())
    if checkpointer.latest_step() is not None:
        state, extras = checkpointer.restore(abstract_state=setup.abstract_state)
        loader.set_state(this_process_loader_state(extras["data"], str(run.path)))
        start_step = int(extras["step"])
        truncate_metrics(run, start_step)
        logger.info("resumed %s from step %d", run.path, start_step)
        return state, frozen, start_step
    state = setup.init(jax.random.key(seed))
    if start_params is not None and setup.trainable.trains_model_params:
        state = state.replace(params=jax.device_put(start_params, setup.state_shardings.params,
                                                    may_alias=False))
    if start_adapters is not None and not setup.trainable.trains_model_params:
        state = state.replace(params=jax.device_put(start_adapters, setup.state_shardings.params))
    return state, frozen, 0


def _loop(setup: TrainSetup, tc: TrainConfig, run: RunDir, checkpointer: Checkpointer, loader,
          eval_batches: list, state: Any, frozen: Any, start_step: int,
          evaluators: Sequence[Evaluator] = ()) -> FitResult:
    log = MetricsLogger(run, tc.train_steps, start_step, progress_bar=tc.progress_bar)
    peak = peak_flops_per_device()
    result_loss = eval_loss = None
    status, step = "completed", start_step
    window_start, window_steps, data_s = None, 0, 0.0
    trace = StepTrace(tc.profile_steps, run.tensorboard)

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
                # The host waits here while the device runs the previous step: a stall only
                # when data_s (logged) approaches step_s.
                started = time.perf_counter()
                batch = to_global_batch(next(loader), setup.batch_sharding)
                data_s += time.perf_counter() - started
                trace.before(step + 1)
                state, metrics = setup.train_step(state, batch, frozen)
                step += 1
                trace.after(step, (state, metrics))
                if pending is not None:
                    check(*pending)
                pending = (step, metrics)
                window_steps += 1
                preempted = guard.should_stop(step)
                at_checkpoint = step % tc.checkpoint_every == 0 or step == tc.train_steps or preempted
                at_eval = bool(eval_batches) and (
                    (tc.eval_every and step % tc.eval_every == 0) or step == tc.train_steps)
                due = [evaluator for evaluator in evaluators if evaluator.due(step, tc.train_steps)]
                if at_checkpoint or at_eval or due or step % tc.log_every == 0:
                    values = check(*pending)  # never checkpoint before knowing the step was finite
                    pending = None
                    result_loss = values["loss"]
                    if window_start is not None:  # the first window holds compilation: not timed
                        step_s = (time.perf_counter() - window_start) / window_steps
                        values.update(throughput(setup.model_config, tc.batch_size, tc.seq_len,
                                                 step_s, setup.mesh.size, peak))
                        values.update(step_s=step_s, data_s=data_s / window_steps)
                    values.update(loader_metrics(loader))
                    if at_eval:
                        started = time.perf_counter()
                        evaluated = setup.objective.summarize(sum_eval(
                            setup.eval_step, state.params, eval_batches, setup.batch_sharding, frozen))
                        values.update({f"eval_{key}": value for key, value in evaluated.items()})
                        values["eval_s"] = time.perf_counter() - started
                        eval_loss = values.get("eval_loss")
                    for evaluator in due:
                        values.update(evaluator(step, setup, state.params, frozen))
                    if at_checkpoint:  # async: the time this loop is held up, not the write's
                        started = time.perf_counter()
                        extras = {"data": all_loader_states(loader), "step": step}
                        checkpointer.save(step, state, extras, force=True)
                        values["checkpoint_s"] = time.perf_counter() - started
                    log.log(step, values)
                    window_start, window_steps, data_s = time.perf_counter(), 0, 0.0
                log.advance(step)
                if preempted:
                    status = "preempted"
                    log.message(f"preemption signal: saved step {step}, exiting")
                    break
            checkpointer.wait()
    finally:
        trace.close()
        log.close()
    return FitResult(status=status, step=step, loss=result_loss, eval_loss=eval_loss)
