"""Meta consolidated.NN.pth checkpoints <-> llamax, against transformers' own conventions.

The Meta checkpoints here are written by the test itself from a tiny HF model, using the inverse
of the `permute` in transformers' `convert_llama_weights_to_hf.py` (written out below from that
file's definition, not taken from llamax), so llamax logits must equal HF's.
"""
import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch

import jax.numpy as jnp
from hf_models import hf_logits, make_hf_model
from llamax.config import RopeScaling, get_preset
from llamax.convert import load_hf
from llamax.convert.meta import MetaReader, load_meta, save_meta
from llamax.errors import CheckpointError, ConfigError
from llamax.convert.meta_config import ffn_params_for, meta_intermediate_size
from llamax.model import Llama

META_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def hf_permute(w, n_heads, dim1, dim2):
    """transformers convert_llama_weights_to_hf.py: Meta (interleaved) rows -> HF rows."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_unpermute(w, n_heads, dim1, dim2):
    """The inverse of `hf_permute`: HF rows -> Meta rows."""
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def write_meta_checkpoint(model, folder, num_shards=1, embedding_dim=1, params_overrides=None,
                          extra_tensors=None):
    """A Meta checkpoint of `model`'s weights, sharded the way Meta's model-parallel code does."""
    c = model.config
    dim, heads, kv_heads = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    head_dim = dim // heads
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], embedding_dim),
            "norm.weight": (sd["model.norm.weight"], None),
            "output.weight": (sd.get("lm_head.weight", sd["model.embed_tokens.weight"]), 0)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        meta.update({
            f"layers.{i}.attention.wq.weight": (hf_unpermute(sd[p + "self_attn.q_proj.weight"], heads, dim, dim), 0),
            f"layers.{i}.attention.wk.weight": (hf_unpermute(sd[p + "self_attn.k_proj.weight"], kv_heads,
                                                             kv_heads * head_dim, dim), 0),
            f"layers.{i}.attention.wv.weight": (sd[p + "self_attn.v_proj.weight"], 0),
            f"layers.{i}.attention.wo.weight": (sd[p + "self_attn.o_proj.weight"], 1),
            f"layers.{i}.feed_forward.w1.weight": (sd[p + "mlp.gate_proj.weight"], 0),
            f"layers.{i}.feed_forward.w2.weight": (sd[p + "mlp.down_proj.weight"], 1),
            f"layers.{i}.feed_forward.w3.weight": (sd[p + "mlp.up_proj.weight"], 0),
            f"layers.{i}.attention_norm.weight": (sd[p + "input_layernorm.weight"], None),
            f"layers.{i}.ffn_norm.weight": (sd[p + "post_attention_layernorm.weight"], None),
        })
    os.makedirs(folder, exist_ok=True)
    for shard in range(num_shards):
        tensors = {name: (w if split is None else w.chunk(num_shards, dim=split)[shard]).clone()
                   for name, (w, split) in meta.items()}
        tensors.update(extra_tensors or {})
        torch.save(tensors, os.path.join(folder, f"consolidated.{shard:02d}.pth"))
    multiple_of, multiplier = ffn_params_for(dim, c.intermediate_size)  # checked separately below
    params = {"dim": dim, "n_layers": c.num_hidden_layers, "n_heads": heads, "n_kv_heads": kv_heads,
              "vocab_size": c.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
              "norm_eps": c.rms_norm_eps, "rope_theta": c.rope_parameters["rope_theta"]}
    if (c.rope_scaling or {}).get("rope_type") == "llama3":
        params["use_scaled_rope"] = True
    params.update(params_overrides or {})
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)
    return folder


def test_test_permutation_is_the_inverse_of_transformers_permute():
    w = torch.randn(64, 48)
    assert torch.equal(hf_permute(hf_unpermute(w, 4, 64, 48), 4, 64, 48), w)


def _tokens(vocab, length=24):
    return np.random.RandomState(0).randint(0, vocab, (2, length))


def _assert_logits_match(model, config, params):
    tokens = _tokens(config.vocab_size)
    ours = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant,num_shards,embedding_dim,overrides", [
    ("llama2_mha", 1, 1, {}),
    ("llama2_mha", 2, 1, {}),
    ("llama3_gqa", 2, 0, {}),  # Llama 3: embeddings sharded on the vocab
    ("llama3_gqa", 4, 1, {"num_attention_heads": 4, "num_key_value_heads": 4}),
    ("llama31_scaled", 1, 0, {"rope_scaling": META_SCALING, "max_position_embeddings": 131072}),
    ("llama31_scaled", 2, 0, {"rope_scaling": META_SCALING, "num_key_value_heads": 2,
                              "max_position_embeddings": 131072}),
])
def test_meta_to_llamax_logits_equal_hf(tmp_path, variant, num_shards, embedding_dim, overrides):
    model = make_hf_model(variant, **overrides)
    folder = write_meta_checkpoint(model, tmp_path / "meta", num_shards, embedding_dim)
    config, params = load_meta(folder)
    assert (config.num_heads, config.num_kv_heads) == (model.config.num_attention_heads,
                                                       model.config.num_key_value_heads)
    if "rope_scaling" in overrides:
        assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
        assert config.max_position_embeddings == 131072
    _assert_logits_match(model, config, params)


def test_llama1_vocab_minus_one_and_rope_freqs(tmp_path):
    model = make_hf_model("llama2_mha", rms_norm_eps=1e-6)
    folder = write_meta_checkpoint(model, tmp_path / "meta", 2, 1, params_overrides={"vocab_size": -1},
                                   extra_tensors={"rope.freqs": torch.ones(8)})
    config, params = load_meta(folder)
    assert config.vocab_size == 128 and config.max_position_embeddings == 2048
    _assert_logits_match(model, config, params)


@pytest.mark.parametrize("embedding_split", [0, 1])
def test_tied_embeddings_are_detected_and_written(tmp_path, embedding_split):
    model = make_hf_model("llama32_tied", head_dim=16, rope_scaling=dict(META_SCALING, factor=32.0))
    config, params = load_hf(_save(model, tmp_path / "hf"))
    save_meta(config, params, tmp_path / "meta", num_shards=2, embedding_split=embedding_split)
    shards = [torch.load(tmp_path / "meta" / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    output = torch.cat([s["output.weight"] for s in shards], dim=0)
    assert torch.equal(output, torch.cat([s["tok_embeddings.weight"] for s in shards], dim=embedding_split))
    reader = MetaReader(tmp_path / "meta")
    assert reader._output_is_embedding(block_rows=24)  # blocks that straddle the two shards
    untied = write_meta_checkpoint(make_hf_model("llama3_gqa"), tmp_path / "untied", 2, embedding_split)
    assert not MetaReader(untied)._output_is_embedding(block_rows=24)
    assert json.loads((tmp_path / "meta" / "params.json").read_text())["rope_scaling_factor"] == 32.0
    loaded_config, loaded = load_meta(tmp_path / "meta")
    assert loaded_config.tie_word_embeddings and "lm_head" not in loaded
    assert loaded_config.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    _assert_logits_match(model, loaded_config, loaded)


def _save(model, folder):
    model.save_pretrained(folder)
    return folder


def _assert_trees_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_trees_equal(a[key], b[key])
        else:
            assert a[key].dtype == b[key].dtype and np.array_equal(
                np.ascontiguousarray(a[key]).view(np.uint8), np.ascontiguousarray(b[key]).view(np.uint8)), key


@pytest.mark.parametrize("num_shards,param_dtype,scan", [(1, "float32", True), (2, "bfloat16", False),
                                                         (4, "float32", True)])
def test_llamax_to_meta_to_llamax_is_bit_exact(tmp_path, num_shards, param_dtype, scan):
    model = make_hf_model("llama3_gqa", num_attention_heads=4, num_key_value_heads=4)
    config, params = load_hf(_save(model, tmp_path / "hf"), param_dtype=param_dtype, scan_layers=scan)
    save_meta(config, params, tmp_path / "meta", num_shards=num_shards)
    params_json = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params_json["rope_theta"] == 500000.0 and "use_scaled_rope" not in params_json
    loaded_config, loaded = load_meta(tmp_path / "meta", param_dtype=param_dtype, scan_layers=scan,
                                      max_position_embeddings=config.max_position_embeddings)
    assert loaded_config == config
    _assert_trees_equal(params, loaded)


def test_bf16_shards_load_in_plain_torch(tmp_path):
    model = make_hf_model("llama2_mha")
    config, params = load_hf(_save(model, tmp_path / "hf"))
    save_meta(config, params, tmp_path / "meta", num_shards=2, dtype="bf16")
    shard = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)  # no mmap
    assert shard["layers.1.attention.wo.weight"].dtype == torch.bfloat16
    wo = model.state_dict()["model.layers.1.self_attn.o_proj.weight"].to(torch.bfloat16)
    assert torch.equal(shard["layers.1.attention.wo.weight"], wo.chunk(2, dim=1)[1])
    assert torch.equal(shard["tok_embeddings.weight"],
                       model.state_dict()["model.embed_tokens.weight"].to(torch.bfloat16).chunk(2, dim=1)[1])


@pytest.mark.parametrize("preset", ["llama1_13b", "llama2_7b", "llama2_70b", "llama3_8b", "llama3_70b",
                                    "llama3.1_405b", "llama3.2_1b", "llama3.2_3b", "tiny", "bench"])
def test_ffn_params_reproduce_intermediate_size(preset):
    config = get_preset(preset)
    multiple_of, multiplier = ffn_params_for(config.hidden_size, config.intermediate_size)
    assert meta_intermediate_size(config.hidden_size, multiple_of, multiplier) == config.intermediate_size


def test_meta_release_params_give_released_widths():
    assert meta_intermediate_size(4096, 1024, 1.3) == 14336  # Llama 3 8B params.json
    assert meta_intermediate_size(8192, 4096, 1.3) == 28672  # Llama 2 / 3 70B
    assert meta_intermediate_size(2048, 256, 1.5) == 8192  # Llama 3.2 1B
    assert meta_intermediate_size(4096, 256, None) == 11008  # Llama 1 / 2 7B


# ---- bad input ------------------------------------------------------------------------------

@pytest.fixture
def meta_folder(tmp_path):
    return write_meta_checkpoint(make_hf_model("llama2_mha"), tmp_path / "meta", 2, 1)


def test_missing_params_json(meta_folder, tmp_path):
    os.remove(meta_folder / "params.json")
    with pytest.raises(CheckpointError, match="params.json not found"):
        load_meta(meta_folder)
    _save(make_hf_model("llama2_mha"), tmp_path / "hf")
    with pytest.raises(CheckpointError, match="--src_format hf"):
        load_meta(tmp_path / "hf")


def test_n_heads_not_dividing_dim(meta_folder):
    params = json.loads((meta_folder / "params.json").read_text())
    params["n_heads"] = 6
    (meta_folder / "params.json").write_text(json.dumps(params))
    with pytest.raises((ConfigError, CheckpointError), match="n_heads=6 does not divide dim=64|rows of wq"):
        load_meta(meta_folder)


def test_gap_in_shard_numbering(meta_folder):
    os.rename(meta_folder / "consolidated.01.pth", meta_folder / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match=r"lacks \['consolidated.01.pth'\]"):
        load_meta(meta_folder)


def test_fewer_shards_than_the_tensors_need(meta_folder):
    os.remove(meta_folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="expected 2 consolidated.NN.pth files"):
        load_meta(meta_folder)


def test_inconsistent_shard_shapes(meta_folder):
    shard = torch.load(meta_folder / "consolidated.01.pth", weights_only=True)
    shard["layers.0.feed_forward.w1.weight"] = shard["layers.0.feed_forward.w1.weight"][:-8].clone()
    torch.save(shard, meta_folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="inconsistent shard shapes"):
        load_meta(meta_folder)


def test_params_json_ffn_width_must_match_weights(meta_folder):
    params = json.loads((meta_folder / "params.json").read_text())
    params["ffn_dim_multiplier"] = 1.3
    (meta_folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="FFN width"):
        load_meta(meta_folder)


def test_save_meta_refuses_existing_and_unrepresentable(tmp_path):
    config, params = load_hf(_save(make_hf_model("llama32_tied"), tmp_path / "hf"))  # head_dim 32 != 64/4
    with pytest.raises(ConfigError, match="head_dim"):
        save_meta(config, params, tmp_path / "meta")
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no partial output, no temp folder
    config, params = load_hf(_save(make_hf_model("llama2_mha"), tmp_path / "hf2"))
    with pytest.raises(ConfigError, match="num_shards=3 must divide num_heads"):
        save_meta(config, params, tmp_path / "meta", num_shards=3)
    save_meta(config, params, tmp_path / "meta")
    with pytest.raises(CheckpointError, match="already exists"):
        save_meta(config, params, tmp_path / "meta")
    save_meta(config, params, tmp_path / "meta", num_shards=2, overwrite=True)
    assert sorted(os.listdir(tmp_path / "meta")) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    assert sorted(os.listdir(tmp_path)) == ["hf", "hf2", "meta"]


def test_bf16_meta_loads_into_bf16_params(tmp_path):
    model = make_hf_model("llama2_mha").to(torch.bfloat16)
    folder = write_meta_checkpoint(model, tmp_path / "meta", 2, 1)
    config, params = load_meta(folder, param_dtype="bfloat16")
    embed = params["embed_tokens"]["embedding"]
    assert embed.dtype == ml_dtypes.bfloat16
    want = model.state_dict()["model.embed_tokens.weight"].view(torch.int16).numpy()
    assert np.array_equal(embed.view(np.int16), want)
