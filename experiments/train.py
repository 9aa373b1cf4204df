"""Training entry point, configured with gin.

    python -m experiments.train --gin_file=configs/runs/tiny.gin \
        [--gin_file=configs/meshes/cpu8.gin] [--gin.TRAIN_STEPS=500] [--gin.MODEL_DIR="'runs/x'"]

Gin files layer t5x-style: a run file includes a model file; mesh files and `--gin.X=V`
overrides go on top. A run file binds `train.run` and defines the macros MODEL_DIR, TRAIN_STEPS,
CHECKPOINT_EVERY and LOG_EVERY. Re-running with the same MODEL_DIR resumes.
Fine-tuning: INIT_FROM (HF, Meta or orbax folder) gives the starting weights, a `lora_config`
binding trains LoRA adapters of them instead (configs/runs/sft.gin, docs/finetuning.md).
Multi-host: pass --coordinator_address/--num_processes/--process_id (or set the LLAMAX_*
environment variables); on TPU pods `--distributed` alone lets JAX find its peers.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
import tempfile
import tokenize
from pathlib import Path

from llamax.config import ModelConfig
from llamax.errors import ConfigError
from llamax.train.fit import DataConfig, FitResult, TrainConfig, fit
from llamax.model.lora import LoraConfig
from llamax.train.optim import OptimConfig
from llamax.sharding import MeshConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIRED_MACROS = ("MODEL_DIR", "TRAIN_STEPS", "CHECKPOINT_EVERY", "LOG_EVERY")
INIT_FROM_FILE = "init_from.json"  # where a run's starting weights came from (export reads it)


def shakespeare_tokenizer(vocab_size: int = 2048, directory: str = "runs/tokenizers") -> str:
    """Path of a BPE tokenizer trained on the bundled corpus's train split; trained (a few
    seconds, deterministic) the first time it is asked for."""
    from llamax.data.corpus import write_corpus
    from llamax.tokenizer import train_tokenizer

    out = Path(directory) / f"shakespeare-{vocab_size}" / "tokenizer.model"
    if not out.exists():
        # Several processes (multi-host on a shared disk, or runs started together) can get here
        # at once: each trains in a private folder and renames the result into place, so none
        # reads a half-written corpus or model. Training is deterministic: any rename may win.
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as private:
            text = write_corpus(Path(private) / "corpus", "txt")["train"]
            trained = train_tokenizer([text], Path(private) / out.name, vocab_size=vocab_size)
            os.replace(trained.path.with_suffix(".vocab"), out.with_suffix(".vocab"))
            os.replace(trained.path, out)
    return str(out)


def load_init_params(init_from: str, model_config: ModelConfig) -> dict:
    """Params of the HF, Meta or orbax checkpoint `init_from`, laid out for `model_config`;
    ConfigError if that checkpoint holds a different architecture."""
    from llamax.convert.hub import load_any

    loaded_config, params = load_any(init_from, scan_layers=model_config.scan_layers,
                                     param_dtype=model_config.param_dtype)
    # Meta's params.json does not record the context length; it does not shape the weights.
    ours, theirs = model_config.architecture(), loaded_config.architecture()
    differences = {k: (theirs[k], ours[k]) for k in ours
                   if k != "max_position_embeddings" and ours[k] != theirs[k]}
    if differences:
        raise ConfigError(f"init_from={init_from} holds a different model than the run's model "
                          f"config (checkpoint vs run): {differences}; include the model gin file "
                          "that matches the checkpoint or override those fields")
    return params


def _has_checkpoint(run_dir: Path) -> bool:
    """Whether the run in `run_dir` has a committed checkpoint to resume from."""
    from llamax.train.checkpoint import Checkpointer

    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return False
    with Checkpointer(directory, read_only=True) as checkpointer:
        return checkpointer.latest_step() is not None


def run(model_config: ModelConfig, optim_config: OptimConfig, mesh_config: MeshConfig,
        data_config: DataConfig, train_config: TrainConfig, init_from: str | None = None,
        lora_config: LoraConfig | None = None) -> FitResult:
    """What a run gin file binds. Writes the operative config, then trains or resumes.

    `init_from`: HF/Meta/orbax weights to start from (recorded in the run's init_from.json).
    `lora_config`: train LoRA adapters of those weights (loaded again on every resume).
    """
    import json

    import gin
    import jax

    run_dir = Path(train_config.model_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resuming = _has_checkpoint(run_dir)
    if jax.process_index() == 0:
        (run_dir / "config.gin").write_text(gin.operative_config_str())
        if init_from and not resuming:  # records what the run started from, once
            (run_dir / INIT_FROM_FILE).write_text(json.dumps({"path": str(Path(init_from).resolve())}))
    # A resumed full fine-tuning run continues from its own checkpoint: reading INIT_FROM again
    # (tens of GB for a large model) would be wasted. LoRA needs its frozen base every time.
    needs_init = init_from and (lora_config is not None or not resuming)
    init_params = load_init_params(init_from, model_config) if needs_init else None
    result = fit(model_config, optim_config, mesh_config, data_config, train_config,
                 init_params=init_params, lora_config=lora_config)
    if jax.process_index() == 0:
        print(f"{result.status} at step {result.step}: loss {result.loss}, eval_loss {result.eval_loss}",
              flush=True)
    return result


def _split_args(argv: list[str]) -> tuple[list[str], list[str], dict[str, str]]:
    gin_files, bindings, options = [], [], {}
    for arg in argv:
        if arg.startswith("--gin_file="):
            gin_files.append(arg.split("=", 1)[1])
        elif arg.startswith("--gin."):
            bindings.append(arg[len("--gin."):])
        elif arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            options[key] = value
        elif arg.startswith("--"):
            options[arg[2:]] = "true"
        else:
            raise SystemExit(f"unexpected argument {arg!r}; see `python -m experiments.train --help`")
    return gin_files, bindings, options


def _resolve(gin_file: str) -> str:
    for candidate in (Path(gin_file), REPO_ROOT / gin_file, REPO_ROOT / "configs" / gin_file):
        if candidate.exists():
            return str(candidate)
    raise SystemExit(f"gin file {gin_file!r} not found (looked in ., {REPO_ROOT}, {REPO_ROOT / 'configs'})")


def explain_gin_error(error: Exception) -> str:
    """gin's message, plus the nearest valid name for typos in configurables and parameters."""
    import gin

    message = str(error).strip()
    missing_macro = re.search(r"No bindings specified for '(\w+)/gin\.macro'", message)
    if missing_macro:
        return (f"missing required gin macro {missing_macro.group(1)}: define it in your run file or "
                f"pass --gin.{missing_macro.group(1)}=VALUE")
    unknown_param = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", message)
    if unknown_param:
        configurable, name = unknown_param.groups()
        try:
            fn = gin.config._REGISTRY.get_match(configurable).wrapped  # noqa: SLF001
            import inspect

            known = list(inspect.signature(fn).parameters)
        except Exception:  # noqa: BLE001 - best effort suggestion only
            known = []
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else (f"; valid: {known}" if known else "")
        return f"unknown gin binding {configurable}.{name}{hint}"
    unknown_configurable = re.search(r"No configurable matching '([\w.]+)'", message)
    if unknown_configurable:
        name = unknown_configurable.group(1)
        # The registry holds complete selectors ('llamax.train.fit.TrainConfig'); compare as many
        # trailing components as the user wrote ('fit.TrainConfg' -> 'fit.TrainConfig').
        depth = name.count(".") + 1
        known = sorted({".".join(selector.split(".")[-depth:])
                        for selector, _ in gin.config._REGISTRY.items()})  # noqa: SLF001
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown gin configurable {name}{hint}"
    return message


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    gin_files, bindings, options = _split_args(argv)
    if not gin_files:
        raise SystemExit("pass at least one --gin_file=... (e.g. configs/runs/tiny.gin)")

    from llamax.distributed import initialize_from_options

    initialize_from_options(options)
    import gin

    gin.add_config_file_search_path(str(REPO_ROOT))
    gin.add_config_file_search_path(str(REPO_ROOT / "configs"))
    try:
        gin.parse_config_files_and_bindings([_resolve(f) for f in gin_files], bindings)
        for macro in REQUIRED_MACROS:
            gin.query_parameter(f"%{macro}")
        # `python -m` runs this file as __main__; gin registered the importable module's `run`.
        from experiments import train as registered

        runner = gin.get_configurable(registered.run)
    except (ValueError, KeyError, SyntaxError, tokenize.TokenError, RecursionError) as error:
        # gin reports malformed bindings as SyntaxError/TokenError, self-references by recursion.
        print(f"error: {explain_gin_error(error)}", file=sys.stderr)
        return 2
    try:
        runner()
    except ValueError as error:  # every llamax.errors type too: one clear line, no traceback
        print(f"error: {type(error).__name__}: {explain_gin_error(error)}", file=sys.stderr)
        return 1
    except (TypeError, RecursionError) as error:  # a binding of the wrong type reached a config
        print(f"error: invalid gin binding: {type(error).__name__}: {explain_gin_error(error)}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
