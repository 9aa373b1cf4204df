"""Meta's original checkpoints (`params.json` + `consolidated.NN.pth`) <-> llamax, both ways.

Meta's layout differs from HF's in three ways, all handled here and nowhere else:
  * names: `tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1` (gate) / `w3` (up) /
    `w2` (down), `attention_norm`, `ffn_norm`, `norm`, `output`;
  * model-parallel shards: column-parallel weights (wq, wk, wv, w1, w3, output) are split on
    dim 0, row-parallel ones (wo, w2) on dim 1, norms are replicated; `tok_embeddings` is split on
    dim 1 in Llama 1/2 (ParallelEmbedding) and on dim 0 in Llama 3 (VocabParallelEmbedding);
  * rotary layout: Meta rotates interleaved pairs (x0, x1), (x2, x3)...; HF and llamax rotate the
    two halves of each head, so wq/wk rows are permuted (wk with n_kv_heads).

Everything goes through HF tensor names: `MetaReader` is a lazy mapping from HF names to tensors
(one assembled tensor at a time), `MetaWriter` takes HF-named tensors in any order and writes
their shard slices straight into place (`PthWriter`), so neither holds more than one tensor.

Tied embeddings: Meta's model code always has an `output` layer, and Llama 3.2 checkpoints store
`output.weight` equal to `tok_embeddings.weight`. On load the model is tied when `output.weight`
is absent or bit-identical to the embeddings (as for Llama 3.2); on save a tied model writes the
embeddings as `output.weight` too, so Meta's own code loads it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from llamax.config import ModelConfig
from llamax.convert.hf import check_params, expected_hf_shapes, hf_to_params, params_to_hf
from llamax.dtypes import parse_dtype
from llamax.files import atomic_output_dir
from llamax.errors import CheckpointError, ConfigError
from llamax.convert.meta_config import (LLAMA3_VOCAB_SIZE, PARAMS_FILE, config_from_meta, config_to_meta,
                                 meta_intermediate_size, read_params_json)
from llamax.convert.pth import PthFile, PthWriter
from llamax.convert.weight_files import safe_member

SHARD_PATTERN = re.compile(r"^consolidated\.(\d+)\.pth$")
REPLICATED = None  # split dim of tensors every shard holds whole (norms)
EMBEDDING = "embedding"  # split dim decided per checkpoint (1 for Llama 1/2, 0 for Llama 3)
IGNORED_META_TENSORS = ("rope.freqs",)  # Llama 1 stores its rotary table; it holds no weights

# HF name inside a layer -> (Meta name inside a layer, split dim)
LAYER_NAMES: dict[str, tuple[str, Any]] = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", REPLICATED),
    "post_attention_layernorm.weight": ("ffn_norm.weight", REPLICATED),
}
TOP_NAMES: dict[str, tuple[str, Any]] = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", EMBEDDING),
    "model.norm.weight": ("norm.weight", REPLICATED),
    "lm_head.weight": ("output.weight", 0),
}
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def meta_name(hf_name: str) -> tuple[str, Any]:
    """(Meta tensor name, split dim) of an HF tensor name."""
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    match = _LAYER_NAME.match(hf_name)
    if not match or match.group(2) not in LAYER_NAMES:
        raise CheckpointError(f"HF tensor {hf_name!r} has no Meta counterpart")
    name, split = LAYER_NAMES[match.group(2)]
    return f"layers.{match.group(1)}.{name}", split


# ---- rotary layout ------------------------------------------------------------------------

def interleaved_to_half_split(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Meta wq/wk [heads*head_dim, in] -> HF layout; transformers' `permute` in
    convert_llama_weights_to_hf.py: view(n, d/2, 2, in).transpose(1, 2)."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def half_split_to_interleaved(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of `interleaved_to_half_split`: HF q_proj/k_proj rows -> Meta's wq/wk rows."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, 2, rows // num_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _rotary_heads(config: ModelConfig, hf_name: str) -> int | None:
    if hf_name.endswith("self_attn.q_proj.weight"):
        return config.num_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return config.num_kv_heads
    return None


# ---- reading ------------------------------------------------------------------------------

def shard_paths(path: Path) -> list[Path]:
    """consolidated.00.pth ... in order; raises CheckpointError if none or if the numbering has gaps."""
    # safe_member: a shard that is a symlink out of the folder is refused, as for HF index files.
    found = {int(m.group(1)): safe_member(path, name) for name in os.listdir(path)
             if (m := SHARD_PATTERN.match(name))}
    if not found:
        raise CheckpointError(f"no consolidated.NN.pth files in {path}; a Meta checkpoint folder holds "
                              "params.json and consolidated.00.pth (one file per model-parallel shard)")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise CheckpointError(f"{path} has shards {sorted(found)} but lacks "
                              f"{[f'consolidated.{i:02d}.pth' for i in missing]}; copy the missing file(s)")
    return [found[i] for i in range(len(found))]


class MetaReader(Mapping):
    """Lazy HF tensor name -> np.ndarray view of a Meta checkpoint folder.

    Construction reads params.json and every shard's table of contents (no tensor data) and
    checks them against each other, so a bad checkpoint fails before anything is converted.
    Each lookup assembles one tensor from its shard slices and un-permutes wq/wk.
    `config_overrides` replace ModelConfig fields (e.g. max_position_embeddings, param_dtype,
    rope_scaling for Llama 3.2's factor 32, tie_word_embeddings).
    """

    def __init__(self, path: str | os.PathLike, **config_overrides: Any):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a directory; expected a Meta checkpoint folder")
        params = read_params_json(self.path)
        self.shards = [PthFile(p) for p in shard_paths(self.path)]
        self._check_shards_agree()
        first, count = self.shards[0], len(self.shards)
        dim = params["dim"]
        for name in ("tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.feed_forward.w1.weight"):
            if name not in first.entries:
                raise CheckpointError(f"{first.path} has no tensor {name!r}; not a Meta LLaMA checkpoint")
        rows = first.shape("layers.0.attention.wq.weight")[0]
        if rows * count != dim:
            raise CheckpointError(f"found {count} shard file(s) in {self.path}, but each holds {rows} of the "
                                  f"{dim} rows of wq: expected {dim // max(rows, 1)} consolidated.NN.pth files")
        self.embedding_split = self._detect_embedding_split(dim)
        vocab = first.shape("tok_embeddings.weight")[0] * (count if self.embedding_split == 0 else 1)
        if params.get("vocab_size", -1) not in (-1, None, vocab):
            raise CheckpointError(f"params.json says vocab_size={params['vocab_size']}, but tok_embeddings "
                                  f"holds {vocab} rows")
        ffn = first.shape("layers.0.feed_forward.w1.weight")[0] * count
        expected_ffn = meta_intermediate_size(dim, params.get("multiple_of") or 256, params.get("ffn_dim_multiplier"))
        if ffn != expected_ffn:
            raise CheckpointError(f"params.json (multiple_of, ffn_dim_multiplier) imply an FFN width of "
                                  f"{expected_ffn}, but w1 has {ffn} rows; params.json does not match the weights")
        tied = config_overrides.pop("tie_word_embeddings", None)
        if tied is None:
            tied = self._output_is_embedding()
        self.config = config_from_meta(params, vocab_size=vocab, intermediate_size=ffn,
                                       tie_word_embeddings=tied, **config_overrides)
        self._names = list(expected_hf_shapes(self.config))
        self._check_shapes()

    @property
    def dtype(self) -> np.dtype:
        return self.shards[0].dtype("tok_embeddings.weight")

    def _check_shards_agree(self) -> None:
        first = self.shards[0]
        for shard in self.shards[1:]:
            if set(shard.entries) != set(first.entries):
                diff = sorted(set(shard.entries) ^ set(first.entries))
                raise CheckpointError(f"{shard.path.name} and {first.path.name} hold different tensors "
                                      f"(e.g. {diff[:3]}); the shards come from different checkpoints")
            for name in first.entries:
                if shard.shape(name) != first.shape(name):
                    raise CheckpointError(
                        f"inconsistent shard shapes: {name!r} is {first.shape(name)} in {first.path.name} "
                        f"but {shard.shape(name)} in {shard.path.name}; every shard must hold an equal slice")

    def _detect_embedding_split(self, dim: int) -> int | None:
        if len(self.shards) == 1:
            return None
        columns = self.shards[0].shape("tok_embeddings.weight")[1]
        if columns == dim:
            return 0  # Llama 3: VocabParallelEmbedding
        if columns * len(self.shards) == dim:
            return 1  # Llama 1/2: ParallelEmbedding
        raise CheckpointError(f"tok_embeddings shards have {columns} columns; expected dim={dim} (split on "
                              f"vocab) or dim / {len(self.shards)} (split on dim)")

    def _split(self, split: Any) -> int | None:
        return self.embedding_split if split == EMBEDDING else split

    def _assembled_shape(self, name: str, split: int | None) -> tuple[int, ...]:
        shape = list(self.shards[0].shape(name))
        if split is not None:
            shape[split] *= len(self.shards)
        return tuple(shape)

    def _assemble(self, name: str, split: int | None) -> np.ndarray:
        if split is None or len(self.shards) == 1:
            return self.shards[0].get(name)
        return np.concatenate([shard.get(name) for shard in self.shards], axis=split)

    def _rows(self, name: str, split: int | None, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of the assembled tensor, reading only the shards that hold them."""
        if split != 0 or len(self.shards) == 1:
            pieces = [shard.get(name)[start:stop] for shard in (self.shards if split == 1 else self.shards[:1])]
            return np.concatenate(pieces, axis=1) if len(pieces) > 1 else np.asarray(pieces[0])
        per_shard = self.shards[0].shape(name)[0]
        pieces = [self.shards[i].get(name)[max(start - i * per_shard, 0):max(stop - i * per_shard, 0)]
                  for i in range(start // per_shard, min(-(-stop // per_shard), len(self.shards)))]
        return np.concatenate(pieces, axis=0)

    def _output_is_embedding(self, block_rows: int = 4096) -> bool:
        """True if output.weight is absent or equal to tok_embeddings (compared in row blocks, so
        the check holds two blocks in memory, not two vocabulary-sized matrices)."""
        if "output.weight" not in self.shards[0].entries:
            return True
        embed_split = self._split(EMBEDDING)
        shape = self._assembled_shape("tok_embeddings.weight", embed_split)
        if self._assembled_shape("output.weight", 0) != shape:
            return False
        for start in range(0, shape[0], block_rows):  # the first block decides the usual untied case
            stop = min(start + block_rows, shape[0])
            if not np.array_equal(self._rows("output.weight", 0, start, stop),
                                  self._rows("tok_embeddings.weight", embed_split, start, stop)):
                return False
        return True

    def _check_shapes(self) -> None:
        entries = self.shards[0].entries
        wanted = set(IGNORED_META_TENSORS) | ({"output.weight"} if self.config.tie_word_embeddings else set())
        for hf_name, shape in expected_hf_shapes(self.config).items():
            name, split = meta_name(hf_name)
            wanted.add(name)
            if name not in entries:
                raise CheckpointError(f"{self.shards[0].path} lacks {name!r}, which params.json "
                                      f"({self.config.num_layers} layers) implies")
            found = self._assembled_shape(name, self._split(split))
            if found != tuple(shape):
                raise CheckpointError(f"{name!r} assembles to {found} from {len(self.shards)} shard(s), but "
                                      f"params.json implies {tuple(shape)}")
        unexpected = sorted(set(entries) - wanted)
        if unexpected:
            raise CheckpointError(f"{self.shards[0].path} has {len(unexpected)} tensor(s) a LLaMA with "
                                  f"this params.json does not use, e.g. {unexpected[:3]}")

    def __getitem__(self, hf_name: str) -> np.ndarray:
        if hf_name not in self._names:
            raise KeyError(hf_name)
        name, split = meta_name(hf_name)
        weight = self._assemble(name, self._split(split))
        heads = _rotary_heads(self.config, hf_name)
        return weight if heads is None else interleaved_to_half_split(weight, heads)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# ---- writing ------------------------------------------------------------------------------

class MetaWriter:
    """Writes a Meta checkpoint folder from HF-named tensors arriving in any order.

    `embedding_split`: dim `tok_embeddings` is sharded on; None follows Meta (0 for the Llama 3
    vocabulary of 128256, else 1). `close` must be called once every tensor was written.
    """

    def __init__(self, config: ModelConfig, path: str | os.PathLike, *, dtype: Any,
                 num_shards: int = 1, embedding_split: int | None = None):
        self.config, self.path, self.num_shards = config, Path(path), num_shards
        self.dtype = parse_dtype(dtype)
        if num_shards < 1:
            raise ConfigError(f"num_shards={num_shards} must be >= 1")
        if embedding_split is None:
            embedding_split = 0 if config.vocab_size == LLAMA3_VOCAB_SIZE else 1
        self.embedding_split = embedding_split
        params = config_to_meta(config)
        for what, value in (("num_heads", config.num_heads), ("num_kv_heads", config.num_kv_heads)):
            if value % num_shards:
                raise ConfigError(f"num_shards={num_shards} must divide {what}={value}: each Meta shard "
                                  "holds whole attention heads")
        self._split_of: dict[str, int | None] = {}
        specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        shapes = dict(expected_hf_shapes(config))
        if config.tie_word_embeddings:
            shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]  # Meta's code needs output
        for hf_name, shape in shapes.items():
            name, split = meta_name(hf_name)
            split = embedding_split if split == EMBEDDING else split
            shape = list(shape)
            if split is not None:
                if shape[split] % num_shards:
                    raise ConfigError(f"num_shards={num_shards} must divide dim {split} of {name} {tuple(shape)}")
                shape[split] //= num_shards
            self._split_of[hf_name] = split
            specs[name] = (tuple(shape), self.dtype)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / PARAMS_FILE).write_text(json.dumps(params, indent=2))
        self._writers = [PthWriter(self.path / f"consolidated.{i:02d}.pth", specs) for i in range(num_shards)]

    def write(self, hf_name: str, weight: np.ndarray) -> None:
        """Permutes (wq/wk), casts and writes one HF tensor's slice into every shard."""
        if hf_name not in self._split_of:
            raise CheckpointError(f"tensor {hf_name!r} is not part of this model's Meta checkpoint")
        heads = _rotary_heads(self.config, hf_name)
        weight = np.asarray(weight).astype(self.dtype, copy=False)
        if heads is not None:
            weight = half_split_to_interleaved(weight, heads)
        name, split = meta_name(hf_name)
        pieces = ([weight] * self.num_shards if split is None
                  else np.split(weight, self.num_shards, axis=self._split_of[hf_name]))
        for writer, piece in zip(self._writers, pieces):
            writer.write(name, piece)
        if self.config.tie_word_embeddings and hf_name == "model.embed_tokens.weight":
            self.write("lm_head.weight", weight)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()


def load_meta(path: str | os.PathLike, **config_overrides: Any) -> tuple[ModelConfig, dict]:
    """Reads a Meta checkpoint folder -> (ModelConfig, params as numpy arrays).

    Params come out in `config.param_dtype` (float32 unless overridden), scanned unless
    `scan_layers=False`. See `MetaReader` for the checks and `config_overrides`.
    """
    reader = MetaReader(path, **config_overrides)
    return reader.config, hf_to_params(reader.config, reader)


def save_meta(config: ModelConfig, params: Mapping, path: str | os.PathLike, *, num_shards: int = 1,
              dtype: Any = None, overwrite: bool = False, embedding_split: int | None = None) -> Path:
    """Writes `params` as a Meta checkpoint folder (params.json + consolidated.NN.pth).

    `dtype` ('bf16', 'fp32', ...) casts on the way out; None keeps the params' dtype. Written to a
    temporary sibling folder and renamed into place: a failure leaves nothing behind.
    """
    check_params(config, params)
    if dtype is None:
        dtype = np.asarray(params["embed_tokens"]["embedding"]).dtype
    with atomic_output_dir(path, overwrite=overwrite) as staging:
        writer = MetaWriter(config, staging, dtype=dtype, num_shards=num_shards, embedding_split=embedding_split)
        for name, tensor in params_to_hf(config, params):
            writer.write(name, tensor)
        writer.close()
    return Path(path)
