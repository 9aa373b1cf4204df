"""HF checkpoint folders <-> llamax params: files written by transformers itself, both ways."""
import json
import re
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

import jax.numpy as jnp
from hf_models import hf_logits, make_hf_model
from llamax.convert import load_hf, save_hf
from llamax.errors import CheckpointError, ConfigError
from llamax.model import Llama
from llamax.convert.weight_files import SafetensorsFile, WeightFolder


def _tensors(folder):
    weights = WeightFolder(folder)
    return {name: np.asarray(weights[name]) for name in weights}


@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "gqa"
    make_hf_model("llama3_gqa").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("variant", ["llama2_mha", "llama31_scaled", "llama32_tied"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_hf_to_llamax_to_hf_is_bit_exact(tmp_path, variant, scan_layers):
    make_hf_model(variant).save_pretrained(tmp_path / "src")
    config, params = load_hf(tmp_path / "src", scan_layers=scan_layers)
    save_hf(config, params, tmp_path / "dst")
    src, dst = _tensors(tmp_path / "src"), _tensors(tmp_path / "dst")
    assert sorted(src) == sorted(dst)
    for name in src:
        assert src[name].dtype == dst[name].dtype and np.array_equal(src[name], dst[name]), name


def test_saved_folder_loads_in_transformers_with_identical_logits(tmp_path, gqa_folder):
    config, params = load_hf(gqa_folder, scan_layers=False)
    save_hf(config, params, tmp_path / "out")
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 20))
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    np.testing.assert_array_equal(hf_logits(reloaded, tokens),
                                  hf_logits(LlamaForCausalLM.from_pretrained(gqa_folder), tokens))


def test_bfloat16_checkpoint_round_trips_bit_exact(tmp_path):
    model = make_hf_model("llama3_gqa").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    config, params = load_hf(tmp_path / "src", param_dtype="bfloat16")
    assert params["norm"]["weight"].dtype == ml_dtypes.bfloat16
    save_hf(config, params, tmp_path / "dst")
    src, dst = _tensors(tmp_path / "src"), _tensors(tmp_path / "dst")
    for name in src:
        assert dst[name].dtype == ml_dtypes.bfloat16 and np.array_equal(
            src[name].view(np.int16), dst[name].view(np.int16)), name
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_safetensors_both_ways(tmp_path, gqa_folder):
    model = LlamaForCausalLM.from_pretrained(gqa_folder)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    config, params = load_hf(tmp_path / "sharded")
    save_hf(config, params, tmp_path / "ours", max_shard_size=100_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (1, 16))
    np.testing.assert_array_equal(hf_logits(LlamaForCausalLM.from_pretrained(tmp_path / "ours"), tokens),
                                  hf_logits(model, tokens))


def test_pytorch_bin_checkpoint_loads(tmp_path, gqa_folder):
    model = LlamaForCausalLM.from_pretrained(gqa_folder)
    (tmp_path / "bin").mkdir()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    shutil.copy(gqa_folder / "config.json", tmp_path / "bin")
    config, params = load_hf(tmp_path / "bin")
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (1, 16))
    ours = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(tokens)))
    assert np.abs(ours - hf_logits(model, tokens)).max() < 1e-4


def test_our_safetensors_reader_agrees_with_the_reference_library(gqa_folder):
    from safetensors.numpy import load_file

    reference = load_file(gqa_folder / "model.safetensors")
    ours = SafetensorsFile(gqa_folder / "model.safetensors")
    assert sorted(ours.keys()) == sorted(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(ours.get(name), value)


# ---- bad input: one clear error naming the tensor or field, nothing half-written ----------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(folder, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path, gqa_folder):
    folder = _copy(gqa_folder, tmp_path / "f")
    _rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing .*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(folder)


def test_unexpected_tensor_is_named(tmp_path, gqa_folder):
    folder = _copy(gqa_folder, tmp_path / "f")
    _rewrite_weights(folder, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(4, np.float32)}))
    with pytest.raises(CheckpointError, match="q_norm"):
        load_hf(folder)


def test_shape_mismatch_against_config_names_tensor_and_shapes(tmp_path, gqa_folder):
    folder = _copy(gqa_folder, tmp_path / "f")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight.*\(160, 64\).*\(128, 64\)"):
        load_hf(folder)


def test_unsupported_model_type_and_rope_type(tmp_path, gqa_folder):
    for key, value, message in [("model_type", "gemma", "model_type"),
                                ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1.0, "factor": 2.0},
                                 "rope_type")]:
        folder = _copy(gqa_folder, tmp_path / key)
        config = json.loads((folder / "config.json").read_text())
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=message):
            load_hf(folder)


def test_folder_without_weights_or_config(tmp_path, gqa_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(tmp_path / "empty")
    shutil.copy(gqa_folder / "config.json", tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no weights found"):
        load_hf(tmp_path / "empty")


def test_truncated_safetensors_is_reported(tmp_path, gqa_folder):
    folder = _copy(gqa_folder, tmp_path / "f")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as caught:
        load_hf(folder)
    # The message tells the bytes the tensor needs apart from the bytes the file still holds.
    needed = re.search(r"needs bytes (\d+)\.\.(\d+) of the data section, but the file holds only "
                       r"(\d+) bytes", str(caught.value))
    header_size = int.from_bytes(data[:8], "little")
    held = len(data) // 2 - 8 - header_size
    assert needed and int(needed.group(3)) == held and int(needed.group(2)) > held


def test_index_cannot_point_outside_the_folder(tmp_path, gqa_folder):
    folder = _copy(gqa_folder, tmp_path / "f")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "../../etc/passwd"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="escape|not a plain file name"):
        load_hf(folder)


def test_save_refuses_existing_folder_and_leaves_nothing_on_failure(tmp_path, gqa_folder):
    config, params = load_hf(gqa_folder)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="overwrite"):
        save_hf(config, params, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"

    broken = dict(params, norm={"weight": np.ones(3, np.float32)})
    with pytest.raises(CheckpointError, match="norm/weight"):
        save_hf(config, broken, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_save_cleans_its_staging_folder_when_writing_fails(tmp_path, gqa_folder, monkeypatch):
    from llamax.convert.hf import HFWriter

    config, params = load_hf(gqa_folder)

    def disk_full(self, name, tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(HFWriter, "write", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_hf(config, params, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
