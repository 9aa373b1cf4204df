"""GGML tensor encodings: which llamax reads and writes, their byte sizes, and (de)quantization.

A GGUF tensor is stored in one ggml type. Float types hold plain little-endian values; block
types cut every row into blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or 256 values (the K-quants
Q2_K..Q6_K), each block carrying its own fp16 scale (and minimum) plus packed integers. A block
never spans two rows, so rows can be permuted after dequantizing (the q/k rotary reorder).

The block arithmetic is the `gguf` package's (llama.cpp's own Python port of ggml-quants.c);
`tests/test_gguf.py` checks every read type against transformers' independent torch
dequantizer and Q8_0 writing against llama.cpp's reference quantizer semantics (round to nearest,
scale = max|x| / 127).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import QuantError, dequantize, quantize

from llamax.dtypes import numpy_dtype
from llamax.errors import CheckpointError, ConfigError

QType = GGMLQuantizationType

# Types real llama-family GGUF files use (including the mixes Q2_K..Q6_K_M and Q4_0/Q4_1/Q5_x).
READ_TYPES = (QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0,
              QType.Q5_1, QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K)

# What `save_gguf` writes: the float types (any spelling `llamax.dtypes` knows) and Q8_0, which is
# near-lossless (~0.4% of a block's largest weight); smaller types are llama.cpp's `llama-quantize` job.
WRITE_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's `general.file_type` (enum llama_ftype) for a file written mostly in one type.
FILE_TYPES = {QType.F32: 0, QType.F16: 1, QType.Q8_0: 7, QType.BF16: 32}
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION: the block layouts above

_NUMPY_TYPES = {QType.F32: np.dtype(np.float32), QType.F16: np.dtype(np.float16),
                QType.BF16: np.dtype(ml_dtypes.bfloat16)}


def value_dtype(qtype: QType) -> np.dtype:
    """The numpy dtype `to_numpy` returns for a tensor stored as `qtype`."""
    return _NUMPY_TYPES.get(qtype, np.dtype(np.float32))


def type_names(types) -> str:
    return ", ".join(t.name for t in types)


def parse_write_type(dtype, default: np.dtype | None = None) -> QType:
    """'q8_0' / 'bf16' / 'fp32' / np.float16 / a ggml type -> the ggml type written; None ->
    `default`'s (a float dtype)."""
    if dtype is None:
        dtype = default if default is not None else np.float32
    if isinstance(dtype, QType) or (isinstance(dtype, str) and dtype.strip().lower() == "q8_0"):
        qtype = QType.Q8_0 if isinstance(dtype, str) else dtype
        if qtype not in FILE_TYPES:
            raise ConfigError(f"llamax writes GGUF tensors as {type_names(FILE_TYPES)}, not {qtype.name}")
        return qtype
    try:
        numpy_type = numpy_dtype(dtype)
    except ConfigError:
        numpy_type = None
    for qtype, known in _NUMPY_TYPES.items():
        if numpy_type == known:
            return qtype
    raise ConfigError(f"unknown GGUF output type {dtype!r}; expected one of {', '.join(WRITE_TYPES)} "
                      "(smaller quantizations: run llama.cpp's llama-quantize on the result)")


def check_readable(name: str, qtype_id: int) -> QType:
    """The ggml type of tensor `name`, or a CheckpointError naming it if llamax cannot read it."""
    try:
        qtype = QType(int(qtype_id))
    except ValueError:
        raise CheckpointError(f"tensor {name!r} has ggml type id {int(qtype_id)}, which is not a ggml type "
                              f"(the file is corrupt or newer than gguf); llamax reads "
                              f"{type_names(READ_TYPES)}") from None
    if qtype not in READ_TYPES:
        raise CheckpointError(f"tensor {name!r} is stored as {qtype.name}, which llamax does not read; it "
                              f"reads {type_names(READ_TYPES)} (requantize with llama.cpp's llama-quantize, "
                              "e.g. to Q4_K_M or Q8_0)")
    return qtype


def stored_nbytes(shape: tuple[int, ...], qtype: QType) -> int:
    """Bytes a tensor of numpy `shape` ([rows, cols]) takes in `qtype`."""
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    elements = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % block_size:
        raise CheckpointError(f"a {qtype.name} tensor needs rows of a multiple of {block_size} values, got "
                              f"shape {tuple(shape)}")
    return elements // block_size * block_bytes


# Block (de)quantization runs on slices of this many values, so its temporaries (several float32
# copies) stay ~64 MB whatever the tensor's size; rows are independent, so slicing is exact.
CHUNK_VALUES = 2**24


def row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    """(start, stop) row ranges of about CHUNK_VALUES values each."""
    step = max(1, CHUNK_VALUES // max(cols, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def to_numpy(data: np.ndarray, qtype: QType) -> np.ndarray:
    """A tensor's stored data (as the gguf reader maps it) -> values [rows, cols].

    F32 and F16 come back as views of the memory map; BF16 as a bfloat16 view of the same bytes
    (bit-exact, no copy); block types are dequantized to float32, a slice of rows at a time.
    """
    if qtype in (QType.F32, QType.F16):
        return data
    if qtype == QType.BF16:
        raw = np.ascontiguousarray(data).view(np.uint16)  # [rows, 2 * cols] bytes -> [rows, cols]
        return raw.view(ml_dtypes.bfloat16)
    if data.ndim != 2:
        return dequantize(data, qtype)
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    values = np.empty((data.shape[0], data.shape[1] // block_bytes * block_size), np.float32)
    for start, stop in row_chunks(*values.shape):
        values[start:stop] = dequantize(data[start:stop], qtype)
    return values


def encode(array: np.ndarray, qtype: QType) -> np.ndarray:
    """Values [rows, cols] -> the bytes (or values) a GGUF stores for them in `qtype`, C-ordered.

    Casts round to nearest even (bf16 via ml_dtypes, which matches ggml's fp32 -> bf16); Q8_0
    blocks use ggml's reference quantizer (`quantize_row_q8_0_ref`).
    """
    array = np.asarray(array)
    if qtype in _NUMPY_TYPES:
        return np.ascontiguousarray(array.astype(_NUMPY_TYPES[qtype], copy=False))
    try:
        return quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
    except QuantError as error:
        raise CheckpointError(f"cannot quantize a tensor of shape {array.shape} to {qtype.name}: {error}") from None


def can_encode(shape: tuple[int, ...], qtype: QType) -> bool:
    """Whether a tensor of `shape` can be stored as `qtype`: float types always, block types
    when each row splits into whole blocks."""
    return qtype in _NUMPY_TYPES or (len(shape) == 2 and shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0)
