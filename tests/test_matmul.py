"""llamax.model.matmul: projections as 2-D matmuls equal the einsums they replace."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llamax.model.matmul import (OUT_IN_MAX_ROWS, _pass_through_form, builds_for_cpu, flat_matmuls, out_in_shape,
                                 project, project_out_in)


@pytest.mark.parametrize("equation, x_shape, kernel_shape", [
    ("BTE,EM->BTM", (2, 5, 8), (8, 12)),          # MLP up/gate
    ("BTM,ME->BTE", (2, 5, 12), (12, 8)),         # MLP down
    ("BTE,EHD->BTHD", (2, 5, 8), (8, 4, 3)),      # q/k/v
    ("BTHD,HDE->BTE", (2, 5, 4, 3), (4, 3, 8)),   # o
    ("BTHD,HDR->BTR", (2, 5, 4, 3), (4, 3, 2)),   # LoRA down of o
    ("BTR,RHD->BTHD", (2, 5, 2), (2, 4, 3)),      # LoRA up of q
])
def test_flat_matmul_equals_the_einsum_value_and_gradient(equation, x_shape, kernel_shape):
    kx, kk = jax.random.split(jax.random.key(0))
    x, kernel = jax.random.normal(kx, x_shape), jax.random.normal(kk, kernel_shape)
    assert _pass_through_form(equation) is not None

    def loss(flat, x, kernel):
        with flat_matmuls(flat):
            return jnp.sum(jnp.sin(project(equation, x, kernel)))

    for value_flat, value_einsum in zip(jax.value_and_grad(loss, argnums=(1, 2))(True, x, kernel),
                                        jax.value_and_grad(loss, argnums=(1, 2))(False, x, kernel)):
        for a, b in zip(jax.tree.leaves(value_flat), jax.tree.leaves(value_einsum)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation, x_shape, kernel_shape", [
    ("BTE,EM->BTM", (2, 5, 8), (8, 12)),
    ("BTE,EHD->BTHD", (2, 5, 8), (8, 4, 3)),
    ("BTHD,HDE->BTE", (2, 5, 4, 3), (4, 3, 8)),
])
@pytest.mark.parametrize("batch", [2, 20])  # 10 rows: the weight-major form; 100: the other
def test_out_in_kernels_give_the_einsum(equation, x_shape, kernel_shape, batch):
    kx, kk = jax.random.split(jax.random.key(1))
    x, kernel = jax.random.normal(kx, (batch, *x_shape[1:])), jax.random.normal(kk, kernel_shape)
    n_in = len(x_shape) - 2  # the contracted axes: x's after (batch, seq)
    matrix = kernel.reshape(int(np.prod(kernel_shape[:n_in])), -1).T  # [outputs, inputs]
    assert matrix.shape == out_in_shape(equation, kernel_shape)
    assert (batch * x_shape[1] <= OUT_IN_MAX_ROWS) == (batch == 2)
    np.testing.assert_allclose(jax.jit(project_out_in, static_argnums=(0, 3))(equation, x, matrix, kernel_shape),
                               jnp.einsum(equation, x, kernel), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation", ["BTE,VE->BTV", "BTE,EM->BMT", "BTE,EE->BTE", "ab,bc->ca", "x"])
def test_other_equations_stay_einsums(equation):
    assert _pass_through_form(equation) is None


def test_the_setting_defaults_to_the_backend_and_nests():
    assert builds_for_cpu() == (jax.default_backend() == "cpu")
    with flat_matmuls(False):
        assert not builds_for_cpu()
        with flat_matmuls(True):
            assert builds_for_cpu()
        assert not builds_for_cpu()
