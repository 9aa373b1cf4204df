"""GGUF files (llama.cpp, Ollama, LM Studio) -> llamax: metadata -> ModelConfig, tensors -> HF.

llama.cpp's converter (`convert_hf_to_gguf.py`) stores an HF Llama with four differences, all
undone here and nowhere else (`gguf_write.py` applies them the other way):
  * names: `token_embd`, `blk.N.attn_q` ... `ffn_down`, `output_norm`, `output` (absent when
    the output layer is tied to the embeddings), table below;
  * rotary layout: q/k rows are permuted from HF's half-split layout to ggml's interleaved pairs
    (its `permute`, the same as Meta's), so they are un-permuted per head (k with kv heads);
  * Llama-3 rope scaling is a tensor, `rope_freqs.weight`: one divisor per rotary frequency,
    from which the RopeScaling numbers are recovered (and checked by recomputing the divisors);
  * tensors may be block-quantized (`gguf_quant.py`); values come back dequantized to float32.
GGUF lists dims innermost first; the reader's numpy arrays are [rows, cols] = HF's [out, in].

`GGUFSource` is the conversion hub's lazy source (one tensor dequantized per read, the file
memory-mapped); `load_gguf` builds params from it. Only `general.architecture = llama` is read.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from gguf import GGUFReader

from llamax.config import ModelConfig, RopeScaling
from llamax.convert.gguf_quant import check_readable, stored_nbytes, to_numpy, value_dtype
from llamax.convert.hf import expected_hf_shapes, hf_to_params
from llamax.convert.meta import interleaved_to_half_split
from llamax.errors import CheckpointError, ConfigError

ARCHITECTURE = "llama"
ROPE_FREQS = "rope_freqs.weight"
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
_MISSING = object()


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for an HF Llama tensor ('model.layers.3.mlp.up_proj.weight' -> 'blk.3.ffn_up.weight')."""
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    match = _LAYER_NAME.fullmatch(hf_name)
    if match is None or match[2] not in LAYER_NAMES:
        raise CheckpointError(f"tensor {hf_name!r} has no GGUF name; it is not part of an HF Llama")
    return f"blk.{match[1]}.{LAYER_NAMES[match[2]]}"


def rotary_heads(config: ModelConfig, hf_name: str) -> int | None:
    """Heads whose rows llama.cpp permutes in this tensor (q: num_heads, k: num_kv_heads), else None."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return config.num_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return config.num_kv_heads
    return None


# ---- opening a file -----------------------------------------------------------------------

class _CheckedReader(GGUFReader):
    """The gguf package's memory-mapped reader, refusing unreadable tensor types and truncated
    data by tensor name before it builds its views (it would fail with a reshape error)."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        for field in fields:
            _, name_bytes, _, dims, raw_type, offset = field.parts
            name = bytes(name_bytes).decode("utf-8", "replace")
            qtype = check_readable(name, raw_type[0])
            shape = tuple(reversed([int(d) for d in dims]))
            end = start_offs + int(offset[0]) + stored_nbytes(shape, qtype)
            if end > len(self.data):
                raise CheckpointError(f"the file is truncated: tensor {name!r} ({qtype.name}, shape {shape}) "
                                      f"ends at byte {end:,} but the file has {len(self.data):,} bytes; "
                                      "download or export it again")
        super()._build_tensors(start_offs, fields)


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """A checked, memory-mapped `gguf.GGUFReader` of `path`; CheckpointError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; a GGUF checkpoint is a single .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    try:
        return _CheckedReader(path)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as error:
        raise CheckpointError(f"{path} is a truncated or corrupt GGUF file: its header does not parse "
                              f"({type(error).__name__}: {error}); download or export it again") from None


def metadata(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """One metadata value as Python (str, int, float, bool or list), or `default` if absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"GGUF metadata lacks {key!r}, which a {ARCHITECTURE} model needs")
        return default
    return field.contents()


def _float32_value(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))  # numpy prints the shortest decimal that round-trips


# ---- Llama-3 rope scaling <-> rope_freqs.weight -------------------------------------------

def _rotary_wavelengths(head_dim: int, theta: float) -> np.ndarray:
    # float32 frequencies like llama.cpp's converter, so the band edges fall on the same side.
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    return 2 * math.pi / freqs.astype(np.float64)  # [head_dim // 2]


