"""Any of HF, Meta and orbax folders -> any other, one tensor at a time, all-or-nothing.

Every conversion goes through HF tensor names and layouts ([out, in] matrices, half-split
rotary rows): a *source* is a lazy mapping from HF names to numpy arrays that lists its names in
the order it reads cheapest, and a *sink* accepts HF-named tensors in any order and writes each
one straight to its place in the output files. So the peak memory is a few tensors:

  source  | what one read holds                      sink   | what one write holds
  hf      | one tensor (memory-mapped safetensors)   hf     | one tensor (written at its offset)
  meta    | one tensor, assembled from its shards    meta   | one tensor (slices written in place)
  orbax   | one params leaf (a scanned stack)        orbax  | one layer slice; then orbax saves
                                                              memory-mapped leaves, <= 1 GB in flight

Output goes to a temporary sibling folder renamed into place at the end (`atomic_output_dir`).
"""
from __future__ import annotations

import collections.abc
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from llamax import run_dir
from llamax.config import ModelConfig
from llamax.convert.hf import (LAYER_TABLE, TOP_TABLE, HFWriter, expected_hf_shapes, hf_to_params,
                               match_hf_tensors, params_to_hf, read_hf_config)
from llamax.convert.meta import MetaReader, MetaWriter
from llamax.convert.orbax import LeafPath, LeafReader, LeafWriter
from llamax.convert.weight_files import WeightFolder
from llamax.dtypes import parse_dtype
from llamax.errors import CheckpointError, ConfigError
from llamax.files import atomic_output_dir, check_destination

FORMATS = ("hf", "meta", "orbax")


def detect_format(path: str | os.PathLike) -> str | None:
    """'hf', 'meta' or 'orbax' from the files in `path`, or None if it is none of them."""
    path = Path(path)
    if (path / "params.json").exists():
        return "meta"
    if (path / "config.json").exists():
        return "hf"
    if run_dir.has_model_config(path) or (path / "state").is_dir():  # a run's step folder has state/
        return "orbax"
    return None


def hf_leaf_table(config: ModelConfig) -> dict[str, tuple[LeafPath, int | None, Callable, Callable]]:
    """HF name -> (scanned llamax leaf path, layer index or None, to_llamax, to_hf)."""
    table = {}
    for path, (name, _, to_llamax, to_hf) in TOP_TABLE.items():
        if not (path[0] == "lm_head" and config.tie_word_embeddings):
            table[name] = (path, None, to_llamax, to_hf)
    for path, (suffix, _, to_llamax, to_hf) in LAYER_TABLE.items():
        for layer in range(config.num_layers):
            table[f"model.layers.{layer}.{suffix}"] = (("layers", *path), layer, to_llamax, to_hf)
    return table


# ---- sources ------------------------------------------------------------------------------

class HFSource:
    """An HF folder (safetensors memory-mapped; `.bin` one shard at a time), checked up front."""

    def __init__(self, path: Path):
        self.config = read_hf_config(path)
        self.weights = WeightFolder(path)
        try:
            self._where = match_hf_tensors(self.config, self.weights, self.weights.shape)
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None
        self.dtype = np.asarray(self[next(iter(self._where))]).dtype

    def names(self) -> list[str]:
        return list(self._where)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.weights[self._where[name]]


class MetaSource:
    """A Meta folder; names come layer by layer, so each shard is read front to back."""

    def __init__(self, path: Path, **config_overrides: Any):
        self.reader = MetaReader(path, **config_overrides)
        self.config, self.dtype = self.reader.config, self.reader.dtype

    def names(self) -> list[str]:
        return list(self.reader)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.reader[name]


class OrbaxSource:
    """A params checkpoint or training run; names come leaf by leaf and one leaf is cached."""

    def __init__(self, path: Path, step: int | None = None):
        self.reader = LeafReader(path, step)
        self.config = self.reader.config
        self.table = hf_leaf_table(self.config)
        self._cached: tuple[LeafPath | None, np.ndarray | None] = (None, None)
        for name, (leaf, layer, to_llamax, _) in self.table.items():
            if self._leaf(leaf, layer) not in self.reader.leaves:
                raise CheckpointError(f"{self.reader.location.tree_dir} lacks params leaf "
                                      f"{'/'.join(self._leaf(leaf, layer))} (for {name})")
        self.dtype = self.reader.leaves[("embed_tokens", "embedding")][1]

    def _leaf(self, leaf: LeafPath, layer: int | None) -> LeafPath:
        if layer is None or self.config.scan_layers:
            return leaf
        return (f"layers_{layer}", *leaf[1:])

    def names(self) -> list[str]:
        return sorted(self.table, key=lambda n: (self._leaf(*self.table[n][:2]), self.table[n][1] or 0))

    def __getitem__(self, name: str) -> np.ndarray:
        leaf, layer, _, to_hf = self.table[name]
        stored = self._leaf(leaf, layer)
        if self._cached[0] != stored:
            self._cached = (None, None)  # drop the previous leaf before reading the next
            self._cached = (stored, self.reader.read(stored))
        value = self._cached[1]
        if layer is not None and self.config.scan_layers:
            value = value[layer]
        return to_hf(value, self.config)


