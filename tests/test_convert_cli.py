"""The conversion hub and `python -m experiments.convert`: every direction, bit-exact, atomic."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from transformers import LlamaForCausalLM

from hf_models import hf_logits, make_hf_model
from llamax.train.checkpoint import Checkpointer
from llamax.convert import load_hf
from llamax.convert.hub import convert
from llamax.errors import CheckpointError, ConfigError
from llamax.convert.orbax import load_params
from llamax.run_dir import write_model_config
from llamax.convert.weight_files import WeightFolder

ROOT = Path(__file__).resolve().parents[1]


def _tensors(folder):
    weights = WeightFolder(folder)
    return {name: np.asarray(weights[name]) for name in weights}


def _assert_same_tensors(a, b):
    a, b = _tensors(a), _tensors(b)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)), name


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.convert", "--no_progress", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "hf"
    make_hf_model("llama3_gqa").save_pretrained(folder)
    return folder


def test_cli_hf_to_meta_to_orbax_to_hf_is_bit_exact(tmp_path, hf_folder):
    steps = [(hf_folder, "hf", tmp_path / "meta", "meta", ["--num_shards", "2"]),
             (tmp_path / "meta", "meta", tmp_path / "orbax", "orbax", []),
             (tmp_path / "orbax", "orbax", tmp_path / "hf", "hf", [])]
    for src, src_format, dst, dst_format, extra in steps:
        result = _cli("--src", str(src), "--src_format", src_format, "--dst", str(dst), "--dst_format", dst_format,
                      *extra)
        assert result.returncode == 0, result.stderr
    # Meta's format has no slot for bos/eos/pad: a generation_config.json beside params.json keeps them.
    assert sorted(os.listdir(tmp_path / "meta")) == ["consolidated.00.pth", "consolidated.01.pth",
                                                     "generation_config.json", "params.json"]
    _assert_same_tensors(hf_folder, tmp_path / "hf")
    tokens = np.random.RandomState(0).randint(0, 128, (1, 12))
    np.testing.assert_array_equal(hf_logits(LlamaForCausalLM.from_pretrained(tmp_path / "hf"), tokens),
                                  hf_logits(LlamaForCausalLM.from_pretrained(hf_folder), tokens))


@pytest.mark.parametrize("variant", ["llama2_mha", "llama32_tied"])
def test_hf_to_orbax_to_hf_is_bit_exact_and_loads_as_params(tmp_path, variant):
    make_hf_model(variant).save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", "hf", tmp_path / "orbax", "orbax", progress=False)
    config, params = load_params(tmp_path / "orbax")
    expected_config, expected = load_hf(tmp_path / "src")
    assert config == expected_config
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree_util.tree_leaves_with_path(expected)):
        assert np.array_equal(x, y), path
    convert(tmp_path / "orbax", "orbax", tmp_path / "back", "hf", progress=False)
    _assert_same_tensors(tmp_path / "src", tmp_path / "back")


def test_dtype_and_sharded_hf_output(tmp_path, hf_folder):
    convert(hf_folder, "hf", tmp_path / "orbax", "orbax", dtype="bf16", progress=False)
    config, params = load_params(tmp_path / "orbax")
    assert config.param_dtype == "bfloat16" and params["norm"]["weight"].dtype.name == "bfloat16"
    convert(tmp_path / "orbax", "orbax", tmp_path / "hf", "hf", dtype="fp32", max_shard_size=50_000,
            progress=False)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    source, back = _tensors(hf_folder), _tensors(tmp_path / "hf")
    for name in source:  # fp32 -> bf16 -> fp32 equals rounding once
        rounded = source[name].astype(params["norm"]["weight"].dtype).astype(np.float32)
        assert back[name].dtype == np.float32 and np.array_equal(back[name], rounded), name


def test_training_run_to_hf(tmp_path, hf_folder):
    config, params = load_hf(hf_folder)
    with Checkpointer(tmp_path / "run" / "checkpoints", async_save=False) as checkpointer:
        for step in (1, 2):
            state = {"step": np.int32(step), "params": jax.tree.map(lambda x: x * step, params)}
            checkpointer.save(step, jax.tree.map(jax.numpy.asarray, state), {})
    write_model_config(tmp_path / "run", config)
    result = _cli("--src", str(tmp_path / "run"), "--src_format", "orbax", "--dst", str(tmp_path / "hf"),
                  "--dst_format", "hf", "--step", "1")
    assert result.returncode == 0, result.stderr
    _assert_same_tensors(hf_folder, tmp_path / "hf")
    convert(tmp_path / "run", "orbax", tmp_path / "latest", "hf", progress=False)  # newest step: x2
    np.testing.assert_array_equal(_tensors(tmp_path / "latest")["model.norm.weight"],
                                  2 * _tensors(hf_folder)["model.norm.weight"])


def test_cli_refuses_existing_destination_unless_overwrite(tmp_path, hf_folder):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    args = ["--src", str(hf_folder), "--src_format", "hf", "--dst", str(tmp_path / "dst"), "--dst_format", "meta"]
    result = _cli(*args)
    assert result.returncode == 1 and "already exists" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"
    assert _cli(*args, "--overwrite").returncode == 0
    assert sorted(os.listdir(tmp_path / "dst")) == ["consolidated.00.pth", "generation_config.json", "params.json"]


@pytest.mark.parametrize("given,actual", [("meta", "hf"), ("orbax", "hf"), ("hf", "meta")])
def test_cli_wrong_source_format_is_one_clear_line(tmp_path, hf_folder, given, actual):
    src = hf_folder
    if actual == "meta":
        convert(hf_folder, "hf", tmp_path / "meta", "meta", progress=False)
        src = tmp_path / "meta"
    result = _cli("--src", str(src), "--src_format", given, "--dst", str(tmp_path / "out"), "--dst_format", "hf")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and f"--src_format {actual}" in result.stderr
    assert not (tmp_path / "out").exists()


def test_failure_mid_conversion_leaves_nothing(tmp_path, hf_folder, monkeypatch):
    from llamax.convert import hub as convert_hub

    calls = []

    def failing_write(self, name, array):
        calls.append(name)
        if len(calls) == 5:
            raise CheckpointError("disk full (simulated)")

    monkeypatch.setattr(convert_hub.HFWriter, "write", failing_write)
    with pytest.raises(CheckpointError, match="simulated"):
        convert(hf_folder, "hf", tmp_path / "out", "hf", progress=False)
    assert os.listdir(tmp_path) == []


def test_bad_arguments(tmp_path, hf_folder):
    with pytest.raises(ConfigError, match="only applies to Meta"):
        convert(hf_folder, "hf", tmp_path / "o", "orbax", num_shards=2)
    with pytest.raises(ConfigError, match="same folder"):
        convert(hf_folder, "hf", hf_folder, "hf", overwrite=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(tmp_path / "nowhere", "hf", tmp_path / "o", "hf")
    assert _cli("--src", "x", "--src_format", "safetensors", "--dst", "y", "--dst_format", "hf").returncode == 2
