"""Model configuration: one frozen dataclass, named presets, and HF `config.json` both ways.

Every LLaMA generation is the same architecture with different numbers:
LLaMA-1 (MHA, eps 1e-6, 2k context), Llama-2 (GQA on 70B, 4k context), Llama-3 (128k vocab,
GQA everywhere, rope_theta 5e5), Llama-3.1 (llama3 rope scaling, 128k context) and Llama-3.2
(small, tied embeddings, rope scaling factor 32).
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from typing import Any, Mapping

import jax.numpy as jnp

from llamax.dtypes import float_dtype_name
from llamax.errors import ConfigError, check_field_types, check_int, is_int

logger = logging.getLogger(__name__)

REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_qkv_projections",
                  "save_projections", "offload_projections", "offload_dots_with_no_batch_dims")
ATTENTION_IMPLS = ("xla", "cudnn", "splash")
KERNEL_LAYOUTS = ("in_out", "out_in")
# transformers maps both names to SiLU (ACT2FN); anything else (gelu, relu, ...) is another MLP.
SUPPORTED_HIDDEN_ACTS = ("silu", "swish")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style ("llama3") frequency scaling of rotary embeddings."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of one LLaMA-family model.

    `dtype` is the compute dtype (activations, matmul inputs); `param_dtype` is the dtype of the
    stored (master) weights. bf16 compute with fp32 params is the usual training setting. Both
    take a dtype object (`jnp.bfloat16`) or a name ('bfloat16', 'bf16', 'fp32', ...) and are
    stored as the canonical name; non-float dtypes are refused.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 means hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = True
    attention_impl: str = "xla"
    # Causal attention without a cache runs in query blocks of this many tokens, each reading
    # only the keys up to its end (skips the masked upper triangle); 0 = one dense block.
    attention_block_size: int = 128
    # How projection kernels are stored: "in_out" = [inputs..., outputs...] (as trained, saved and
    # sharded); "out_in" = one [outputs, inputs] matrix each, the CPU decoding layout
    # (`llamax.infer.generate.decoding_config`; `llamax.model.llama.kernels_out_in` converts).
    kernel_layout: str = "in_out"

    def __post_init__(self):
        # One canonical name per dtype: jnp.bfloat16, 'bf16' and 'bfloat16' are the same config.
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, float_dtype_name(getattr(self, name), f"ModelConfig.{name}"))
        if isinstance(self.rope_scaling, Mapping):
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
            except TypeError as exc:
                raise ConfigError(f"rope_scaling={dict(self.rope_scaling)!r} is not a RopeScaling: {exc}") from exc
        check_field_types(self)
        if self.head_dim == 0:
            _check_positive_ints(self, ("hidden_size", "num_heads"))
            if self.num_heads <= 0 or self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                    "set head_dim explicitly or fix the sizes")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        self.validate()

    def validate(self) -> None:
        """Raises ConfigError naming the first field that is out of range."""
        _check_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                    "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"))
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if not is_finite_number(value) or not value >= 0 or (value == 0 and name != "initializer_range"):
                raise ConfigError(f"ModelConfig.{name} must be a finite number > 0"
                                  f"{' (>= 0)' if name == 'initializer_range' else ''}, got {value!r}")
        for name in ("tie_word_embeddings", "scan_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} "
                "(grouped-query attention shares each kv head among num_heads // num_kv_heads heads)")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not isinstance(self.remat_policy, str) or self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if not isinstance(self.attention_impl, str) or self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        if not isinstance(self.kernel_layout, str) or self.kernel_layout not in KERNEL_LAYOUTS:
            raise ConfigError(f"kernel_layout={self.kernel_layout!r}; expected one of {KERNEL_LAYOUTS}")
        check_int(self.attention_block_size, "ModelConfig.attention_block_size", 0, "0 = no blocking")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def num_query_groups(self) -> int:
        """How many query heads share one kv head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count from the shapes alone (matches HF's `num_parameters()`)."""
        attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attention + mlp + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (rope_scaling nested), for a run's or params checkpoint's config file (`llamax.run_dir`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        if not isinstance(fields, Mapping):
            raise ConfigError(f"a model config must be a JSON object, got {type(fields).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} for ModelConfig; known fields: {sorted(known)}")
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ConfigError(f"invalid model config: {exc}") from exc

    def architecture(self) -> dict[str, Any]:
        """The fields that fix the weights' shapes and meaning (not numerics or memory policy)."""
        run_fields = {"dtype", "param_dtype", "remat_policy", "scan_layers", "attention_impl",
                      "attention_block_size", "initializer_range"}
        return {k: v for k, v in self.to_dict().items() if k not in run_fields}

    # ---- HF config.json -------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> "ModelConfig":
        """Builds a config from an HF `config.json` dict.

        Reads both spellings: transformers v4 and hub checkpoints put `rope_theta` and
        `rope_scaling` at the top level; transformers v5 nests them in `rope_parameters`.
        Refuses, with a ConfigError naming the field, what llamax's LLaMA does not compute:
        `model_type` other than llama, `hidden_act` other than SiLU, `attention_bias`/`mlp_bias`,
        and a `rope_type` other than default/llama3.
        """
        if not isinstance(hf, Mapping):
            raise ConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"unsupported model_type={model_type!r} in config.json; expected 'llama'")
        rope = hf.get("rope_parameters") or {}
        if not isinstance(rope, Mapping):
            raise ConfigError(f"config.json rope_parameters must be an object, got {rope!r}")
        scaling = hf.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = rope
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if not is_finite_number(rope_theta):
            raise ConfigError(f"config.json rope_theta must be a number, got {rope_theta!r}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [key for key in required if key not in hf]
        if missing:
            raise ConfigError(f"config.json is missing required field(s) {missing}")
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or 0,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=_rope_scaling_from_hf(scaling),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),  # validated: must be a bool
            initializer_range=hf.get("initializer_range", 0.02),
        )
        _warn_about_look_alike_keys(hf)
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"config.json sets {flag}=true; llamax LLaMA layers have no biases")
        hidden_act = hf.get("hidden_act", "silu")
        if hidden_act not in SUPPORTED_HIDDEN_ACTS:
            raise ConfigError(f"unsupported hidden_act={hidden_act!r} in config.json; llamax LLaMA MLPs "
                              "use SiLU ('silu', also spelled 'swish')")
        fields.update(overrides)
        try:
            return cls(**fields)
        except TypeError as exc:  # an override that is not a field
            raise ConfigError(f"invalid ModelConfig override: {exc}") from exc

    def to_hf(self) -> dict[str, Any]:
        """An HF `config.json` dict that transformers v4 and v5 both read."""
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
            rope_parameters = {**rope_scaling, "rope_theta": self.rope_theta}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32" if self.param_dtype == "float32" else "bfloat16",
        }


