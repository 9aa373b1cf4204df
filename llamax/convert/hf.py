"""HF `LlamaForCausalLM` checkpoints <-> llamax params, as one table.

HF stores linear weights as [out, in]; llamax keeps named axes ([embed, heads, head_dim] for
q/k/v, [heads, head_dim, embed] for o, [in, out] for the MLP and lm_head). Both use the
half-split rotary layout, so no q/k permutation is needed here (Meta's format needs one).

Conversion walks the table one tensor at a time: with `WeightFolder`'s memory maps, peak host
memory is the llamax params being built plus one tensor, never a second copy of the checkpoint.

An HF folder is more than its weights: `HFWriter` also writes the model's special ids
(`SpecialIds`: bos/eos/pad_token_id in config.json and generation_config.json, so transformers'
`generate` stops where llamax does) and copies its tokenizer files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from llamax.config import ModelConfig
from llamax.convert.weight_files import WeightFolder, safetensors_header
from llamax.dtypes import dtype_name, numpy_dtype, parse_dtype
from llamax.errors import CheckpointError, ConfigError
from llamax.files import atomic_output_dir, contiguous_bytes
from llamax.tokenizer.files import GENERATION_CONFIG, copy_tokenizer_files, read_json
from llamax.tokenizer.special_ids import SpecialIds
from llamax.tree_paths import get_path, set_path

Tensor = np.ndarray
# llamax path inside one decoder layer -> (HF name suffix, HF shape, to llamax, to HF)
LayerRule = tuple[str, Callable[[ModelConfig], tuple], Callable, Callable]


def _q_shape(c):
    return (c.num_heads * c.head_dim, c.hidden_size)


def _kv_shape(c):
    return (c.num_kv_heads * c.head_dim, c.hidden_size)


LAYER_TABLE: dict[tuple[str, ...], LayerRule] = {
    ("input_layernorm", "weight"): ("input_layernorm.weight", lambda c: (c.hidden_size,),
                                    lambda w, c: w, lambda w, c: w),
    ("post_attention_layernorm", "weight"): ("post_attention_layernorm.weight", lambda c: (c.hidden_size,),
                                             lambda w, c: w, lambda w, c: w),
    # [heads*head_dim, embed] <-> [embed, heads, head_dim]
    ("self_attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", _q_shape,
                                        lambda w, c: w.T.reshape(c.hidden_size, c.num_heads, c.head_dim),
                                        lambda w, c: w.reshape(c.hidden_size, -1).T),
    ("self_attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", _kv_shape,
                                        lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim),
                                        lambda w, c: w.reshape(c.hidden_size, -1).T),
    ("self_attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", _kv_shape,
                                        lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim),
                                        lambda w, c: w.reshape(c.hidden_size, -1).T),
    # [embed, heads*head_dim] <-> [heads, head_dim, embed]
    ("self_attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", lambda c: (c.hidden_size, c.num_heads * c.head_dim),
                                        lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
                                        lambda w, c: w.reshape(-1, c.hidden_size).T),
    ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", lambda c: (c.intermediate_size, c.hidden_size),
                                     lambda w, c: w.T, lambda w, c: w.T),
    ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", lambda c: (c.intermediate_size, c.hidden_size),
                                   lambda w, c: w.T, lambda w, c: w.T),
    ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", lambda c: (c.hidden_size, c.intermediate_size),
                                     lambda w, c: w.T, lambda w, c: w.T),
}

# Top-level llamax path -> (HF name, HF shape, to llamax, to HF)
TOP_TABLE: dict[tuple[str, ...], LayerRule] = {
    ("embed_tokens", "embedding"): ("model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size),
                                    lambda w, c: w, lambda w, c: w),
    ("norm", "weight"): ("model.norm.weight", lambda c: (c.hidden_size,), lambda w, c: w, lambda w, c: w),
    ("lm_head", "kernel"): ("lm_head.weight", lambda c: (c.vocab_size, c.hidden_size),
                            lambda w, c: w.T, lambda w, c: w.T),
}

# Tensors some HF checkpoints carry that hold no weights of their own.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _hf_layer_name(layer: int, suffix: str) -> str:
    return f"model.layers.{layer}.{suffix}"


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name an HF checkpoint of this config holds, with its shape."""
    shapes = {}
    for path, (name, shape_fn, _, _) in TOP_TABLE.items():
        if path[0] == "lm_head" and config.tie_word_embeddings:
            continue
        shapes[name] = tuple(shape_fn(config))
    for layer in range(config.num_layers):
        for suffix, shape_fn, _, _ in LAYER_TABLE.values():
            shapes[_hf_layer_name(layer, suffix)] = tuple(shape_fn(config))
    return shapes


