"""PEFT-format LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, both ways.

    save_peft(config, lora_config, adapters, "out/")       # peft's PeftModel.from_pretrained reads it
    lora_config, adapters = load_peft("adapter/", config)   # a peft-made adapter, as llamax adapters

The tensor table (layer i, projection p of `self_attn` or `mlp`):

    base_model.model.model.layers.{i}.{block}.{p}.lora_A.weight   [rank, in]   = A.reshape(in, rank).T
    base_model.model.model.layers.{i}.{block}.{p}.lora_B.weight   [out, rank]  = B.reshape(rank, out).T

where llamax's A is [(layers,) inputs..., rank] and B [(layers,) rank, outputs...] (`llamax.model.lora`):
the flattened input/output axes are HF's, as for the kernels (`llamax.convert.hf`). Both sides
scale the update by lora_alpha / r. Rank, alpha and targets carry over; llamax trains without LoRA
dropout, so exports say `lora_dropout: 0.0` and an imported dropout is recorded in the warning
only. PEFT options llamax does not compute the same way (DoRA, rsLoRA, per-module ranks, LoRA
biases, modules_to_save, ...) are refused by name rather than silently dropped.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from llamax.config import ModelConfig
from llamax.errors import CheckpointError, ConfigError
from llamax.files import atomic_output_dir, check_destination
from llamax.model.lora import LORA_TARGETS, LoraConfig, abstract_adapters, check_adapters
from llamax.tree_paths import nest

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
PREFIX = "base_model.model.model.layers"
# PEFT options whose non-default value changes the computation: refused by name.
UNSUPPORTED = {
    "use_dora": ("DoRA (weight-decomposed LoRA)", (False, None)),
    "use_rslora": ("rsLoRA (alpha / sqrt(r) scaling)", (False, None)),
    "lora_bias": ("LoRA bias terms", (False, None)),
    "use_qalora": ("QA-LoRA", (False, None)),
    "bias": ("trained biases (llamax projections have none)", ("none", None)),
    "fan_in_fan_out": ("fan_in_fan_out (Conv1D-style weights)", (False, None)),
    "modules_to_save": ("modules_to_save (fully trained extra modules)", (None, [])),
    "layers_to_transform": ("layers_to_transform (adapters on some layers only)", (None, [])),
    "rank_pattern": ("rank_pattern (per-module ranks)", (None, {})),
    "alpha_pattern": ("alpha_pattern (per-module alphas)", (None, {})),
    "layer_replication": ("layer_replication", (None, [])),
    "trainable_token_indices": ("trainable_token_indices", (None, [], {})),
    "target_parameters": ("target_parameters", (None, [])),
    "exclude_modules": ("exclude_modules", (None, [])),
}


def _layer_adapters(config: ModelConfig, lora: LoraConfig, adapters: Mapping):
    """Yields (layer, projection, A [in..., r], B [r, out...]) of every adapter, scanned or not."""
    for path_root, layer_tree in adapters.items():
        for block in layer_tree.values():
            for projection, pair in block.items():
                a, b = np.asarray(pair["lora_a"]), np.asarray(pair["lora_b"])
                if path_root == "layers":  # scanned: a leading [layers] axis
                    for layer in range(config.num_layers):
                        yield layer, projection, a[layer], b[layer]
                else:
                    yield int(path_root.rsplit("_", 1)[1]), projection, a, b


def peft_config_dict(lora: LoraConfig, base_model: str | None = None) -> dict[str, Any]:
    """The adapter_config.json of an llamax LoRA (PEFT's LoraConfig fields)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": 0.0, "target_modules": sorted(lora.targets), "bias": "none",
            "use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
            "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model,
            "revision": None}


