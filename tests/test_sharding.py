"""Mesh construction, the rules table, and param shardings (golden specs for FSDP+TP)."""
import logging
import os
import re
import subprocess
import sys
from pathlib import Path


import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llamax.config import get_preset
from llamax.errors import ConfigError
from llamax.model import param_logical_axes
from llamax.sharding import (LOGICAL_AXIS_RULES, MESH_PRESETS, MeshConfig, batch_sharding,
                             check_batch_size, data_parallel_size, get_mesh_preset, make_mesh,
                             param_partition_specs, param_shardings, to_global_batch)

TINY = get_preset("tiny")


@pytest.mark.parametrize("preset, shape", [
    ("dp", {"data": 8, "fsdp": 1, "tensor": 1}),
    ("fsdp", {"data": 1, "fsdp": 8, "tensor": 1}),
    ("fsdp_tp", {"data": 1, "fsdp": 4, "tensor": 2}),
])
def test_mesh_presets_fill_the_devices(preset, shape):
    mesh = make_mesh(MESH_PRESETS[preset])
    assert dict(mesh.shape) == shape
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_on_a_subset_of_devices():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1), devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1}


def test_get_mesh_preset_overrides_and_rejects_unknown_names():
    assert get_mesh_preset("fsdp_tp", tensor=4).tensor == 4
    with pytest.raises(ConfigError, match="unknown mesh preset"):
        get_mesh_preset("zero3")


@pytest.mark.parametrize("mesh_config, match", [
    (MeshConfig(data=3, fsdp=-1), "do not divide"),
    (MeshConfig(data=2, fsdp=2, tensor=1), "hold 4 devices but there are 8"),
    (MeshConfig(fsdp=-1, dcn_data=3), "cannot form 3 slices"),
    (MeshConfig(fsdp=-1, dcn_data=2), "asks for 2 slices"),  # one process on CPU: one slice
])
def test_mesh_not_matching_the_devices_raises(mesh_config, match):
    with pytest.raises(ConfigError, match=match):
        make_mesh(mesh_config)


@pytest.mark.parametrize("fields", [dict(data=-1, fsdp=-1), dict(tensor=0), dict(dcn_fsdp=-1)])
def test_bad_mesh_config_raises(fields):
    with pytest.raises(ConfigError):
        MeshConfig(**fields)


def test_multislice_resolve_splits_ici_and_dcn():
    ici, dcn = MeshConfig(fsdp=-1, tensor=2, dcn_data=2).resolve(16)
    assert ici == (1, 4, 2) and dcn == (2, 1, 1)


def test_rules_cover_every_logical_name_the_model_uses():
    names = {name for name, _ in LOGICAL_AXIS_RULES}
    specs = jax.tree.leaves(param_logical_axes(TINY), is_leaf=lambda x: isinstance(x, P))
    param_names = {name for spec in specs for name in spec}
    activation_names = {"batch", "length", "act_embed", "act_heads", "act_kv_heads", "head_dim",
                        "act_mlp", "act_vocab"}
    assert param_names | activation_names <= names


def test_golden_param_specs_fsdp_tp_tiny():
    specs = param_partition_specs(TINY, make_mesh(MESH_PRESETS["fsdp_tp"]))
    assert specs == {
        "embed_tokens": {"embedding": P("tensor", "fsdp")},
        "layers": {
            "input_layernorm": {"weight": P(None, None)},
            "post_attention_layernorm": {"weight": P(None, None)},
            "self_attn": {
                "q_proj": {"kernel": P(None, "fsdp", "tensor", None)},
                "k_proj": {"kernel": P(None, "fsdp", "tensor", None)},
                "v_proj": {"kernel": P(None, "fsdp", "tensor", None)},
                "o_proj": {"kernel": P(None, "tensor", None, "fsdp")},
            },
            "mlp": {
                "gate_proj": {"kernel": P(None, "fsdp", "tensor")},
                "up_proj": {"kernel": P(None, "fsdp", "tensor")},
                "down_proj": {"kernel": P(None, "tensor", "fsdp")},
            },
        },
        "norm": {"weight": P(None)},
        "lm_head": {"kernel": P("fsdp", "tensor")},
    }


def test_dp_preset_replicates_every_param():
    specs = param_partition_specs(TINY, make_mesh(MESH_PRESETS["dp"]))
    shardings = param_shardings(TINY, make_mesh(MESH_PRESETS["dp"]))
    assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")  # size-1 axes: named but unsplit


def test_non_divisible_dim_falls_back_to_replicated(caplog):
    config = get_preset("tiny", hidden_size=36, head_dim=16)  # 36 is not a multiple of fsdp=8
    with caplog.at_level(logging.WARNING, logger="llamax.sharding"):
        specs = param_partition_specs(config, make_mesh(MESH_PRESETS["fsdp"]))
    assert specs["lm_head"]["kernel"] == P(None, "tensor")
    assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "tensor", None)
    assert "['lm_head']['kernel']: dim embed=36 is not divisible" in caplog.text


@pytest.mark.parametrize("tensor, name", [(8, "num_heads=4"), (4, "num_kv_heads=2")])
def test_heads_not_divisible_by_tensor_raises(tensor, name):
    mesh = make_mesh(MeshConfig(fsdp=-1, tensor=tensor))
    with pytest.raises(ConfigError, match=rf"{name} is not divisible by the tensor-parallel size "
                                          rf"{tensor}.*one of \[1, 2\]"):
        param_shardings(TINY, mesh)


def test_batch_checks_and_sharding():
    mesh = make_mesh(MESH_PRESETS["fsdp_tp"])
    assert data_parallel_size(mesh) == 4
    assert batch_sharding(mesh).spec == P(("data", "fsdp"), None)
    check_batch_size(8, mesh)
    batch = to_global_batch({"tokens": np.arange(32, dtype=np.int32).reshape(8, 4)}, batch_sharding(mesh))
    assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(batch["tokens"], np.arange(32).reshape(8, 4))
    with pytest.raises(ConfigError, match="batch size 6 is not divisible by the data-parallel size 4"):
        check_batch_size(6, mesh)
    # Every host batch reaches the devices here (training, eval CLI, scoring): one ConfigError,
    # not JAX's IndivisibleError from inside device_put.
    with pytest.raises(ConfigError, match="a batch of 6 rows does not split over the 4 data-parallel devices"):
        to_global_batch({"tokens": np.zeros((6, 4), np.int32)}, batch_sharding(mesh))


MESH_FILES = sorted((Path(__file__).resolve().parents[1] / "configs" / "meshes").glob("*.gin"))


def _fake_devices(mesh_file: Path) -> int:
    return int(re.search(r"# devices: (\d+)", mesh_file.read_text()).group(1))


@pytest.mark.slow
@pytest.mark.parametrize("mesh_file", [m for m in MESH_FILES if _fake_devices(m) <= 64
                                       and "dcn_" not in m.read_text()], ids=lambda m: m.stem)
def test_shipped_meshes_compile_without_involuntary_rematerialization(mesh_file):
    """XLA replicates a whole tensor when it cannot reshard it ("Involuntary full
    rematerialization", a warning, not an error): that silently costs memory and bandwidth, so a
    shipped mesh must not trigger it (it did for the embedding lookup on cpu8)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={_fake_devices(mesh_file)}",
           "TF_CPP_MIN_LOG_LEVEL": "0", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, str(root / "tests" / "scripts" / "compile_on_mesh.py"),
                             str(mesh_file)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled on" in result.stdout
    assert "Involuntary full rematerialization" not in result.stderr, result.stderr[-3000:]
