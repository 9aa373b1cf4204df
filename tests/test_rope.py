"""`llamax.model.rope.rotary_cos_sin`: the tables equal cos and sin of the angles in both program
forms, and a CPU train step computes them once, not once per layer and head (XLA:CPU would fuse
them into every rotation)."""
import jax
import jax.numpy as jnp
import numpy as np

from llamax.config import get_preset
from llamax.model.matmul import flat_matmuls
from llamax.model.rope import inverse_frequencies, rotary_cos_sin
from llamax.sharding import MeshConfig, make_mesh
from llamax.train import init_train_state, make_train_step
from llamax.train.optim import OptimConfig


def test_tables_equal_cos_and_sin_in_both_forms():
    positions = jnp.asarray([[0, 1, 2, 700], [5, 0, 1, 2]], jnp.int32)
    inv_freq = inverse_frequencies(16, 10000.0, None)
    angles = np.asarray(positions, np.float32)[..., None] * inv_freq
    angles = np.concatenate([angles, angles], axis=-1)
    for cpu_form in (True, False):
        with flat_matmuls(cpu_form):
            cos, sin = jax.jit(lambda p: rotary_cos_sin(p, inv_freq))(positions)
        np.testing.assert_allclose(cos, np.cos(angles), atol=1e-6)
        np.testing.assert_allclose(sin, np.sin(angles), atol=1e-6)


def test_cpu_train_step_computes_the_tables_once():
    config = get_preset("tiny", num_layers=3)
    optim = OptimConfig(warmup_steps=0, decay="constant")
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    state = init_train_state(config, optim, mesh)
    batch = {"tokens": jnp.zeros((2, 32), jnp.int32), "targets": jnp.zeros((2, 32), jnp.int32),
             "loss_mask": jnp.ones((2, 32), jnp.float32)}
    text = make_train_step(config, optim, mesh).jitted.lower(state, batch).compile().as_text()
    assert text.count(" cosine(") == 1 and text.count(" sine(") == 1
