"""`llamax.model.decode_kernels`: the CPU decode kernels equal float64 numpy (products, for every row
count and odd shapes) and XLA's decode attention (masked and unfilled slots, groups), decoding
with them gives the tokens and logits of XLA's ops, and a build that fails costs one warning line
and nothing else."""
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_marks import needs_kernel
from llamax.config import get_preset
from llamax.infer import generate as generation
from llamax.model import decode_kernels, init_params
from llamax.model.attention import attend_step
from llamax.model.matmul import flat_matmuls
from llamax.model.quantize import quantize_weights


@needs_kernel
def test_the_kernels_build_here():
    assert decode_kernels.available(), "a Linux x86-64 machine with a C++ compiler builds the kernels"


@needs_kernel
@pytest.mark.parametrize("rows, inputs, outputs", [
    (1, 512, 1408), (8, 512, 1408), (3, 1408, 512),  # bench shapes: several threads
    (2, 64, 8192), (5, 6, 100), (7, 130, 129), (4, 17, 16), (6, 3, 5),  # tiles, tails, < 16 columns
    (12, 33, 200), (17, 40, 48),  # more rows than one pass takes
    (4, 0, 5)])  # an empty sum
def test_equals_numpy(rows, inputs, outputs):
    assert decode_kernels.available()
    rng = np.random.RandomState(rows * 1000 + inputs)
    x = rng.randn(rows, inputs).astype(np.float32)
    w = rng.randn(inputs, outputs).astype(np.float32)
    got = np.asarray(jax.jit(decode_kernels.thin_matmul)(x, w))
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1, inputs) ** 0.5)


@needs_kernel
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("rows, inputs, outputs", [(1, 512, 1408), (8, 130, 129), (3, 7, 40), (5, 64, 8)])
def test_narrow_weights_are_read_as_they_are(dtype, rows, inputs, outputs):
    """Weight-only decode: the product of bfloat16 / int8 weights equals float64 numpy on the same
    (widened) values; the weights reach the custom call narrow."""
    rng = np.random.RandomState(inputs)
    x = rng.randn(rows, inputs).astype(np.float32)
    if dtype == "int8":
        w = jnp.asarray(rng.randint(-127, 128, (inputs, outputs)), jnp.int8)
    else:
        w = jnp.asarray(rng.randn(inputs, outputs), jnp.bfloat16)
    product = jax.jit(decode_kernels.thin_matmul)
    narrow = "bf16" if dtype == "bfloat16" else "s8"
    call = [line for line in product.lower(x, w).compile().as_text().splitlines() if "custom-call(" in line]
    assert len(call) == 1 and f"{narrow}[{inputs},{outputs}]" in call[0], call  # the operand, narrow
    want = x.astype(np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(product(x, w)), want, rtol=1e-5,
                               atol=1e-5 * max(1, inputs) ** 0.5 * (127 if dtype == "int8" else 1))


@needs_kernel
@pytest.mark.parametrize("batch, kv_heads, groups, length, head_dim", [
    (8, 4, 2, 160, 64), (3, 2, 4, 7, 16), (1, 1, 1, 1, 5), (2, 3, 1, 300, 20)])
def test_step_attention_equals_xla(batch, kv_heads, groups, length, head_dim):
    assert decode_kernels.available()
    rng = np.random.RandomState(length)
    normal = lambda *shape: jnp.asarray(rng.randn(*shape), jnp.float32)  # noqa: E731
    q = normal(batch, 1, kv_heads * groups, head_dim)
    k_old, v_old = normal(batch, kv_heads, length, head_dim), normal(batch, kv_heads, length, head_dim)
    k_new, v_new = normal(batch, 1, kv_heads, head_dim), normal(batch, 1, kv_heads, head_dim)
    filled = rng.rand(batch, 1, length) < 0.6
    filled[0] = False  # a row whose only key is its own (a first step)
    step = jax.jit(lambda *a: attend_step(*a, get_preset("tiny")))
    with flat_matmuls(True):
        with decode_kernels.decode_kernels(True):
            hlo = step.lower(q, k_old, v_old, k_new, v_new, filled).as_text()
            got = step(q, k_old, v_old, k_new, v_new, filled)
        want = jax.jit(lambda *a: attend_step(*a, get_preset("tiny")))(q, k_old, v_old, k_new, v_new, filled)
    assert decode_kernels.STEP_ATTENTION in hlo
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _decode_hlo_and_tokens(config, params, rows):
    prompts = [[1 + row, 2, 3, 4, 5][:5 - row % 3] for row in range(rows)]
    sampler, mesh, rules, dynamic, _ = generation._prepare(config, params, prompts, 12, 0.0, None, None, 0,
                                                           None, (), None, None, None)
    layout = generation.decode_kernel_layout(mesh, dynamic[1].shape[0], config)
    with flat_matmuls(True):
        run = generation._compiled_generate(config, sampler, 12, mesh, rules, layout)
        hlo = run.lower(*dynamic).compile().as_text()
        tokens = np.asarray(run(*dynamic))
    return hlo, tokens, layout


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_decoding_with_the_kernel_equals_xla(rows, monkeypatch):
    config = get_preset("tiny")
    params = init_params(config, rng=1)
    hlo, tokens, layout = _decode_hlo_and_tokens(config, params, rows)
    assert layout == "in_out"
    assert len(re.findall(rf'custom_call_target="{decode_kernels.THIN_MATMUL}"', hlo)) >= 7 * config.num_layers
    assert len(re.findall(rf'custom_call_target="{decode_kernels.STEP_ATTENTION}"', hlo)) == config.num_layers
    generation._compiled_generate.cache_clear()
    monkeypatch.setenv(decode_kernels.SWITCH_ENV, "0")
    try:
        reference_hlo, reference, _ = _decode_hlo_and_tokens(config, params, rows)
    finally:
        generation._compiled_generate.cache_clear()
    assert decode_kernels.THIN_MATMUL not in reference_hlo and decode_kernels.STEP_ATTENTION not in reference_hlo
    np.testing.assert_array_equal(tokens, reference)


