"""Any of HF, Meta, orbax folders and GGUF files -> any other, one tensor at a time, all-or-nothing.

Every conversion goes through HF tensor names and layouts ([out, in] matrices, half-split
rotary rows): a *source* is a lazy mapping from HF names to numpy arrays that lists its names in
the order it reads cheapest, and a *sink* accepts HF-named tensors in any order and writes each
one straight to its place in the output files. So the peak memory is a few tensors:

  source  | what one read holds                      sink   | what one write holds
  hf      | one tensor (memory-mapped safetensors)   hf     | one tensor (written at its offset)
  meta    | one tensor, assembled from its shards    meta   | one tensor (slices written in place)
  orbax   | one params leaf (a scanned stack)        orbax  | one layer slice; then orbax saves
                                                              memory-mapped leaves, <= 1 GB in flight
  gguf    | one tensor, dequantized (memory-mapped)  gguf   | one tensor (encoded, written at its offset)

A GGUF carries its tokenizer: converting one to a folder writes it there as tokenizer.json (like
any source's tokenizer), and exporting to GGUF embeds the checkpoint's tokenizer (`--tokenizer`
or the source's own, see `identity.find_tokenizer`).

Output goes to a temporary sibling folder renamed into place at the end (`atomic_output_dir`).
Every output keeps the source's tokenizer and special ids (`llamax.convert.identity`), so an
exported model tokenizes and stops as the source did.
"""
from __future__ import annotations

import collections.abc
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from llamax import run_dir
from llamax.config import ModelConfig
from llamax.convert.hf import (LAYER_TABLE, TOP_TABLE, HFWriter, check_params, expected_hf_shapes,
                               hf_to_params, match_hf_tensors, params_to_hf, read_hf_config)
from llamax.convert.identity import CheckpointIdentity, identity_of, read_identity, write_identity
from llamax.convert.meta import MetaReader, MetaWriter
from llamax.convert.orbax import LeafPath, LeafReader, LeafWriter
from llamax.convert.weight_files import WeightFolder
from llamax.dtypes import parse_dtype
from llamax.errors import CheckpointError, ConfigError
from llamax.files import atomic_output_dir, atomic_output_file, check_destination

FORMATS = ("hf", "meta", "orbax", "gguf")


