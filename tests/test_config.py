import json
import re

import pytest

from llamax.config import PRESETS, ModelConfig, RopeScaling, get_preset
from llamax.errors import ConfigError


@pytest.mark.parametrize("name, billions", [
    ("llama1_7b", 6.74), ("llama1_13b", 13.02), ("llama1_33b", 32.53), ("llama1_65b", 65.29),
    ("llama2_7b", 6.74), ("llama2_13b", 13.02), ("llama2_70b", 68.98),
    ("llama3_8b", 8.03), ("llama3_70b", 70.55), ("llama3.1_8b", 8.03), ("llama3.1_405b", 405.85),
    ("llama3.2_1b", 1.24), ("llama3.2_3b", 3.21),
])
def test_preset_parameter_counts_match_published_sizes(name, billions):
    assert get_preset(name).num_params() / 1e9 == pytest.approx(billions, abs=0.01)


def test_every_preset_builds():
    for name in PRESETS:
        config = get_preset(name)
        assert config.num_heads % config.num_kv_heads == 0


def test_llama3_1_and_3_2_presets_carry_rope_scaling():
    assert get_preset("llama3.1_8b").rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert get_preset("llama3.2_1b").rope_scaling.factor == 32.0
    assert get_preset("llama3.2_1b").tie_word_embeddings
    assert get_preset("llama3_8b").rope_scaling is None


def _hf_v4_dict():
    # The spelling of real hub checkpoints (e.g. meta-llama/Llama-3.1-8B config.json).
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": False}


def test_from_hf_reads_v4_and_v5_spellings_identically():
    v4 = _hf_v4_dict()
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(v4["rope_scaling"], rope_theta=500000.0)
    assert ModelConfig.from_hf(v4) == ModelConfig.from_hf(v5) == get_preset("llama3.1_8b")


def test_from_hf_reads_legacy_type_key_and_default_rope():
    v4 = _hf_v4_dict()
    v4["rope_scaling"] = dict(v4["rope_scaling"])
    v4["rope_scaling"]["type"] = v4["rope_scaling"].pop("rope_type")
    assert ModelConfig.from_hf(v4).rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    v5 = _hf_v4_dict()
    del v5["rope_theta"], v5["rope_scaling"]
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 123.0}
    assert ModelConfig.from_hf(v5).rope_scaling is None
    assert ModelConfig.from_hf(v5).rope_theta == 123.0


def test_to_hf_round_trips_and_is_json():
    for name in ("llama2_7b", "llama3.1_8b", "llama3.2_1b"):
        config = get_preset(name)
        hf = json.loads(json.dumps(config.to_hf()))
        assert ModelConfig.from_hf(hf) == config


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"num_attention_heads": 5}, "num_heads"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_from_hf_rejects_unsupported_configs_by_name(change, message):
    hf = {**_hf_v4_dict(), **change}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(hf)


def test_from_hf_names_missing_fields():
    hf = _hf_v4_dict()
    del hf["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("change, message", [
    ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"remat_policy": "sometimes"}, "remat_policy"),
    ({"dtype": "float17"}, "dtype"),
    ({"kernel_layout": "transposed"}, "kernel_layout"),
])
def test_invalid_model_config_fields_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("tiny", **change)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="llama2_7b"):
        get_preset("llama9_1t")


def _transformers_config_json(tmp_path, config_class: str = "LlamaConfig", **fields) -> dict:
    """config.json as transformers itself writes it for a tiny model with `fields`."""
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, config_class)(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=4, **fields)
    config.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("config_class, fields, field", [
    ("LlamaConfig", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("LlamaConfig", {"hidden_act": "relu"}, "hidden_act='relu'"),
    ("LlamaConfig", {"mlp_bias": True}, "mlp_bias"),
    ("LlamaConfig", {"attention_bias": True}, "attention_bias"),
    ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope_type='linear'"),
    ("LlamaConfig", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_type='dynamic'"),
    ("MistralConfig", {}, "model_type='mistral'"),
])
def test_from_hf_refuses_what_llamax_does_not_compute(tmp_path, config_class, fields, field):
    # Each of these would otherwise load and silently compute another function (a gelu MLP run as
    # SiLU differs from transformers' logits), so one ConfigError names the field.
    hf = _transformers_config_json(tmp_path, config_class, **fields)
    with pytest.raises(ConfigError, match=re.escape(field)):
        ModelConfig.from_hf(hf)


def test_from_hf_accepts_transformers_defaults_and_swish(tmp_path):
    assert ModelConfig.from_hf(_transformers_config_json(tmp_path)).hidden_size == 32
    assert ModelConfig.from_hf(_transformers_config_json(tmp_path, hidden_act="swish")).num_layers == 1


def test_a_look_alike_config_key_is_warned_about(caplog):
    """A typo (`num_key_value_head`) would otherwise silently fall back to the default (MHA) and
    surface later as a k_proj shape mismatch that never names the key."""
    hf = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_head": 2, "torch_dtype": "float32"}
    with caplog.at_level("WARNING", logger="llamax.config"):
        config = ModelConfig.from_hf(hf)
    assert config.num_kv_heads == 4
    assert "'num_key_value_head', which llamax does not read; did you mean 'num_key_value_heads'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="llamax.config"):
        ModelConfig.from_hf({**hf, "num_key_value_heads": 2})  # both present: not a typo to report
    assert "did you mean" not in caplog.text