@needs_kernel
@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_weight_only_decoding_with_the_kernels_equals_xla(weights, monkeypatch):
    config = get_preset("tiny")
    params, quant = quantize_weights(config, init_params(config, rng=3), weights)
    prompts = [[1, 2, 3, 4, 5], [7, 3, 2]]
    with_kernels = generation.generate(config, params, prompts, 12, quant=quant)
    sampler, mesh, rules, dynamic, _ = generation._prepare(config, params, prompts, 12, 0.0, None, None, 0,
                                                           None, (), None, None, quant)
    hlo = generation._compiled_generate(config, sampler, 12, mesh, rules, "in_out").lower(*dynamic).compile().as_text()
    # The decode loop's MLP products take the kernels narrow (only the prefill's many rows, in
    # XLA's dots, use a widened copy).
    narrow = "bf16" if weights == "bfloat16" else "s8"
    calls = [line for line in hlo.splitlines() if f'custom_call_target="{decode_kernels.THIN_MATMUL}_{narrow}"' in line]
    assert sum(f"{narrow}[{config.hidden_size},{config.intermediate_size}]" in line for line in calls) \
        >= 2 * config.num_layers, calls
    generation._compiled_generate.cache_clear()
    monkeypatch.setenv(decode_kernels.SWITCH_ENV, "0")
    try:
        assert generation.generate(config, params, prompts, 12, quant=quant) == with_kernels
    finally:
        generation._compiled_generate.cache_clear()


@needs_kernel
def test_decode_step_logits_equal_xla():
    config = get_preset("tiny")
    params = init_params(config, rng=2)
    decode_config = generation.decoding_config(config)
    layer_params = generation.decoding_params(config, params)
    prompt = jnp.asarray([[1, 5, 9, 2]] * 3, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (3, 4))
    with flat_matmuls(True):
        _, cache = generation.prefill(decode_config, layer_params, prompt, positions, jnp.ones_like(prompt), 8)
        token, step_positions = jnp.asarray([7, 8, 9], jnp.int32), jnp.full((3,), 4, jnp.int32)
        step = lambda p, t, q, c: generation.decode_step(decode_config, p, t, q, c)[0]  # noqa: E731
        with decode_kernels.decode_kernels(True):
            kernel_hlo = jax.jit(step).lower(layer_params, token, step_positions, cache).as_text()
            with_kernel = jax.jit(step)(layer_params, token, step_positions, cache)
        with_xla = jax.jit(step)(layer_params, token, step_positions, cache)
    assert decode_kernels.THIN_MATMUL in kernel_hlo
    np.testing.assert_allclose(with_kernel, with_xla, rtol=1e-5, atol=1e-5)


def test_more_rows_or_other_dtypes_keep_xla():
    config = get_preset("tiny")
    assert generation.decode_kernel_layout(None, 16, config) == "out_in"
    assert not generation.uses_decode_kernels(None, 9, config)
    assert not generation.uses_decode_kernels(None, 4, config.replace(dtype="bfloat16"))
    # bfloat16 params with float32 compute: the kernels read the bfloat16 weights
    assert generation.uses_decode_kernels(None, 4, config.replace(param_dtype="bfloat16")) == decode_kernels.available()
    with decode_kernels.decode_kernels(True):
        assert not decode_kernels.thin_matmul_applies(jnp.zeros((9, 4)), jnp.zeros((4, 4)))
        assert not decode_kernels.thin_matmul_applies(jnp.zeros((2, 4), jnp.bfloat16), jnp.zeros((4, 4), jnp.bfloat16))
    assert not decode_kernels.thin_matmul_applies(jnp.zeros((2, 4)), jnp.zeros((4, 4)))  # outside a decode program


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(decode_kernels.SWITCH_ENV, "0")
    assert not decode_kernels.available()
    assert generation.decode_kernel_layout(None, 8) == "out_in"
    assert generation.decode_kernel_layout(None, 1) == "in_out"


def test_a_failed_build_is_one_warning_and_xla_decodes(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no-such-compiler"):
        decode_kernels.build()
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    with pytest.raises(RuntimeError, match="exited with 3: error: this compiler is broken"):
        decode_kernels.build()
    assert not list((tmp_path / "llamax" / "kernels").iterdir()), "a failed build leaves no file"
    with caplog.at_level(logging.WARNING, logger="llamax.model.cpu_kernels"):
        assert decode_kernels._load.__wrapped__() is False  # the uncached load: the build fails
    assert len(caplog.records) == 1 and "unavailable" in caplog.records[0].getMessage()


@needs_kernel
def test_the_library_is_built_once_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = decode_kernels.build()
    stamp = first.stat().st_mtime_ns
    assert decode_kernels.build() == first and first.stat().st_mtime_ns == stamp
    assert first.parent == tmp_path / "llamax" / "kernels"