def detect_format(path: str | os.PathLike) -> str | None:
    """'hf', 'meta', 'orbax' or 'gguf' from the files in `path`, or None if it is none of them."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
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
    if fmt == "gguf":
        from llamax.convert.gguf import GGUFSource
        return GGUFSource(path)
    return OrbaxSource(path, step)


# ---- sinks --------------------------------------------------------------------------------

class OrbaxSink:
    """Writes a scanned params checkpoint (see `llamax.convert.orbax`) from HF tensors."""

    def __init__(self, config: ModelConfig, folder: Path, dtype: np.dtype,
                 identity: CheckpointIdentity | None = None):
        self.config, self.folder, self.identity = config, folder, identity
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
        write_identity("orbax", self.folder, self.identity)


class MetaSink(MetaWriter):
    """A Meta folder that also carries the tokenizer and special ids (`write_identity`)."""

    def __init__(self, config: ModelConfig, folder: Path, dtype: np.dtype, num_shards: int,
                 identity: CheckpointIdentity | None = None):
        super().__init__(config, folder, dtype=dtype, num_shards=num_shards)
        self.folder, self.identity = folder, identity

    def close(self) -> None:
        super().close()
        write_identity("meta", self.folder, self.identity)


def open_sink(fmt: str, config: ModelConfig, folder: Path, dtype: np.dtype, *, num_shards: int = 1,
              max_shard_size: int = 5 * 2**30, identity: CheckpointIdentity | None = None):
    """The writer of format `fmt` into `folder`; `identity` (tokenizer, special ids) goes with it."""
    identity = identity or CheckpointIdentity()
    if identity.special_ids is not None:
        identity.special_ids.check_vocab(config.vocab_size, f"{fmt} output")
    if fmt == "hf":
        return HFWriter(config, folder, dtype, max_shard_size, special_ids=identity.special_ids,
                        tokenizer=identity.tokenizer)
    if fmt == "meta":
        return MetaSink(config, folder, dtype, num_shards, identity)
    if fmt == "orbax":
        return OrbaxSink(config, folder, dtype, identity)
    raise ConfigError(f"unknown destination format {fmt!r}; expected one of {FORMATS}")


def convert(src: str | os.PathLike, src_format: str, dst: str | os.PathLike, dst_format: str, *,
            dtype: Any = None, num_shards: int = 1, overwrite: bool = False, step: int | None = None,
            max_shard_size: int = 5 * 2**30, progress: bool = True,
            tokenizer: str | os.PathLike | None = None) -> Path:
    """Converts the checkpoint folder (or GGUF file) `src` into `dst`, tensor by tensor, with its
    tokenizer and special ids (`llamax.convert.identity`).

    Args:
      src_format, dst_format: 'hf', 'meta', 'orbax' (a params checkpoint; as a source also a
        training run, its checkpoints/ folder or one step folder) or 'gguf' (one .gguf file).
      dtype: 'bf16', 'fp32', 'fp16' (GGUF output also 'q8_0') or None to keep the source's dtype
        (that of the embeddings; a quantized GGUF source reads as fp32).
      num_shards: model-parallel shards of a Meta output.
      overwrite: replace an existing `dst`; otherwise an existing, non-empty `dst` is refused.
      step: training step to read from an orbax run (None: the newest committed one).
      max_shard_size: bytes per safetensors file of an HF output.
      progress: show a tqdm bar of tensors converted.
      tokenizer: the tokenizer (file, folder or checkpoint) to ship with `dst` (embed in a GGUF)
        and take the special ids from, instead of the source's own.
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
    if dst_format != "gguf" and str(dtype).lower() == "q8_0":
        raise ConfigError("dtype q8_0 only applies to GGUF output (--dst_format gguf)")
    names = source.names()
    if dst_format == "gguf":  # one file, holding the tokenizer too
        from llamax.convert.gguf_write import open_gguf_sink
        output = atomic_output_file(dst, overwrite=overwrite)
        make_sink = lambda staging: open_gguf_sink(source, src, staging, dtype, tokenizer,  # noqa: E731
                                                   name=Path(dst).stem)
    else:
        identity = identity_of(tokenizer) if tokenizer is not None else read_identity(src, src_format)
        out_dtype = parse_dtype(dtype) or source.dtype
        output = atomic_output_dir(dst, overwrite=overwrite)
        make_sink = lambda staging: open_sink(dst_format, source.config, staging, out_dtype,  # noqa: E731
                                              num_shards=num_shards, max_shard_size=max_shard_size,
                                              identity=identity)
    with output as staging:
        sink = make_sink(staging)
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


def architecture_differences(checkpoint: ModelConfig, wanted: ModelConfig,
                             ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
    """{field: (checkpoint's, wanted)} where two configs describe different weights. Floats match
    up to float32 rounding: a config.json written from float32 values (a GGUF-derived model's
    rms_norm_eps 9.999999747e-06) is the same model as a gin file's 1e-5."""
    def same(a: Any, b: Any) -> bool:
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-6)
        return a == b

    theirs, ours = checkpoint.architecture(), wanted.architecture()
    return {key: (theirs.get(key), ours[key]) for key in ours
            if key not in ignore and not same(theirs.get(key), ours[key])}


def _format_of(path: str | os.PathLike, fmt: str | None) -> str:
    if not Path(path).exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass an HF or Meta folder, a "
                              "llamax params checkpoint or a training run directory")
    fmt = fmt or detect_format(path)
    if fmt is None:
        raise CheckpointError(f"{path} is not an HF (config.json), Meta (params.json), llamax orbax "
                              "(a params checkpoint or a training run) or GGUF (.gguf file) checkpoint")
    return fmt