def llama3_rope_factors(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for Llama-3 scaling: the divisor of each rotary frequency
    (1 for short wavelengths, `factor` for long ones, interpolated between). [head_dim // 2] f32."""
    wavelength = _rotary_wavelengths(head_dim, theta)
    context, low, high = (scaling.original_max_position_embeddings, scaling.low_freq_factor,
                          scaling.high_freq_factor)
    smooth = (context / wavelength - low) / (high - low)
    factors = np.where(wavelength < context / high, 1.0,
                       np.where(wavelength > context / low, scaling.factor,
                                1.0 / ((1.0 - smooth) / scaling.factor + smooth)))
    return factors.astype(np.float32)


def rope_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float) -> RopeScaling | None:
    """The RopeScaling whose `llama3_rope_factors` are `factors` (None if all are 1).

    Only two combinations of (original context C, low l, high h) shape the divisors, C/(h-l) and
    l/(h-l), so l = 1 is fixed (Meta's value) and the rest solved from the interpolated band; with
    fewer than two frequencies in the band, h = 4 (Meta's value) too. Checked by recomputing.
    """
    factors = np.asarray(factors, np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise CheckpointError(f"{ROPE_FREQS} has {factors.size} values; head_dim={head_dim} needs {head_dim // 2}")
    if np.allclose(factors, 1.0):
        return None
    wavelength = _rotary_wavelengths(head_dim, theta)
    factor = float(factors.max())
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    # factor_i = 1 / ((1 - s_i) / factor + s_i) with s_i = C/(h-l) / wavelength_i - l/(h-l)
    smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    low = 1.0
    if band.sum() >= 2:
        design = np.stack([1 / wavelength[band], -np.ones(band.sum())], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, smooth, rcond=None)
        high, context = low + 1 / b, a / b
    else:
        high = 4.0
        if band.sum() == 1:
            context = wavelength[band][0] * (smooth[0] * (high - low) + low)
        else:  # the band falls between two frequencies: any context with short*h < C < long*l
            short = wavelength[factors <= 1 + 1e-6].max(initial=1.0)
            long = wavelength[factors >= factor * (1 - 1e-6)].min(initial=short * 64)
            powers = [2.0 ** k for k in range(40) if short * high < 2.0 ** k < long * low]
            if powers:  # context lengths are powers of two in practice
                context = powers[-1]
            else:
                high = min(high, math.sqrt(long / short))
                context = math.sqrt(short * high * long * low)
    scaling = None
    if factor > 1 and np.isfinite(high) and high > low and np.isfinite(context) and context >= 1:
        scaling = RopeScaling(factor=_float32_value(factor), low_freq_factor=low,
                              high_freq_factor=round(float(high), 6),
                              original_max_position_embeddings=int(round(float(context))))
    if scaling is None or not np.allclose(llama3_rope_factors(head_dim, theta, scaling), factors, rtol=1e-4):
        raise CheckpointError(f"{ROPE_FREQS} holds rotary frequency divisors {np.round(factors, 4).tolist()} "
                              "that are not Llama-3 rope scaling, the only kind llamax implements")
    return scaling


# ---- metadata -> ModelConfig ----------------------------------------------------------------

def config_from_gguf(reader: GGUFReader, **overrides: Any) -> ModelConfig:
    """ModelConfig from a GGUF's `llama.*` metadata and its tensor table (vocabulary size, tied
    output, rope_freqs). Architectures other than llama, MoE, partial rotary and rope scaling
    other than Llama-3's are refused by name."""
    architecture = metadata(reader, "general.architecture")
    if architecture != ARCHITECTURE:
        raise CheckpointError(f"the file holds a {architecture!r} model (general.architecture); llamax reads "
                              f"{ARCHITECTURE!r} GGUFs only (LLaMA 1-3, Mistral 7B, SmolLM, TinyLlama, ...)")

    def key(name: str, default: Any = _MISSING) -> Any:
        return metadata(reader, f"{ARCHITECTURE}.{name}", default)

    if key("expert_count", 0):
        raise CheckpointError(f"the file is a mixture-of-experts model (llama.expert_count={key('expert_count')}); "
                              "llamax implements dense LLaMA layers only")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError("the file has no token_embd.weight tensor; it is not a complete llama model")
    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", None) or hidden // max(heads, 1)
    if key("attention.value_length", head_dim) != head_dim:
        raise CheckpointError(f"attention.key_length={head_dim} but value_length={key('attention.value_length')}; "
                              "llamax needs equal query/key and value head sizes")
    if key("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"rope.dimension_count={key('rope.dimension_count')} rotates part of each "
                              f"{head_dim}-wide head; llamax rotates whole heads")
    scaling_type, scaling_factor = key("rope.scaling.type", "none"), key("rope.scaling.factor", 0.0)
    if scaling_type not in ("none", "linear") or (scaling_type == "linear" and scaling_factor not in (0.0, 1.0)):
        raise CheckpointError(f"rope scaling {scaling_type!r} (factor {scaling_factor}) is not supported; "
                              "llamax implements Llama-3 frequency scaling (rope_freqs.weight) only")
    theta = _float32_value(key("rope.freq_base", 10000.0))
    vocab_size = int(tensors["token_embd.weight"].shape[1])
    if key("vocab_size", vocab_size) != vocab_size:
        raise CheckpointError(f"llama.vocab_size={key('vocab_size')} but token_embd.weight has {vocab_size} rows")
    rope_scaling = None
    if ROPE_FREQS in tensors:
        freqs = tensors[ROPE_FREQS]
        rope_scaling = rope_scaling_from_factors(to_numpy(freqs.data, freqs.tensor_type), head_dim, theta)
    fields = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=key("feed_forward_length"),
        num_layers=key("block_count"), num_heads=heads, num_kv_heads=key("attention.head_count_kv", heads),
        head_dim=head_dim, rms_norm_eps=_float32_value(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta, rope_scaling=rope_scaling, max_position_embeddings=key("context_length", 2048),
        tie_word_embeddings="output.weight" not in tensors)
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"the GGUF metadata describes an invalid model: {error}") from None


# ---- the conversion hub's source ------------------------------------------------------------

class GGUFSource(Mapping):
    """A GGUF file as a lazy HF-name -> array mapping: checked up front (architecture, every
    tensor present with its shape and a readable type, nothing unexpected), then each read
    dequantizes one tensor from the memory map and un-permutes q/k. Names come in file order."""

    def __init__(self, path: str | os.PathLike, **config_overrides: Any):
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        try:
            self.config = config_from_gguf(self.reader, **config_overrides)
        except CheckpointError as error:
            raise CheckpointError(f"{self.path}: {error}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._where: dict[str, str] = {}
        for hf_name, shape in expected_hf_shapes(self.config).items():
            name = gguf_tensor_name(hf_name)
            if name not in self.tensors:
                raise CheckpointError(f"{self.path} lacks tensor {name!r} ({hf_name}), which its metadata "
                                      f"({self.config.num_layers} layers) implies")
            found = tuple(reversed([int(d) for d in self.tensors[name].shape]))
            if found != tuple(shape):
                raise CheckpointError(f"{self.path}: tensor {name!r} has shape {found}, but the metadata "
                                      f"implies {tuple(shape)}")
            self._where[hf_name] = name
        unexpected = sorted(set(self.tensors) - set(self._where.values()) - {ROPE_FREQS})
        if unexpected:
            raise CheckpointError(f"{self.path} has {len(unexpected)} tensor(s) a LLaMA does not use, e.g. "
                                  f"{unexpected[:3]} (biases or another architecture's layers)")
        embedding = self.tensors["token_embd.weight"]
        self.dtype = value_dtype(embedding.tensor_type)
        self.types = {hf: self.tensors[name].tensor_type for hf, name in self._where.items()}

    def names(self) -> list[str]:
        return sorted(self._where, key=lambda n: self.tensors[self._where[n]].data_offset)

    def __getitem__(self, hf_name: str) -> np.ndarray:
        tensor = self.tensors[self._where[hf_name]]
        value = to_numpy(tensor.data, tensor.tensor_type)
        heads = rotary_heads(self.config, hf_name)
        return value if heads is None else interleaved_to_half_split(value, heads)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._where)


def load_gguf(path: str | os.PathLike, **config_overrides: Any) -> tuple[ModelConfig, dict]:
    """Reads a llama GGUF file -> (ModelConfig, params as numpy arrays).

    Quantized tensors are dequantized (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K);
    params come out in `config.param_dtype` (float32 unless overridden), scanned unless
    `scan_layers=False`. One tensor is dequantized at a time from the memory-mapped file.
    The tokenizer in the file's metadata: `llamax.tokenizer.gguf.tokenizer_from_gguf(path)`.
    """
    source = GGUFSource(path, **config_overrides)
    return source.config, hf_to_params(source.config, source)
