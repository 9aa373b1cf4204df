"""Training entry point, configured with gin.

    python -m experiments.train --gin_file=configs/runs/tiny.gin \
        [--gin_file=configs/meshes/cpu8.gin] [--gin.TRAIN_STEPS=500] [--gin.MODEL_DIR="'runs/x'"]

Gin files layer t5x-style: a run file includes a model file; mesh files and `--gin.X=V`
overrides go on top. A run file binds `train.run` and defines the macros MODEL_DIR, TRAIN_STEPS,
CHECKPOINT_EVERY and LOG_EVERY. Re-running with the same MODEL_DIR resumes.
Fine-tuning: INIT_FROM (HF, Meta or orbax folder) gives the starting weights, a `lora_config`
binding trains LoRA adapters of them instead (configs/runs/sft.gin, docs/finetuning.md).
Multi-host: pass --coordinator_address/--num_processes/--process_id (or set the LLAMAX_*
environment variables); on TPU pods `--distributed` alone lets JAX find its peers. If one process
fails or is lost (no heartbeat for --peer_timeout_s, default 60), every process stops with one
line naming it; rerun them all to resume (llamax.distributed).
Compiled programs are cached in the user's cache folder, so a rerun starts fast:
`--compilation_cache=PATH` moves the cache, `--compilation_cache=off` turns it off (or set
LLAMAX_COMPILATION_CACHE).
"""
from __future__ import annotations

import sys
from typing import Any

from experiments import gin_config
from llamax.config import ModelConfig
from llamax.data.corpus import shakespeare_tokenizer  # noqa: F401 (gin: train.shakespeare_tokenizer)
from llamax.data.pipeline import DataConfig
from llamax.distributed import report_failure
from llamax.errors import ConfigError
from llamax.infer.lm_eval_tasks import DownstreamConfig
from llamax.model.lora import LoraConfig
from llamax.sharding import MeshConfig
from llamax.train import objectives  # noqa: F401 (gin: objectives.DPO)
from llamax.train.fit import FitResult, TrainConfig, fit
from llamax.train.optim import OptimConfig


def run(model_config: ModelConfig, optim_config: OptimConfig, mesh_config: MeshConfig,
        data_config: DataConfig, train_config: TrainConfig, init_from: str | None = None,
        lora_config: LoraConfig | None = None, objective: Any = None,
        adapters_from: str | None = None, downstream: DownstreamConfig | None = None) -> FitResult:
    """What a run gin file binds: trains or resumes, keeping the operative config with the run.

    `init_from`: HF/Meta/orbax weights to start from (recorded in the run directory).
    `lora_config`: train LoRA adapters of those weights (loaded again on every resume).
    `objective`: None (cross-entropy) or `@objectives.DPO()` (configs/runs/dpo.gin).
    `adapters_from`: a PEFT adapter folder a LoRA run starts from (its LoraConfig unless set).
    `downstream`: lm-eval tasks scored during training (EVAL_TASKS*), logged with the metrics.
    """
    import gin
    import jax

    evaluators = []
    if downstream is not None and downstream.tasks:
        from llamax.infer.lm_eval_tasks import TaskEvaluator

        evaluators.append(TaskEvaluator(downstream, data_config.tokenizer, lora_config, init_from))
    result = fit(model_config, optim_config, mesh_config, data_config, train_config,
                 init_from=init_from, lora_config=lora_config, operative_config=gin.operative_config_str(),
                 objective=objective, adapters_from=adapters_from, evaluators=evaluators)
    if jax.process_index() == 0:
        print(f"{result.status} at step {result.step}: loss {result.loss}, eval_loss {result.eval_loss}",
              flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        gin_files, bindings, options = gin_config.split_args(argv)
        if not gin_files:
            raise gin_config.GinError("pass at least one --gin_file=... (e.g. configs/runs/tiny.gin)")
        from llamax import compilation_cache
        from llamax.backends import retain_freed_host_memory
        from llamax.distributed import initialize_from_options

        retain_freed_host_memory()  # before any device query: XLA's threads pick their arena then
        initialize_from_options(options)
        import jax

        compilation_cache.enable(options.get("compilation_cache"), multi_process=jax.process_count() > 1)
        gin_config.parse(gin_files, bindings)
        import gin

        # `python -m` runs this file as __main__; gin registered the importable module's `run`.
        from experiments import train as registered

        runner = gin.get_configurable(registered.run)
    except ConfigError as error:
        return report_failure(f"error: {error}", 2)
    try:
        runner()
    except ValueError as error:  # every llamax.errors type too: one clear line, no traceback
        message = gin_config.name_the_binding(gin_config.explain_gin_error(error), bindings)
        return report_failure(f"error: {type(error).__name__}: {message}", 1)
    except OSError as error:  # a path that cannot be read or written: the path and the problem
        return report_failure(f"error: {type(error).__name__}: {error}", 1)
    except (TypeError, RecursionError) as error:
        message = gin_config.gin_call_error(error, bindings)
        if message is None:
            raise
        return report_failure(f"error: {message}", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