# The config.json keys `from_hf` reads: a key one typo away from one of these is probably meant
# to be it, and silently falling back to the default would give a model of another shape.
HF_KEYS_READ = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
                "initializer_range", "hidden_act", "attention_bias", "mlp_bias", "model_type")


def _warn_about_look_alike_keys(hf: Mapping[str, Any]) -> None:
    for key in hf:
        if key in HF_KEYS_READ:
            continue
        close = [known for known in difflib.get_close_matches(key, HF_KEYS_READ, n=1, cutoff=0.85)
                 if known not in hf]
        if close:
            logger.warning("config.json has %r, which llamax does not read; did you mean %r? (it is "
                           "absent, so its default is used)", key, close[0])


def _rope_scaling_from_hf(scaling: Mapping[str, Any] | None) -> RopeScaling | None:
    if not scaling:
        return None
    if not isinstance(scaling, Mapping):
        raise ConfigError(f"config.json rope_scaling must be an object, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ConfigError(
            f"unsupported rope_type={rope_type!r} in config.json; llamax supports 'default' and 'llama3'")
    try:
        return RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise ConfigError(f"llama3 rope_scaling in config.json is missing {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"llama3 rope_scaling in config.json has a non-numeric value ({exc}): "
                          f"{dict(scaling)!r}") from exc


