"""The layout of llamax's own folders, known here and nowhere else.

A training run directory (`TrainConfig.model_dir`):

    <run>/
      model_config.json   the ModelConfig (`ModelConfig.to_dict`)
      lora_config.json    the LoraConfig of a LoRA run (absent: full training)
      init_from.json      {"path": ...}: the weights the run started from (absent: random init)
      config.gin          the operative config of the command that trained it
      outcome.json        how the last command that trained it ended: {"status", "step", ...}
      tokenizer/          a copy of the tokenizer the run was trained with (`write_tokenizer`)
      special_ids.json    the BOS / EOS (stop) / PAD ids of its model, kept for exports
      metrics.jsonl       one JSON object per logged step (`llamax.train.metrics`)
      tensorboard/        TensorBoard event files
      checkpoints/<step>/ orbax training checkpoints (`llamax.train.checkpoint`)
      lm_eval/step_<N>/   lm-eval results of checkpoint N (`experiments.lm_eval`): results.json,
                          results.md (a table), scores.png (a bar plot)

A params checkpoint folder (`llamax.convert.orbax`) shares the config file:

    <folder>/model_config.json + <folder>/params/ [+ tokenizer/ + special_ids.json]

Both keep the tokenizer of the model they hold (`write_tokenizer`, `tokenizer_dir`,
`read_special_ids`), so sample/eval/export find it without a --tokenizer flag and an HF export
keeps the model's bos/eos/pad ids (`llamax.tokenizer.SpecialIds`).

Nothing is written into a run directory until the run has passed its checks (`RunDir.commit`),
so a run that fails validation leaves the folder as it was and its corrected rerun is accepted.
A run directory without a committed checkpoint may be re-configured freely; one with a checkpoint
must keep its architecture and LoRA shape (`RunDir.check_resumable`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax

from llamax.config import ModelConfig
from llamax.errors import CheckpointError, ConfigError
from llamax.files import atomic_write_text

MODEL_CONFIG_FILE = "model_config.json"
LORA_CONFIG_FILE = "lora_config.json"
INIT_FROM_FILE = "init_from.json"
CONFIG_FILE = "config.gin"
OUTCOME_FILE = "outcome.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
PARAMS_DIR = "params"
LM_EVAL_DIR = "lm_eval"
SPECIAL_IDS_FILE = "special_ids.json"


# ---- model_config.json: runs and params checkpoints ---------------------------------------

def write_model_config(folder: str | os.PathLike, config: ModelConfig) -> Path:
    """Writes `<folder>/model_config.json` (atomically)."""
    return atomic_write_text(Path(folder) / MODEL_CONFIG_FILE, json.dumps(config.to_dict(), indent=2))


def read_model_config(folder: str | os.PathLike) -> ModelConfig:
    """Reads `<folder>/model_config.json`: CheckpointError when missing, ConfigError when bad."""
    path = Path(folder) / MODEL_CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path} not found: llamax params checkpoints and training runs keep "
                              "their ModelConfig there")
    return ModelConfig.from_dict(_read_json(path))


def has_model_config(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MODEL_CONFIG_FILE).is_file()


def is_params_checkpoint(folder: str | os.PathLike) -> bool:
    """A params checkpoint folder: model_config.json + params/."""
    return has_model_config(folder) and (Path(folder) / PARAMS_DIR).is_dir()


def is_run_dir(folder: str | os.PathLike) -> bool:
    """A training run: model_config.json + checkpoints/."""
    return has_model_config(folder) and (Path(folder) / CHECKPOINTS_DIR).is_dir()


def checkpoint_step(path: str | os.PathLike, step: int | None = None) -> int | None:
    """`step`, or the newest committed step when `path` is a training run (None for other
    checkpoints); CheckpointError for a run that has no committed checkpoint yet."""
    if step is not None or not is_run_dir(path):
        return step
    steps = RunDir(path).checkpoint_steps()
    if not steps:
        raise CheckpointError(f"{path} has no committed checkpoint yet")
    return steps[-1]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc


# ---- a training run -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunDir:
    """A training run directory; see the module docstring for its layout."""

    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    def lm_eval_dir(self, step: int) -> Path:
        """Where the lm-eval results of checkpoint `step` are written."""
        return self.path / LM_EVAL_DIR / f"step_{step}"

    def exists(self) -> bool:
        return is_run_dir(self.path)

    # ---- reading ----

    def model_config(self) -> ModelConfig:
        return read_model_config(self.path)

    def lora_config(self) -> Any:
        """The run's LoraConfig, or None for a full-training run."""
        from llamax.model.lora import LoraConfig

        path = self.path / LORA_CONFIG_FILE
        return LoraConfig.from_dict(_read_json(path)) if path.exists() else None

    def init_from(self) -> str | None:
        """The path of the weights the run started from, or None (random init)."""
        path = self.path / INIT_FROM_FILE
        return _read_json(path)["path"] if path.exists() else None

    def tokenizer(self) -> Path | None:
        """The run's copy of its tokenizer (a folder), or None for runs that recorded none."""
        return tokenizer_dir(self.path)

    def outcome(self) -> dict | None:
        """What `write_outcome` recorded for the last training command, or None."""
        path = self.path / OUTCOME_FILE
        return _read_json(path) if path.exists() else None

    def checkpoint_steps(self) -> list[int]:
        """Committed checkpoint steps, ascending ([] when there are none)."""
        if not self.checkpoints.is_dir():
            return []
        from llamax.train.checkpoint import Checkpointer

        with Checkpointer(self.checkpoints, read_only=True) as checkpointer:
            return checkpointer.all_steps()

    # ---- writing ----

    def check_writable(self) -> None:
        """ConfigError naming the path when the run directory cannot be created or written."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"MODEL_DIR {self.path} exists and is not a directory; choose another path")
        probe = self.path
        while not probe.exists():
            probe = probe.parent
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(f"MODEL_DIR {self.path}: {probe} is not writable (permission denied); "
                              "choose a directory you can write")

    def check_resumable(self, model_config: ModelConfig, lora_config: Any) -> bool:
        """True when the run has a checkpoint to resume from; ConfigError when that checkpoint
        belongs to another model or LoRA shape. A run without checkpoints may change freely."""
        if not self.checkpoint_steps():
            return False
        if has_model_config(self.path):
            saved = self.model_config().architecture()
            now = model_config.architecture()
            diff = {k: (v, now[k]) for k, v in saved.items() if now.get(k) != v}
            if diff:
                raise ConfigError(f"{self.path} holds a run of a different model ({diff} as saved vs "
                                  "now); use a new MODEL_DIR or the original model config")
        saved_lora = self.lora_config()
        if saved_lora != lora_config:
            raise ConfigError(f"{self.path} holds a run trained with lora_config={saved_lora} but this "
                              f"run asks for {lora_config}; its checkpoints would not fit. Use a new "
                              "MODEL_DIR or the original LoRA setting")
        return True

    def commit(self, model_config: ModelConfig, *, lora_config: Any = None,
               init_from: str | None = None, tokenizer: str | os.PathLike | None = None,
               special_ids: Any = None, config_text: str | None = None, resuming: bool = False) -> None:
        """Records what the run is, once it passed its checks (process 0 writes; every file is
        written atomically). A resumed run keeps the init_from.json it started with.
        `tokenizer` (a file or folder) and `special_ids` are recorded by `write_tokenizer`."""
        if jax.process_index() != 0:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if config_text is not None:
            atomic_write_text(self.config_file, config_text)
        write_model_config(self.path, model_config)
        lora_path = self.path / LORA_CONFIG_FILE
        if lora_config is None:
            lora_path.unlink(missing_ok=True)
        else:
            atomic_write_text(lora_path, json.dumps(lora_config.to_dict(), indent=2))
        if not resuming:
            init_path = self.path / INIT_FROM_FILE
            if isinstance(init_from, (str, os.PathLike)):
                atomic_write_text(init_path, json.dumps({"path": str(Path(init_from).resolve())}))
            else:
                init_path.unlink(missing_ok=True)
        if tokenizer is not None or special_ids is not None:
            write_tokenizer(self.path, tokenizer, special_ids)

    def clear_outcome(self) -> None:
        """Forgets the recorded outcome (a launcher does this before starting a new attempt)."""
        (self.path / OUTCOME_FILE).unlink(missing_ok=True)

    def write_outcome(self, status: str, step: int, **details: Any) -> None:
        """Records how a training command ended ('completed' or 'preempted'); launchers read it
        rather than parsing what the run printed. A failed run writes nothing."""
        if jax.process_index() == 0:
            atomic_write_text(self.path / OUTCOME_FILE,
                              json.dumps({"status": status, "step": step, **details}))


# ---- the tokenizer of a run or params checkpoint --------------------------------------------

def write_tokenizer(folder: str | os.PathLike, tokenizer: str | os.PathLike | None,
                    special_ids: Any = None) -> None:
    """Records the tokenizer of the model in `folder` (a run or a params checkpoint): a copy of
    the tokenizer file or folder in `<folder>/tokenizer/` (replacing an older copy as a whole; see
    `llamax.tokenizer.files.copy_tokenizer_files`) and `special_ids` (a `SpecialIds`) in
    `special_ids.json`. Either may be None: then that part is left out (and an older
    special_ids.json removed: it described another tokenizer)."""
    from llamax.tokenizer.files import copy_tokenizer_files

    folder = Path(folder)
    if tokenizer is not None:
        staging = folder / f".{TOKENIZER_DIR}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            copy_tokenizer_files(tokenizer, staging)
            shutil.rmtree(folder / TOKENIZER_DIR, ignore_errors=True)
            os.replace(staging, folder / TOKENIZER_DIR)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if special_ids is not None and not special_ids.empty:
        atomic_write_text(folder / SPECIAL_IDS_FILE, json.dumps(special_ids.to_dict()))
    else:
        (folder / SPECIAL_IDS_FILE).unlink(missing_ok=True)


def tokenizer_dir(folder: str | os.PathLike) -> Path | None:
    """`<folder>/tokenizer/` when the run or params checkpoint recorded its tokenizer, else None."""
    path = Path(folder) / TOKENIZER_DIR
    return path if path.is_dir() else None


def read_special_ids(folder: str | os.PathLike) -> Any:
    """The `SpecialIds` a run or params checkpoint recorded, or None."""
    from llamax.tokenizer.special_ids import SpecialIds

    path = Path(folder) / SPECIAL_IDS_FILE
    if not path.is_file():
        return None
    values = _read_json(path)
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a JSON object of bos_id, eos_ids, pad_id")
    return SpecialIds.from_dict(values, str(path))
