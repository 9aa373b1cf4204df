"""Params-only orbax checkpoints: save/load, sharded restore, training-run input, streaming."""
import json

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hf_models import make_hf_model
from llamax.train.checkpoint import Checkpointer
from llamax.config import ModelConfig, RopeScaling, get_preset
from llamax.convert import load_hf
from llamax.errors import CheckpointError, ConfigError
from llamax.convert.orbax import LeafReader, load_params, save_params
from llamax.run_dir import write_model_config


def _assert_trees_equal(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x.view(np.uint8), y.view(np.uint8)), path


@pytest.fixture(scope="module")
def hf_params(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "gqa"
    make_hf_model("llama31_scaled").save_pretrained(folder)
    return load_hf(folder)


def test_config_json_round_trip():
    config = get_preset("llama3.2_1b", param_dtype="bfloat16", scan_layers=False)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["rope_scaling"]["factor"] == 32.0
    assert ModelConfig.from_dict(data) == config
    assert ModelConfig.from_dict(data).rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({**data, "n_layers": 3})


def test_save_and_load_params_bit_exact(tmp_path, hf_params):
    config, params = hf_params
    save_params(tmp_path / "ckpt", config, params)
    loaded_config, loaded = load_params(tmp_path / "ckpt")
    assert loaded_config == config
    _assert_trees_equal(params, loaded)
    with pytest.raises(CheckpointError, match="already exists"):
        save_params(tmp_path / "ckpt", config, params)


def test_load_params_restores_directly_sharded_and_casts(tmp_path, hf_params):
    config, params = hf_params
    bf16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params)
    save_params(tmp_path / "ckpt", config, bf16)
    mesh = Mesh(np.array(jax.devices()[:4]), ("fsdp",))
    sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32, sharding=sharding)
                            if x.shape[0] % 4 == 0 else jax.ShapeDtypeStruct(x.shape, np.float32), params)
    _, restored = load_params(tmp_path / "ckpt", abstract)
    embed = restored["embed_tokens"]["embedding"]
    assert isinstance(embed, jax.Array) and embed.sharding == sharding and embed.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(embed), bf16["embed_tokens"]["embedding"].astype(np.float32))
    wrong = dict(abstract, extra={"kernel": jax.ShapeDtypeStruct((2,), np.float32)})
    with pytest.raises(CheckpointError, match="requested but not saved"):
        load_params(tmp_path / "ckpt", wrong)


def test_training_run_checkpoint_is_read(tmp_path, hf_params):
    config, params = hf_params
    run = tmp_path / "run"
    state = {"step": np.int32(7), "params": params, "opt_state": {"mu": params}}
    with Checkpointer(run / "checkpoints", async_save=False) as checkpointer:
        checkpointer.save(7, jax.tree.map(jax.numpy.asarray, state), {"data": {}})
    write_model_config(run, config)
    for path in (run, run / "checkpoints", run / "checkpoints" / "7"):
        loaded_config, loaded = load_params(path)
        assert loaded_config == config
        _assert_trees_equal(params, loaded)
    reader = LeafReader(run)
    assert reader.location.step == 7
    np.testing.assert_array_equal(reader.read(("norm", "weight")), params["norm"]["weight"])
    with pytest.raises(CheckpointError, match="available steps"):
        load_params(run, step=3)


def test_folder_that_is_not_orbax_is_refused(tmp_path):
    make_hf_model("llama2_mha").save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="--src_format hf"):
        load_params(tmp_path / "hf")