def is_finite_number(value: Any) -> bool:
    """A finite int or float (JSON number), not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        return False


def _check_positive_ints(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        check_int(getattr(config, name), f"ModelConfig.{name}", 1)


def _check_rope_scaling(scaling: Any) -> None:
    if not isinstance(scaling, RopeScaling):
        raise ConfigError(f"rope_scaling must be a RopeScaling or None, got {scaling!r}")
    numbers = (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor)
    context = scaling.original_max_position_embeddings
    if not all(is_finite_number(v) and v > 0 for v in numbers) or not is_int(context) or context <= 0:
        raise ConfigError(f"rope_scaling={scaling} needs factors > 0 and a positive integer "
                          "original_max_position_embeddings")
    if not scaling.high_freq_factor > scaling.low_freq_factor:
        raise ConfigError(f"rope_scaling high_freq_factor={scaling.high_freq_factor} must exceed "
                          f"low_freq_factor={scaling.low_freq_factor} (llama3 scaling interpolates "
                          "between the two wavelengths)")


# ---- presets ------------------------------------------------------------------------------

_LLAMA1 = dict(vocab_size=32000, rms_norm_eps=1e-6, max_position_embeddings=2048)
_LLAMA2 = dict(vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096)
_LLAMA3 = dict(vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192)
_LLAMA31 = dict(_LLAMA3, max_position_embeddings=131072, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))
_LLAMA32 = dict(_LLAMA3, max_position_embeddings=131072, tie_word_embeddings=True,
                rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192))


def _shape(hidden, intermediate, layers, heads, kv_heads, **extra):
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                num_heads=heads, num_kv_heads=kv_heads, **extra)


PRESETS: dict[str, dict[str, Any]] = {
    "llama1_7b": dict(_LLAMA1, **_shape(4096, 11008, 32, 32, 32)),
    "llama1_13b": dict(_LLAMA1, **_shape(5120, 13824, 40, 40, 40)),
    "llama1_33b": dict(_LLAMA1, **_shape(6656, 17920, 60, 52, 52)),
    "llama1_65b": dict(_LLAMA1, **_shape(8192, 22016, 80, 64, 64), rms_norm_eps=1e-5),
    "llama2_7b": dict(_LLAMA2, **_shape(4096, 11008, 32, 32, 32)),
    "llama2_13b": dict(_LLAMA2, **_shape(5120, 13824, 40, 40, 40)),
    "llama2_70b": dict(_LLAMA2, **_shape(8192, 28672, 80, 64, 8)),
    "llama3_8b": dict(_LLAMA3, **_shape(4096, 14336, 32, 32, 8)),
    "llama3_70b": dict(_LLAMA3, **_shape(8192, 28672, 80, 64, 8)),
    "llama3.1_8b": dict(_LLAMA31, **_shape(4096, 14336, 32, 32, 8)),
    "llama3.1_70b": dict(_LLAMA31, **_shape(8192, 28672, 80, 64, 8)),
    "llama3.1_405b": dict(_LLAMA31, **_shape(16384, 53248, 126, 128, 8)),
    "llama3.2_1b": dict(_LLAMA32, **_shape(2048, 8192, 16, 32, 8, head_dim=64)),
    "llama3.2_3b": dict(_LLAMA32, **_shape(3072, 8192, 28, 24, 8, head_dim=128)),
    # SmolLM2-135M(-Instruct), the Llama-architecture model behind the GGUF tests and README example.
    "smollm2_135m": dict(vocab_size=49152, **_shape(576, 1536, 30, 9, 3), rms_norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    # Small sizes for tests, the CPU demo and benchmarks.
    "tiny": dict(vocab_size=256, **_shape(64, 176, 2, 4, 2), max_position_embeddings=512),
    "demo": dict(vocab_size=2048, **_shape(256, 688, 4, 4, 2), max_position_embeddings=512),
    "bench": dict(vocab_size=8192, **_shape(512, 1408, 8, 8, 4), max_position_embeddings=2048),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """Returns the named preset, with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