def match_hf_tensors(config: ModelConfig, names: Iterable[str],
                     shape_of: Callable[[str], tuple] | None = None, *, strict: bool = True) -> dict[str, str]:
    """Maps each tensor name the config implies to the checkpoint's name for it (with or without
    the `model.` prefix). Raises CheckpointError naming missing tensors, unexpected ones (unless
    `strict=False`) and, when `shape_of(name)` can tell without reading, shapes that disagree."""
    actual = {name.removeprefix("model."): name for name in names}
    expected = expected_hf_shapes(config)
    missing = [n for n in expected if n.removeprefix("model.") not in actual]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s) the config needs, e.g. "
                              f"{missing[:5]} (config: {config.num_layers} layers, "
                              f"tie_word_embeddings={config.tie_word_embeddings})")
    where = {n: actual[n.removeprefix("model.")] for n in expected}
    if shape_of is not None:
        for name, want in expected.items():
            _check_shape(name, tuple(shape_of(where[name])), want)
    known = set(where.values())
    if config.tie_word_embeddings:  # some tied checkpoints still store the shared matrix
        known |= {n for n in actual.values() if n.removeprefix("model.") == "lm_head.weight"}
    unexpected = [n for n in actual.values() if n not in known and not n.endswith(_IGNORED_SUFFIXES)]
    if unexpected and strict:
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensor(s) a LLaMA with this config does "
                              f"not use, e.g. {sorted(unexpected)[:5]}")
    return where


def _check_shape(name: str, found: tuple, want: tuple) -> None:
    if found != want:
        raise CheckpointError(f"tensor {name!r} has shape {found}, but config.json implies {want}; "
                              "the weights do not match the config")


def hf_to_params(config: ModelConfig, tensors: Mapping[str, Tensor], *, strict: bool = True) -> dict:
    """llamax params (numpy, in `config.param_dtype`) from a mapping of HF tensor names.

    `tensors` may be lazy (a `WeightFolder`): each tensor is read, converted and dropped.
    Names may carry the `model.` prefix or not (bare `LlamaModel` checkpoints).
    """
    expected = expected_hf_shapes(config)
    where = match_hf_tensors(config, tensors, getattr(tensors, "shape", None), strict=strict)
    dtype = config.weight_dtype

    def read(hf_name: str) -> Tensor:
        array = tensors[where[hf_name]]
        _check_shape(hf_name, tuple(array.shape), expected[hf_name])
        return array

    params: dict = {}
    for path, (name, _, to_llamax, _) in TOP_TABLE.items():
        if name in expected:
            set_path(params, path, np.asarray(to_llamax(read(name), config), dtype=dtype))
    for path, (suffix, shape_fn, to_llamax, _) in LAYER_TABLE.items():
        shape = to_llamax(np.empty(shape_fn(config), np.int8), config).shape
        if config.scan_layers:
            stacked = np.empty((config.num_layers, *shape), dtype)
            for layer in range(config.num_layers):
                stacked[layer] = to_llamax(read(_hf_layer_name(layer, suffix)), config)
            set_path(params, ("layers", *path), stacked)
        else:
            for layer in range(config.num_layers):
                value = to_llamax(read(_hf_layer_name(layer, suffix)), config)
                set_path(params, (f"layers_{layer}", *path), np.asarray(value, dtype=dtype))
    return params


def _layer_params(params: Mapping, config: ModelConfig, layer: int, path: tuple[str, ...]) -> Tensor:
    if "layers" in params:
        return np.asarray(get_path(params["layers"], path)[layer])
    return np.asarray(get_path(params[f"layers_{layer}"], path))