def open_source(path: str | os.PathLike, fmt: str, *, step: int | None = None):
    """The source for `path` in format `fmt`; errors point at the right format when it is wrong."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown source format {fmt!r}; expected one of {FORMATS}")
    if not path.exists():
        raise CheckpointError(f"source {path} does not exist")
    detected = detect_format(path)
    if fmt == "hf" and detected not in (None, "hf"):
        raise CheckpointError(f"{path} has no config.json: not an HF checkpoint; it looks like a {detected} "
                              f"checkpoint (--src_format {detected})")
    if fmt == "hf":
        return HFSource(path)
    if fmt == "meta":
        return MetaSource(path)
    return OrbaxSource(path, step)


# ---- sinks --------------------------------------------------------------------------------

class OrbaxSink:
    """Writes a scanned params checkpoint (see `llamax.convert.orbax`) from HF tensors."""

    def __init__(self, config: ModelConfig, folder: Path, dtype: np.dtype):
        self.config = config
        self.table = hf_leaf_table(config)
        shapes = {}
        hf_shapes = expected_hf_shapes(config)
        for name, (leaf, layer, to_llamax, _) in self.table.items():
            shape = to_llamax(np.empty(hf_shapes[name], np.int8), config).shape
            shapes[leaf] = shape if layer is None else (config.num_layers, *shape)
        self.writer = LeafWriter(folder, config, shapes, dtype)

    def write(self, name: str, array: np.ndarray) -> None:
        leaf, layer, to_llamax, _ = self.table[name]
        self.writer.write(leaf, layer, to_llamax(np.asarray(array), self.config))

    def close(self) -> None:
        self.writer.close()


def open_sink(fmt: str, config: ModelConfig, folder: Path, dtype: np.dtype, *, num_shards: int = 1,
              max_shard_size: int = 5 * 2**30):
    if fmt == "hf":
        return HFWriter(config, folder, dtype, max_shard_size)
    if fmt == "meta":
        return MetaWriter(config, folder, dtype=dtype, num_shards=num_shards)
    if fmt == "orbax":
        return OrbaxSink(config, folder, dtype)
    raise ConfigError(f"unknown destination format {fmt!r}; expected one of {FORMATS}")


def convert(src: str | os.PathLike, src_format: str, dst: str | os.PathLike, dst_format: str, *,
            dtype: Any = None, num_shards: int = 1, overwrite: bool = False, step: int | None = None,
            max_shard_size: int = 5 * 2**30, progress: bool = True) -> Path:
    """Converts the checkpoint folder `src` into `dst`, tensor by tensor.

    Args:
      src_format, dst_format: 'hf', 'meta' or 'orbax' (a params checkpoint; as a source also a
        training run, its checkpoints/ folder or one step folder).
      dtype: 'bf16', 'fp32', 'fp16' or None to keep the source's dtype (that of the embeddings).
      num_shards: model-parallel shards of a Meta output.
      overwrite: replace an existing `dst`; otherwise an existing, non-empty `dst` is refused.
      step: training step to read from an orbax run (None: the newest committed one).
      max_shard_size: bytes per safetensors file of an HF output.
      progress: show a tqdm bar of tensors converted.
    """
    for what, fmt in (("source", src_format), ("destination", dst_format)):
        if fmt not in FORMATS:
            raise ConfigError(f"unknown {what} format {fmt!r}; expected one of {FORMATS}")
    if num_shards != 1 and dst_format != "meta":
        raise ConfigError(f"num_shards={num_shards} only applies to Meta output (--dst_format meta)")
    if Path(src).absolute() == Path(dst).absolute():
        raise ConfigError(f"source and destination are the same folder {src}; write somewhere else")
    check_destination(dst, overwrite)
    source = open_source(src, src_format, step=step)
    out_dtype = parse_dtype(dtype) or source.dtype
    names = source.names()
    with atomic_output_dir(dst, overwrite=overwrite) as staging:
        sink = open_sink(dst_format, source.config, staging, out_dtype, num_shards=num_shards,
                         max_shard_size=max_shard_size)
        for name in tqdm(names, desc=f"{src_format} -> {dst_format}", unit="tensor", disable=not progress):
            sink.write(name, source[name])
        sink.close()
    return Path(dst)


class _SourceMapping(collections.abc.Mapping):
    """A source viewed as the HF-name -> tensor mapping `hf_to_params` reads."""

    def __init__(self, source):
        self._source, self._names = source, source.names()

    def __getitem__(self, name: str) -> np.ndarray:
        return self._source[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_any(path: str | os.PathLike, fmt: str | None = None, *, step: int | None = None,
             base: str | os.PathLike | None = None, **config_overrides: Any) -> tuple[ModelConfig, dict]:
    """(config, numpy params) of any checkpoint llamax reads: an HF, Meta or orbax params folder,
    or a training run (its newest committed step unless `step`). The format is detected from the
    files unless `fmt` says. A LoRA run comes back with its adapters merged into its base weights
    (`base`, default: the INIT_FROM the run recorded), and so does a PEFT adapter folder (`base`,
    default: its base_model_name_or_path; `llamax.convert.peft`). `config_overrides` (e.g. scan_layers,
    param_dtype) shape the params."""
    from llamax.convert.peft import is_peft_folder, merge_peft

    if fmt is None and is_peft_folder(path):  # a PEFT LoRA adapter: merged into its base
        return merge_peft(path, base, **config_overrides)
    fmt = fmt or detect_format(path)
    if fmt is None:
        raise CheckpointError(f"{path} is not an HF (config.json), Meta (params.json) or llamax orbax "
                              "(a params checkpoint or a training run) checkpoint")
    if fmt == "orbax" and run_dir.is_run_dir(path) and run_dir.RunDir(path).lora_config() is not None:
        config, params = _merged_lora_run(run_dir.RunDir(path), step, base)
        if config_overrides:  # re-lay the merged params out (scanned or not, dtype) via HF names
            wanted = config.replace(**config_overrides)
            params = hf_to_params(wanted, dict(params_to_hf(config, params)))
            config = wanted
        return config, params
    source = open_source(path, fmt, step=step)
    config = source.config.replace(**config_overrides)
    return config, hf_to_params(config, _SourceMapping(source))


def _merged_lora_run(run: run_dir.RunDir, step: int | None, base: str | os.PathLike | None
                     ) -> tuple[ModelConfig, dict]:
    """A LoRA run's adapters (of `step`, or the newest) folded into its base weights."""
    from llamax.model.lora import merge_lora
    from llamax.train.checkpoint import restore_params

    config, lora_config = run.model_config(), run.lora_config()
    adapters = restore_params(run.checkpoints, step)
    base = base or run.init_from()
    if base is None:
        raise CheckpointError(f"{run.path} is a LoRA run that started from a random base (it recorded "
                              "no INIT_FROM); pass the base weights (--base)")
    base_config, base_params = load_any(base, scan_layers=config.scan_layers, param_dtype=config.param_dtype)
    if base_config.architecture() != config.architecture():
        raise CheckpointError(f"base weights {base} are not the model the LoRA run {run.path} trained "
                              "on; pass the run's INIT_FROM (--base)")
    return config, merge_lora(config, base_params, adapters, lora_config)


def save_any(config: ModelConfig, params: Any, path: str | os.PathLike, fmt: str, *,
             dtype: Any = None, num_shards: int = 1, overwrite: bool = False) -> Path:
    """Writes in-memory params as an HF folder, a Meta folder or an orbax params checkpoint
    (all-or-nothing, like every writer); `dtype` casts on the way out (None keeps it)."""
    from llamax.convert.hf import save_hf
    from llamax.convert.meta import save_meta
    from llamax.convert.orbax import save_params

    if fmt == "hf":
        return save_hf(config, params, path, dtype=dtype, overwrite=overwrite)
    if fmt == "meta":
        return save_meta(config, params, path, num_shards=num_shards, dtype=dtype, overwrite=overwrite)
    if fmt == "orbax":
        out_dtype = parse_dtype(dtype)
        if out_dtype is not None:
            params = jax.tree.map(lambda x: np.asarray(x).astype(out_dtype), params)
        return save_params(path, config, params, overwrite=overwrite)
    raise ConfigError(f"unknown destination format {fmt!r}; expected one of {FORMATS}")
