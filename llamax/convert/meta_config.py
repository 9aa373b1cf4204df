"""Meta's `params.json` <-> ModelConfig.

params.json holds Meta's `ModelArgs`: dim, n_layers, n_heads, n_kv_heads, vocab_size (-1 in
Llama 1/2: the tensors know), multiple_of and ffn_dim_multiplier (from which Meta's FeedForward
derives its width), norm_eps, rope_theta, use_scaled_rope. Context length is not in it (a
runtime argument in Meta's code), so it defaults to the released models' values per generation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from llamax.config import ModelConfig, RopeScaling, is_finite_number
from llamax.errors import CheckpointError, ConfigError, is_int

PARAMS_FILE = "params.json"
LLAMA3_VOCAB_SIZE = 128256
# Meta's use_scaled_rope hard-codes these (llama-models `apply_scaling`); factor is overridable.
META_ROPE_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)


def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The FFN width Meta's `FeedForward` derives from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params_for(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that reproduce `intermediate_size` exactly, preferring
    the values Meta's own releases use (256/None; 1.3, 1.5, 1.0 with 256, 1024, 4096)."""
    candidates: list[tuple[int, float | None]] = [(256, None)]
    candidates += [(m, f) for f in (1.3, 1.5, 1.0) for m in (256, 1024, 4096)]
    base = int(2 * (4 * dim) / 3)
    multiple = intermediate_size & -intermediate_size  # largest power of two dividing it
    for step in (0.5, 0.25, 0.75, 0.0):
        candidates.append((min(multiple, 256), (intermediate_size + step) / base))
    for multiple_of, multiplier in candidates:
        if meta_intermediate_size(dim, multiple_of, multiplier) == intermediate_size:
            return multiple_of, multiplier
    raise ConfigError(f"no multiple_of/ffn_dim_multiplier gives intermediate_size={intermediate_size} "
                      f"for dim={dim} under Meta's FeedForward rule; this model cannot be saved in Meta format")


def read_params_json(path: Path) -> dict:
    params_path = Path(path) / PARAMS_FILE
    if not params_path.exists():
        hint = " (it has config.json: pass --src_format hf)" if (Path(path) / "config.json").exists() else ""
        raise CheckpointError(f"{params_path} not found: a Meta checkpoint folder needs params.json "
                              f"next to its consolidated.NN.pth shards{hint}")
    try:
        params = json.loads(params_path.read_bytes())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"{params_path} is not valid JSON: {exc}") from exc
    check_params_json(params, str(params_path))
    return params


# params.json key -> (kind, required); None is accepted for every optional key, as Meta writes it.
_PARAM_KINDS: dict[str, tuple[str, bool]] = {
    "dim": ("count", True), "n_layers": ("count", True), "n_heads": ("count", True),
    "n_kv_heads": ("count", False), "multiple_of": ("count", False), "max_seq_len": ("count", False),
    "vocab_size": ("vocab", False), "ffn_dim_multiplier": ("positive", False),
    "norm_eps": ("positive", False), "rope_theta": ("positive", False),
    "rope_scaling_factor": ("positive", False), "rope_high_freq_factor": ("positive", False),
    "use_scaled_rope": ("bool", False),
}


def check_params_json(params: Any, where: str = PARAMS_FILE) -> None:
    """Raises ConfigError unless `params` is a params.json object whose known keys have the types
    and ranges Meta's ModelArgs gives them (unknown keys are ignored, as Meta's code does)."""
    if not isinstance(params, dict):
        raise ConfigError(f"{where} holds a {type(params).__name__}, expected a JSON object with "
                          "Meta's ModelArgs (dim, n_layers, n_heads, vocab_size, multiple_of, ...)")
    missing = [key for key, (_, required) in _PARAM_KINDS.items() if required and key not in params]
    if missing:
        raise ConfigError(f"{where} lacks required key(s) {missing}; expected Meta's ModelArgs "
                          "(dim, n_layers, n_heads, vocab_size, multiple_of, norm_eps, ...)")
    for key, (kind, required) in _PARAM_KINDS.items():
        if key not in params or (params[key] is None and not required):
            continue
        value = params[key]
        ok = {"count": is_int(value) and value > 0,
              "vocab": is_int(value) and (value > 0 or value == -1),
              "positive": is_finite_number(value) and value > 0,
              "bool": isinstance(value, bool)}[kind]
        if not ok:
            expected = {"count": "a positive integer", "vocab": "a positive integer or -1",
                        "positive": "a number > 0", "bool": "true or false"}[kind]
            raise ConfigError(f"{where}: {key} must be {expected}, got {value!r}")