def check_params(config: ModelConfig, params: Mapping) -> None:
    """Raises CheckpointError unless `params` has exactly the layout `config` implies."""
    scanned = "layers" in params
    for path, (name, shape_fn, to_llamax, _) in TOP_TABLE.items():
        if path[0] == "lm_head" and config.tie_word_embeddings:
            if "lm_head" in params:
                raise CheckpointError("params have lm_head but config.tie_word_embeddings=True")
            continue
        try:
            value = get_path(params, path)
        except (KeyError, TypeError):
            raise CheckpointError(f"params are missing {'/'.join(path)}") from None
        want = to_llamax(np.empty(shape_fn(config), np.int8), config).shape
        _check_is_array(value, path)
        if tuple(value.shape) != want:
            raise CheckpointError(f"params {'/'.join(path)} has shape {tuple(value.shape)}, config implies {want}")
    for path, (_, shape_fn, to_llamax, _) in LAYER_TABLE.items():
        want = to_llamax(np.empty(shape_fn(config), np.int8), config).shape
        for layer in range(1 if scanned else config.num_layers):
            key = "layers" if scanned else f"layers_{layer}"
            try:
                value = get_path(params[key], path)
            except (KeyError, TypeError):
                raise CheckpointError(f"params are missing {key}/{'/'.join(path)}") from None
            _check_is_array(value, (key, *path))
            full = (config.num_layers, *want) if scanned else want
            if tuple(value.shape) != full:
                raise CheckpointError(f"params {key}/{'/'.join(path)} has shape {tuple(value.shape)}, "
                                      f"config implies {full}")


def _check_is_array(value: Any, path: tuple[str, ...]) -> None:
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise CheckpointError(f"params {'/'.join(path)} is a {type(value).__name__}, expected an array")


def params_to_hf(config: ModelConfig, params: Mapping, dtype: Any = None) -> Iterator[tuple[str, Tensor]]:
    """Yields (HF name, tensor) one at a time, scanned or unscanned params alike."""
    check_params(config, params)
    cast = (lambda a: a) if dtype is None else (lambda a: a.astype(np.dtype(dtype)))
    for path, (name, _, _, to_hf) in TOP_TABLE.items():
        if path[0] == "lm_head" and config.tie_word_embeddings:
            continue
        yield name, cast(np.ascontiguousarray(to_hf(np.asarray(get_path(params, path)), config)))
    for layer in range(config.num_layers):
        for path, (suffix, _, _, to_hf) in LAYER_TABLE.items():
            value = to_hf(_layer_params(params, config, layer, path), config)
            yield _hf_layer_name(layer, suffix), cast(np.ascontiguousarray(value))


def read_hf_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """ModelConfig from `<path>/config.json` (v4 and v5 spellings)."""
    config_path = Path(path) / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{config_path} not found: an HF checkpoint folder needs config.json")
    try:
        hf = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{config_path} is not valid JSON: {exc}") from exc
    return ModelConfig.from_hf(hf, **overrides)


