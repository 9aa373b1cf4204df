"""Compiles the tiny model's train and eval steps on a mesh gin file with N fake CPU devices;
XLA's warnings go to stderr (the caller looks for involuntary rematerialization).

    XLA_FLAGS=--xla_force_host_platform_device_count=N python tests/scripts/compile_on_mesh.py MESH.gin
"""
import sys

import jax
import numpy as np

from experiments import gin_config
from llamax.config import get_preset
from llamax.sharding import MeshConfig, make_mesh
from llamax.train.optim import OptimConfig
from llamax.train.setup import make_train_setup

gin_config.parse([sys.argv[1]], [], required=())
import gin  # noqa: E402

mesh_config = gin.get_configurable(MeshConfig)()
mesh = make_mesh(mesh_config)
# 8 query and 4 kv heads: every shipped tensor size (up to 4) splits whole heads.
setup = make_train_setup(get_preset("tiny", num_heads=8, num_kv_heads=4), OptimConfig(), mesh)
batch_size = 2 * mesh.shape["data"] * mesh.shape["fsdp"]
batch = {key: jax.ShapeDtypeStruct((batch_size, 64), np.float32 if key == "loss_mask" else np.int32,
                                   sharding=setup.batch_sharding)
         for key in ("tokens", "targets", "loss_mask", "positions", "segment_ids")}
setup.train_step.jitted.lower(setup.abstract_state, batch).compile()
setup.eval_step.jitted.lower(setup.abstract_state.params, batch).compile()
print(f"compiled on {dict(mesh.shape)}")
