"""llamax / HF tensors -> one GGUF file that llama.cpp (and transformers, Ollama, LM Studio) runs.

The file is laid out before any tensor arrives: header, metadata (the llama hyper-parameters
llama.cpp reads, rope settings, file type, the tokenizer and chat template) and the tensor table
with every offset, since each tensor's byte size follows from its shape and type. `GGUFSink`
then encodes each HF-named tensor as it comes (any order), applies llama.cpp's layout (names,
interleaved q/k rows; see `gguf.py`) and writes it at its offset, so memory holds one tensor.

Types: 1-D tensors (norms) and `rope_freqs` stay F32, as llama.cpp's converter keeps them; 2-D
tensors take the requested type (F32, F16, BF16 or Q8_0), and for Q8_0 a matrix whose rows are
not whole 32-value blocks falls back to F16, as llama.cpp's converter does.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from gguf import GGUFWriter

from llamax.config import ModelConfig
from llamax.files import atomic_output_file, contiguous_bytes
from llamax.convert.gguf import ARCHITECTURE, ROPE_FREQS, gguf_tensor_name, llama3_rope_factors, rotary_heads
from llamax.convert.gguf_quant import (FILE_TYPES, QUANTIZATION_VERSION, QType, can_encode, encode,
                                       parse_write_type, row_chunks, stored_nbytes)
from llamax.convert.gguf_vocab import TokenizerValues, tokenizer_metadata
from llamax.convert.identity import find_tokenizer
from llamax.convert.hf import check_params, expected_hf_shapes, params_to_hf
from llamax.convert.meta import half_split_to_interleaved
from llamax.errors import CheckpointError


def _model_metadata(writer: GGUFWriter, config: ModelConfig, qtype: QType, name: str) -> None:
    """The keys llama.cpp's llama loader reads (llama-model.cpp, LLM_ARCH_LLAMA)."""
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(QUANTIZATION_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    # Llama-3 scaling travels as rope_freqs.weight (llama.cpp applies it as per-frequency
    # divisors); no rope.scaling.* keys, which llama.cpp would apply as linear scaling on top.


class GGUFSink:
    """Writes `path` (one .gguf file) from HF-named tensors arriving in any order.

    `qtype`: the type of 2-D tensors ('f32', 'f16', 'bf16', 'q8_0' or a ggml type).
    `tokenizer`: `gguf_vocab.tokenizer_metadata` values (required: llama.cpp cannot run a GGUF
    without its vocabulary). `close` checks every tensor arrived.
    """

    def __init__(self, config: ModelConfig, path: str | os.PathLike, qtype: Any, tokenizer: TokenizerValues,
                 *, name: str = "llamax export"):
        self.config, self.path = config, Path(path)
        self.qtype = parse_write_type(qtype)
        tokens = tokenizer.get("tokenizer.ggml.tokens", ([],))[0]
        if len(tokens) != config.vocab_size:
            raise CheckpointError(f"the tokenizer has {len(tokens)} tokens but the model {config.vocab_size} rows")
        self._plan: dict[str, tuple[str, tuple[int, ...], QType]] = {}  # HF name -> (GGUF name, shape, type)
        for hf_name, shape in expected_hf_shapes(config).items():
            tensor_type = QType.F32 if len(shape) == 1 else self.qtype
            if not can_encode(shape, tensor_type):
                tensor_type = QType.F16
            self._plan[hf_name] = (gguf_tensor_name(hf_name), tuple(shape), tensor_type)
        writer = GGUFWriter(None, ARCHITECTURE)
        _model_metadata(writer, config, self.qtype, name)
        for key, (value, value_type, element_type) in tokenizer.items():
            writer.add_key_value(key, value, value_type, element_type)
        extra = []
        if config.rope_scaling is not None:
            factors = llama3_rope_factors(config.head_dim, config.rope_theta, config.rope_scaling)
            extra.append((ROPE_FREQS, factors))
        tables = [(n, s, t) for n, s, t in self._plan.values()] + [(n, a.shape, QType.F32) for n, a in extra]
        for gguf_name, shape, tensor_type in tables:
            # The dtype argument only matters for uint8 data; raw_dtype fixes the stored type.
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), stored_nbytes(shape, tensor_type),
                                   raw_dtype=tensor_type)
        writer.write_header_to_file(self.path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        header_end = writer.fout[0].tell()
        writer.close()
        alignment = writer.data_alignment
        data_start = -(-header_end // alignment) * alignment
        self._offset: dict[str, int] = {}
        offset = data_start
        for gguf_name, shape, tensor_type in tables:
            self._offset[gguf_name] = offset
            offset += -(-stored_nbytes(shape, tensor_type) // alignment) * alignment
        self._file = open(self.path, "r+b")
        self._file.truncate(offset)  # padding and not-yet-written tensors read as zeros
        for gguf_name, values in extra:
            self._put(gguf_name, encode(values, QType.F32))
        self._pending = set(self._plan)

    def _put(self, gguf_name: str, data: np.ndarray, at: int = 0) -> None:
        self._file.seek(self._offset[gguf_name] + at)
        self._file.write(contiguous_bytes(data))

    def write(self, hf_name: str, array: np.ndarray) -> None:
        """Encodes and writes one HF tensor ([out, in] matrices, half-split q/k rows)."""
        if hf_name not in self._plan:
            raise CheckpointError(f"tensor {hf_name!r} is not part of this model's GGUF")
        gguf_name, shape, tensor_type = self._plan[hf_name]
        array = np.asarray(array)
        if tuple(array.shape) != shape:
            raise CheckpointError(f"tensor {hf_name!r} has shape {tuple(array.shape)}, expected {shape}")
        heads = rotary_heads(self.config, hf_name)
        if heads is not None:
            array = half_split_to_interleaved(array, heads)
        if array.ndim == 1:
            self._put(gguf_name, encode(array, tensor_type))
        else:  # a slice of rows at a time: quantization temporaries stay small
            row_bytes = stored_nbytes((1, shape[1]), tensor_type)
            for start, stop in row_chunks(*shape):
                self._put(gguf_name, encode(array[start:stop], tensor_type), at=start * row_bytes)
        self._pending.discard(hf_name)

    def discard(self) -> None:
        """Closes the file after a failure (the caller's atomic output removes it)."""
        self._file.close()

    def close(self) -> None:
        self._file.close()
        if self._pending:
            raise CheckpointError(f"{len(self._pending)} tensor(s) never written, e.g. {sorted(self._pending)[:3]}")


def save_gguf(config: ModelConfig, params: Mapping, path: str | os.PathLike, *, dtype: Any = None,
              tokenizer: str | os.PathLike | TokenizerValues, name: str | None = None,
              overwrite: bool = False) -> Path:
    """Writes `params` as one GGUF file llama.cpp runs.

    Args:
      dtype: 'f32', 'f16', 'bf16' or 'q8_0' for the matrices (norms stay f32); None keeps the
        params' float type.
      tokenizer: the checkpoint's tokenizer folder, tokenizer.json, tokenizer.model or a .gguf
        to copy it from (or `gguf_vocab.tokenizer_metadata` values).
      name: `general.name` (default: the file's stem).
    Written to a temporary sibling and renamed into place: a failure leaves nothing behind.
    """
    check_params(config, params)
    qtype = parse_write_type(dtype, default=np.asarray(params["embed_tokens"]["embedding"]).dtype)
    values = tokenizer if isinstance(tokenizer, Mapping) else tokenizer_metadata(tokenizer, config.vocab_size)
    with atomic_output_file(path, overwrite=overwrite) as staging:
        sink = GGUFSink(config, staging, qtype, values, name=name or Path(path).stem)
        try:
            for hf_name, tensor in params_to_hf(config, params):
                sink.write(hf_name, tensor)
        except BaseException:
            sink.discard()
            raise
        sink.close()
    return Path(path)



def open_gguf_sink(source: Any, src: str | os.PathLike, path: str | os.PathLike, dtype: Any,
                   tokenizer: str | os.PathLike | None = None, *, name: str = "llamax export") -> GGUFSink:
    """The conversion hub's GGUF sink for `source` (read from `src`): `dtype` None keeps the
    source's float type; the tokenizer is `tokenizer` or the one found beside `src`."""
    qtype = parse_write_type(dtype, default=source.dtype)
    values = tokenizer_metadata(tokenizer or find_tokenizer(src), source.config.vocab_size)
    return GGUFSink(source.config, path, qtype, values, name=name)