def save_peft(config: ModelConfig, lora: LoraConfig, adapters: Mapping, path: str | os.PathLike, *,
              base_model: str | os.PathLike | None = None, dtype: Any = None,
              overwrite: bool = False) -> Path:
    """Writes adapters as a PEFT adapter folder (all-or-nothing); `base_model` is recorded as
    `base_model_name_or_path` (PEFT loads the adapter onto whatever base it is given)."""
    from safetensors.numpy import save_file

    from llamax.dtypes import parse_dtype

    if str(dtype).lower() == "q8_0":
        raise ConfigError("dtype q8_0 only applies to GGUF output; write PEFT adapters as bf16, fp32 or fp16")
    out_dtype = parse_dtype(dtype)
    check_adapters(config, lora, adapters)
    check_destination(path, overwrite)
    tensors = {}
    for layer, projection, a, b in _layer_adapters(config, lora, adapters):
        rank = a.shape[-1]
        name = f"{PREFIX}.{layer}.{BLOCKS[projection]}.{projection}"
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)  # [rank, in]
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)  # [out, rank]
    if out_dtype is not None:
        tensors = {k: v.astype(out_dtype) for k, v in tensors.items()}
    with atomic_output_dir(path, overwrite=overwrite) as staging:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        base = None if base_model is None else str(base_model)
        (staging / ADAPTER_CONFIG).write_text(json.dumps(peft_config_dict(lora, base), indent=2))
    return Path(path)