def config_from_meta(params: Mapping[str, Any], *, vocab_size: int, intermediate_size: int,
                     tie_word_embeddings: bool, **overrides: Any) -> ModelConfig:
    """ModelConfig from params.json values plus what only the tensors know (vocab, FFN width)."""
    check_params_json(params)
    dim, num_heads = params["dim"], params["n_heads"]
    if num_heads <= 0 or dim % num_heads:
        raise ConfigError(f"params.json: n_heads={num_heads} does not divide dim={dim}; Meta's "
                          "attention needs head_dim = dim // n_heads")
    scaled = bool(params.get("use_scaled_rope", False))
    rope_scaling = None
    if scaled:
        rope_scaling = RopeScaling(
            factor=float(params.get("rope_scaling_factor") or META_ROPE_SCALING.factor),
            low_freq_factor=META_ROPE_SCALING.low_freq_factor,
            high_freq_factor=float(params.get("rope_high_freq_factor") or META_ROPE_SCALING.high_freq_factor),
            original_max_position_embeddings=META_ROPE_SCALING.original_max_position_embeddings)
    rope_theta = float(params.get("rope_theta") or 10000.0)
    norm_eps = float(params.get("norm_eps") or 1e-5)
    # Context length is a runtime argument in Meta's code; these are the released models' values.
    if "max_seq_len" in params:
        context = int(params["max_seq_len"])
    elif scaled:  # Llama 3.1+
        context = 131072
    elif vocab_size >= LLAMA3_VOCAB_SIZE:
        context = 8192
    else:
        context = 2048 if norm_eps == 1e-6 else 4096
    fields = dict(vocab_size=vocab_size, hidden_size=dim, intermediate_size=intermediate_size,
                  num_layers=params["n_layers"], num_heads=num_heads,
                  num_kv_heads=params.get("n_kv_heads") or num_heads, rms_norm_eps=norm_eps,
                  rope_theta=rope_theta, rope_scaling=rope_scaling, max_position_embeddings=context,
                  tie_word_embeddings=tie_word_embeddings)
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_meta(config: ModelConfig) -> dict[str, Any]:
    """params.json for `config`, spelled like Meta's release of the matching generation.

    Raises ConfigError for what Meta's format cannot express (head_dim != dim // n_heads,
    a rope scaling other than Meta's use_scaled_rope with low_freq_factor=1, original context 8192).
    """
    if config.head_dim * config.num_heads != config.hidden_size:
        raise ConfigError(f"head_dim={config.head_dim} != hidden_size // num_heads = "
                          f"{config.hidden_size // config.num_heads}; Meta's format has no head_dim field")
    multiple_of, multiplier = ffn_params_for(config.hidden_size, config.intermediate_size)
    params: dict[str, Any] = {"dim": config.hidden_size, "n_layers": config.num_layers,
                              "n_heads": config.num_heads, "n_kv_heads": config.num_kv_heads,
                              "vocab_size": config.vocab_size, "multiple_of": multiple_of,
                              "ffn_dim_multiplier": multiplier, "norm_eps": config.rms_norm_eps}
    if config.rope_theta != 10000.0:  # Llama 2's code has no rope_theta argument
        params["rope_theta"] = config.rope_theta
    scaling = config.rope_scaling
    if scaling is not None:
        if (scaling.low_freq_factor, scaling.original_max_position_embeddings) != (
                META_ROPE_SCALING.low_freq_factor, META_ROPE_SCALING.original_max_position_embeddings):
            raise ConfigError(f"rope_scaling={scaling} cannot be written to params.json: Meta's "
                              "use_scaled_rope fixes low_freq_factor=1 and original context 8192")
        params["use_scaled_rope"] = True
        if scaling.factor != META_ROPE_SCALING.factor:
            params["rope_scaling_factor"] = scaling.factor
        if scaling.high_freq_factor != META_ROPE_SCALING.high_freq_factor:
            params["rope_high_freq_factor"] = scaling.high_freq_factor
    return params
