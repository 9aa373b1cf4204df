"""Merge a LoRA run's adapters into its base weights and write HF, Meta or orbax weights.

    python -m experiments.export_lora --run RUN_DIR --out DIR --format {hf,meta,orbax} \
        [--base PATH] [--step STEP] [--dtype bf16|fp32|fp16] [--num_shards N] [--overwrite]

The adapters come from the run's newest checkpoint (or --step), their shape from the run's
lora_config.json, and the base weights from --base or else the INIT_FROM recorded in the run's
init_from.json. A full fine-tuning run (no lora_config.json) is exported as is, so this works for
any run; `experiments.convert` also converts those. Errors print one line and exit with status 1.
Installed as the `llamax-export-lora` console script.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from llamax.config import ModelConfig
from llamax.errors import CheckpointError, LlamaxError

FORMATS = ("hf", "meta", "orbax")


def is_run_dir(path: str | os.PathLike) -> bool:
    """A training run folder (model_config.json + checkpoints/), as `llamax.train.fit` writes."""
    return (Path(path) / "model_config.json").exists() and (Path(path) / "checkpoints").is_dir()


def run_base_path(run_dir: str | os.PathLike) -> str | None:
    """The INIT_FROM a run started from (its init_from.json), or None."""
    path = Path(run_dir) / "init_from.json"
    return json.loads(path.read_text())["path"] if path.exists() else None


def load_run_params(path: str | os.PathLike, *, step: int | None = None, base: str | None = None
                    ) -> tuple[ModelConfig, dict, int | None]:
    """(config, numpy params, step) of a checkpoint with any LoRA adapters merged in.

    `path`: a training run (LoRA or not), or an HF/Meta/orbax params folder (step None then).
    `base`: base weights of a LoRA run (default: the run's recorded INIT_FROM).
    """
    from llamax.train.checkpoint import Checkpointer
    from llamax.convert.hub import load_any
    from llamax.train.fit import read_lora_config, read_model_config
    from llamax.model.lora import merge_lora

    if not is_run_dir(path):
        config, params = load_any(path)
        return config, params, None
    with Checkpointer(Path(path) / "checkpoints", read_only=True) as checkpointer:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{path} has no committed checkpoint yet")
        lora_config = read_lora_config(path)
        if lora_config is None:
            config, params = load_any(path, step=step)
            return config, params, step
        adapters = checkpointer.restore_params(step)
    config = read_model_config(path)
    base = base or run_base_path(path)
    if base is None:
        raise CheckpointError(f"{path} is a LoRA run without init_from.json (it started from a "
                              "random base); pass the base weights with --base")
    base_config, base_params = load_any(base, scan_layers=config.scan_layers,
                                        param_dtype=config.param_dtype)
    if base_config.architecture() != config.architecture():
        raise CheckpointError(f"base weights {base} are not the model the LoRA run {path} trained "
                              "on; pass the run's INIT_FROM with --base")
    return config, merge_lora(config, base_params, adapters, lora_config), step


def write_params(config: ModelConfig, params: Any, out: str | os.PathLike, fmt: str, *,
                 dtype: str | None = None, num_shards: int = 1, overwrite: bool = False) -> Path:
    """Writes params as an HF folder, a Meta folder or an orbax params checkpoint."""
    import jax
    import numpy as np

    from llamax.convert import save_hf
    from llamax.dtypes import parse_dtype
    from llamax.convert.meta import save_meta
    from llamax.convert.orbax import save_params

    out_dtype = parse_dtype(dtype)
    if fmt == "hf":
        return save_hf(config, params, out, dtype=out_dtype, overwrite=overwrite)
    if fmt == "meta":
        return save_meta(config, params, out, num_shards=num_shards, dtype=out_dtype,
                         overwrite=overwrite)
    if fmt == "orbax":
        if out_dtype is not None:
            params = jax.tree.map(lambda x: np.asarray(x).astype(out_dtype), params)
        return save_params(out, config, params, overwrite=overwrite)
    raise CheckpointError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llamax-export-lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="training run folder (LoRA or full)")
    parser.add_argument("--out", required=True, help="destination folder")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--base", default=None, help="base weights (default: the run's INIT_FROM)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32", "fp16"],
                        help="output dtype (default: the params' dtype)")
    parser.add_argument("--num_shards", type=int, default=1, help="model-parallel shards (meta)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # merging is host work
    try:
        config, params, step = load_run_params(args.run, step=args.step, base=args.base)
        path = write_params(config, params, args.out, args.format, dtype=args.dtype,
                            num_shards=args.num_shards, overwrite=args.overwrite)
    except (LlamaxError, OSError) as error:
        print(f"llamax-export-lora: error: {error}".splitlines()[0], file=sys.stderr)
        return 1
    print(f"wrote {args.format} checkpoint of {args.run} step {step} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