def read_config(path: str | os.PathLike, fmt: str | None = None, *,
                base: str | os.PathLike | None = None) -> ModelConfig:
    """The ModelConfig of any checkpoint `load_any` reads (a PEFT adapter folder: its `base`'s),
    without reading its weights (a CLI checks its arguments against it first)."""
    from llamax.convert.peft import is_peft_folder, peft_base
    if fmt is None and is_peft_folder(path):
        return read_config(peft_base(path, base))
    fmt = _format_of(path, fmt)
    if fmt == "hf":
        return read_hf_config(path)
    if fmt == "meta":
        return MetaReader(Path(path)).config
    if fmt == "gguf":
        from llamax.convert.gguf import GGUFSource
        return GGUFSource(Path(path)).config
    location = Path(path).absolute()
    for folder in (location, location.parent, location.parent.parent):  # run, checkpoints/, step
        if run_dir.has_model_config(folder):
            return run_dir.read_model_config(folder)
    return run_dir.read_model_config(location)


def load_any(path: str | os.PathLike, fmt: str | None = None, *, step: int | None = None,
             base: str | os.PathLike | None = None, **config_overrides: Any) -> tuple[ModelConfig, dict]:
    """(config, numpy params) of any checkpoint: an HF, Meta or orbax params folder, a GGUF file or a
    training run (newest committed step unless `step`); the format is detected unless `fmt` says. A LoRA
    run or a PEFT adapter folder comes back merged into its base (`base`, default: the run's INIT_FROM /
    the adapter's base_model_name_or_path). `config_overrides` (scan_layers, param_dtype) shape the params."""
    from llamax.convert.peft import is_peft_folder, merge_peft
    if fmt is None and is_peft_folder(path):  # a PEFT LoRA adapter: merged into its base
        return merge_peft(path, base, **config_overrides)
    fmt = _format_of(path, fmt)
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
    if architecture_differences(base_config, config):
        raise CheckpointError(f"base weights {base} are not the model the LoRA run {run.path} trained "
                              "on; pass the run's INIT_FROM (--base)")
    return config, merge_lora(config, base_params, adapters, lora_config)


def save_any(config: ModelConfig, params: Any, path: str | os.PathLike, fmt: str, *,
             dtype: Any = None, num_shards: int = 1, overwrite: bool = False,
             identity: CheckpointIdentity | None = None, max_shard_size: int = 5 * 2**30) -> Path:
    """Writes in-memory params as an HF folder, a Meta folder, an orbax params checkpoint or a
    GGUF file through the same writers as `convert` (all-or-nothing); `dtype` casts on the way out
    (None keeps the params'; GGUF also takes 'q8_0'), `identity` (tokenizer, special ids) goes with
    them (a GGUF embeds the tokenizer, which it needs)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown destination format {fmt!r}; expected one of {FORMATS}")
    check_params(config, params)
    if fmt == "gguf":
        from llamax.convert.gguf_write import save_gguf
        if identity is None or identity.tokenizer is None:
            raise ConfigError("GGUF output embeds the checkpoint's tokenizer: pass its identity "
                              "(identity_of(tokenizer) or read_identity(checkpoint))")
        return save_gguf(config, params, path, dtype=dtype, tokenizer=identity.tokenizer, overwrite=overwrite)
    out_dtype = parse_dtype(dtype) or np.asarray(params["embed_tokens"]["embedding"]).dtype
    with atomic_output_dir(path, overwrite=overwrite) as staging:
        sink = open_sink(fmt, config, staging, out_dtype, num_shards=num_shards,
                         max_shard_size=max_shard_size, identity=identity)
        for name, tensor in params_to_hf(config, params):
            sink.write(name, tensor)
        sink.close()
    return Path(path)