def is_peft_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_peft_config(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, Any]]:
    """(LoraConfig, the raw adapter_config.json) of a PEFT folder; ConfigError naming any option
    llamax does not support."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise CheckpointError(f"{path} is not a PEFT adapter folder: {ADAPTER_CONFIG} not found")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from e
    where = f"PEFT adapter {path}"
    if raw.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{where} is a {raw.get('peft_type')} adapter; llamax reads LoRA adapters only")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise ConfigError(f"{where} has task_type={raw['task_type']!r}; llamax reads CAUSAL_LM adapters")
    for option, (what, defaults) in UNSUPPORTED.items():
        if option in raw and raw[option] not in defaults:
            raise ConfigError(f"{where} uses {option}={raw[option]!r} ({what}), which llamax does not "
                              "support; train the adapter without it")
    targets = raw.get("target_modules")
    if targets == "all-linear":
        targets = list(LORA_TARGETS)
    elif isinstance(targets, str):
        if targets not in LORA_TARGETS:
            raise ConfigError(f"{where} has target_modules={targets!r} (a regular expression); llamax "
                              f"needs a list of module names among {LORA_TARGETS}")
        targets = [targets]
    unknown = sorted(set(targets or []) - set(LORA_TARGETS))
    if not targets or unknown:
        raise ConfigError(f"{where} targets {unknown or targets}, which are not LLaMA projections llamax "
                          f"adapts ({', '.join(LORA_TARGETS)})")
    if raw.get("lora_dropout"):
        log.warning("%s: lora_dropout=%s is not applied (llamax LoRA has no dropout)", where,
                    raw["lora_dropout"])
    try:
        lora = LoraConfig(rank=raw["r"], alpha=float(raw["lora_alpha"]),
                          targets=tuple(t for t in LORA_TARGETS if t in targets))
    except KeyError as e:
        raise ConfigError(f"{where}: {ADAPTER_CONFIG} has no {e}") from None
    return lora, raw


def _check_base_architecture(raw: dict, config: ModelConfig, where: str) -> None:
    """ConfigError when the adapter names a local base folder of another architecture."""
    base = raw.get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        return  # a hub name or none: the tensor shapes are checked instead
    from llamax.convert.hf import read_hf_config

    theirs, ours = read_hf_config(base).architecture(), config.architecture()
    differences = {k: (theirs[k], ours[k]) for k in ours
                   if k != "max_position_embeddings" and ours[k] != theirs.get(k)}
    if differences:
        raise ConfigError(f"{where} was made for the base {base}, a different model (adapter's base vs "
                          f"this model): {differences}; use it with that base")


def load_peft(path: str | os.PathLike, config: ModelConfig) -> tuple[LoraConfig, dict]:
    """(LoraConfig, adapters as numpy arrays laid out for `config`) of a PEFT adapter folder."""
    from safetensors import safe_open

    lora, raw = read_peft_config(path)
    where = f"PEFT adapter {path}"
    _check_base_architecture(raw, config, where)
    weights = Path(path) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{where} has no {ADAPTER_WEIGHTS} (a .bin adapter? re-save it with "
                              "safe_serialization=True)")
    with safe_open(str(weights), "numpy") as f:
        stored = {name.replace(".default.", "."): f.get_tensor(name) for name in f.keys()}
    shapes = abstract_adapters(config, lora)
    flat, expected = {}, set()
    for layer in range(config.num_layers):
        for projection in lora.targets:
            block = BLOCKS[projection]
            name = f"{PREFIX}.{layer}.{block}.{projection}"
            leaf = (("layers", block, projection) if config.scan_layers
                    else (f"layers_{layer}", block, projection))
            node = shapes[leaf[0]][block][projection]
            a_shape, b_shape = node["lora_a"].shape, node["lora_b"].shape
            if config.scan_layers:
                a_shape, b_shape = a_shape[1:], b_shape[1:]
            for kind, key, shape in (("A", "lora_a", a_shape), ("B", "lora_b", b_shape)):
                tensor_name = f"{name}.lora_{kind}.weight"
                expected.add(tensor_name)
                if tensor_name not in stored:
                    raise ConfigError(f"{where} lacks {tensor_name}: it was made for another model "
                                      f"(this one has {config.num_layers} layers, targets {lora.targets})")
                tensor = stored[tensor_name]
                want = ((lora.rank, int(np.prod(shape[:-1]))) if kind == "A"
                        else (int(np.prod(shape[1:])), lora.rank))
                if tensor.shape != want:
                    raise ConfigError(f"{where}: {tensor_name} is {tensor.shape}, this model needs {want}: "
                                      "the adapter was made for a base of another architecture")
                value = tensor.T.reshape(shape).astype(np.dtype(lora.dtype))
                flat.setdefault(leaf + (key,), []).append(value)
    extra = sorted(set(stored) - expected)
    if extra:
        raise ConfigError(f"{where} holds tensors llamax would ignore, e.g. {extra[:3]}; a base of another "
                          "architecture or unsupported adapted modules")
    adapters = nest({leaf: (np.stack(values) if config.scan_layers else values[0])
                     for leaf, values in flat.items()})
    check_adapters(config, lora, adapters)
    return lora, adapters


def save_run_peft(run: str | os.PathLike, path: str | os.PathLike, *, step: int | None = None,
                  base_model: str | os.PathLike | None = None, dtype: Any = None,
                  overwrite: bool = False) -> Path:
    """Writes the adapters of a LoRA training run (its newest checkpoint, or `step`) as a PEFT
    adapter folder; `base_model_name_or_path` is `base_model` or the run's INIT_FROM."""
    from llamax.run_dir import RunDir, checkpoint_step
    from llamax.train.checkpoint import restore_params

    run_dir = RunDir(run)
    lora = run_dir.lora_config()
    if lora is None:
        raise ConfigError(f"{run} is a full fine-tuning run: it has no adapters to write in PEFT format; "
                          "export it as --format hf (or meta, orbax)")
    adapters = restore_params(run_dir.checkpoints, checkpoint_step(run, step))
    return save_peft(run_dir.model_config(), lora, adapters, path, dtype=dtype, overwrite=overwrite,
                     base_model=base_model or run_dir.init_from())


def peft_base(path: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """The base checkpoint of a PEFT adapter folder: `base`, else its `base_model_name_or_path`
    when that is a local checkpoint; CheckpointError asking for --base otherwise."""
    _, raw = read_peft_config(path)
    base = base or raw.get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise CheckpointError(f"PEFT adapter {path} needs its base weights: pass them (--base); its "
                              f"base_model_name_or_path {base!r} is not a local folder")
    return Path(base)


def merge_peft(path: str | os.PathLike, base: str | os.PathLike | None = None,
               **config_overrides: Any) -> tuple[ModelConfig, dict]:
    """(config, params) of a PEFT adapter folder merged into its base: `base`, or the adapter's
    `base_model_name_or_path` when that is a local folder."""
    from llamax.convert.hub import load_any
    from llamax.model.lora import merge_lora

    config, params = load_any(peft_base(path, base), **config_overrides)
    lora, adapters = load_peft(path, config)
    return config, merge_lora(config, params, adapters, lora)