def load_hf(path: str | os.PathLike, **config_overrides: Any) -> tuple[ModelConfig, dict]:
    """Reads an HF Llama checkpoint folder -> (ModelConfig, params as numpy arrays).

    Handles `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, and
    `pytorch_model*.bin` (loaded with weights_only=True); fp32/bf16/fp16 weights. Params come out
    in `config.param_dtype` (float32 unless overridden), scanned unless `scan_layers=False`.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; load_hf expects an HF checkpoint folder")
    config = read_hf_config(path, **config_overrides)
    return config, hf_to_params(config, WeightFolder(path))


def write_generation_config(folder: str | os.PathLike, special_ids: SpecialIds) -> Path:
    """Writes `<folder>/generation_config.json` with `special_ids`, keeping the other settings of
    one already there (a copied source's sampling defaults, e.g. Llama-3-Instruct's temperature)."""
    path = Path(folder) / GENERATION_CONFIG
    settings = read_json(path) if path.is_file() else {}
    settings.update(special_ids.hf_fields())
    path.write_text(json.dumps(settings, indent=2))
    return path


class HFWriter:
    """Writes an HF checkpoint folder from HF-named tensors arriving in any order: the one HF
    writer (`save_hf` and the conversion hub both drive it).

    The safetensors files are laid out up front (sharded above `max_shard_size` bytes, with a
    `model.safetensors.index.json`), each tensor is written at its offset as it arrives, so at
    most one tensor is held, and `config.json` records `dtype`. `close` checks every tensor came.
    `special_ids` go into config.json and generation_config.json; the files of `tokenizer` (a
    tokenizer file or folder) are copied in (`llamax.tokenizer.files.copy_tokenizer_files`).
    """

    def __init__(self, config: ModelConfig, folder: str | os.PathLike, dtype: Any,
                 max_shard_size: int = 5 * 2**30, *, special_ids: SpecialIds | None = None,
                 tokenizer: str | os.PathLike | None = None):
        if special_ids is not None:
            special_ids.check_vocab(config.vocab_size, "HF export")
        self.folder, self.dtype = Path(folder), numpy_dtype(dtype)
        shapes = expected_hf_shapes(config)
        files: list[list[str]] = [[]]  # tensor names per file, in table order
        size = 0
        for name, shape in shapes.items():
            nbytes = int(np.prod(shape)) * self.dtype.itemsize
            if files[-1] and size + nbytes > max_shard_size:
                files.append([])
                size = 0
            files[-1].append(name)
            size += nbytes
        self._where: dict[str, tuple[Path, int, tuple]] = {}  # name -> (file, byte offset, shape)
        weight_map = {}
        for index, names in enumerate(files):
            file_name = ("model.safetensors" if len(files) == 1
                         else f"model-{index + 1:05d}-of-{len(files):05d}.safetensors")
            header, offsets, data_size = safetensors_header({n: (self.dtype, shapes[n]) for n in names})
            with open(self.folder / file_name, "wb") as f:
                f.write(header)
                f.truncate(len(header) + data_size)  # sparse until the tensors arrive
            for name in names:
                self._where[name] = (self.folder / file_name, len(header) + offsets[name], shapes[name])
                weight_map[name] = file_name
        if len(files) > 1:
            total = sum(int(np.prod(s)) * self.dtype.itemsize for s in shapes.values())
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf_config = config.to_hf()
        hf_config["torch_dtype"] = hf_config["dtype"] = dtype_name(self.dtype)
        if special_ids is not None:
            hf_config.update(special_ids.hf_fields())
        (self.folder / "config.json").write_text(json.dumps(hf_config, indent=2))
        if tokenizer is not None:
            copy_tokenizer_files(tokenizer, self.folder)
        if special_ids is not None:
            write_generation_config(self.folder, special_ids)
        self._pending = set(self._where)

    def write(self, name: str, array: np.ndarray) -> None:
        """Casts and writes one HF tensor at its place."""
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is not part of this model's HF checkpoint")
        path, offset, shape = self._where[name]
        if tuple(array.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}")
        data = contiguous_bytes(np.asarray(array).astype(self.dtype, copy=False))
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data)
        self._pending.discard(name)

    def close(self) -> None:
        if self._pending:
            raise CheckpointError(f"{len(self._pending)} tensor(s) never written, e.g. {sorted(self._pending)[:3]}")


def save_hf(config: ModelConfig, params: Mapping, path: str | os.PathLike, *, dtype: Any = None,
            max_shard_size: int = 5 * 2**30, overwrite: bool = False, special_ids: SpecialIds | None = None,
            tokenizer: str | os.PathLike | None = None) -> Path:
    """Writes `params` as an HF checkpoint folder (safetensors + config.json) that
    `transformers.LlamaForCausalLM.from_pretrained` loads.

    `special_ids` (bos/eos/pad) go into config.json and generation_config.json (without them,
    transformers assumes LLaMA-1/2's 1 and 2); `tokenizer` (a file or folder) is copied in.

    Shards above `max_shard_size` bytes with a `model.safetensors.index.json`. Everything is written
    to a temporary sibling folder and renamed into place, so a failure leaves nothing half-written.
    `dtype` ('bfloat16'/'bf16', 'float32', 'float16' or a dtype object) casts on the way out;
    default keeps the params' dtype.
    """
    check_params(config, params)
    out_dtype = parse_dtype(dtype) or np.asarray(get_path(params, ("embed_tokens", "embedding"))).dtype
    with atomic_output_dir(path, overwrite=overwrite) as staging:
        writer = HFWriter(config, staging, out_dtype, max_shard_size, special_ids=special_ids,
                          tokenizer=tokenizer)
        for name, tensor in params_to_hf(config, params):
            writer.write(name, tensor)
        writer.close()
    return Path(path)
