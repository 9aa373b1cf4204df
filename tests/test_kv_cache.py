"""`llamax.model.kv_cache`: a one-token step on CPU (attend over the old cache plus the step's own
key/value, then write) equals write-then-attend, in its output and in the buffers it leaves; and
the compiled `generate` loop no longer copies cache buffers every step."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llamax.config import get_preset
from llamax.infer import generate as generation
from llamax.model import init_params, decode_kernels
from llamax.model.attention import attend_cached
from llamax.model.kv_cache import update_and_attend, write_at
from llamax.model.matmul import flat_matmuls

CONFIG = get_preset("tiny")  # 4 heads over 2 kv heads, head_dim 16


def _step_inputs(rows: int, length: int, per_row: bool):
    rng = np.random.RandomState(0)
    normal = lambda *shape: jnp.asarray(rng.randn(*shape), jnp.float32)  # noqa: E731
    h, kv, d = CONFIG.num_heads, CONFIG.num_kv_heads, CONFIG.head_dim
    q, k, v = normal(rows, 1, h, d), normal(rows, 1, kv, d), normal(rows, 1, kv, d)
    cache = (normal(rows, kv, length, d), normal(rows, kv, length, d))  # stale data everywhere
    index = jnp.asarray([5, 9, 0][:rows], jnp.int32) if per_row else jnp.int32(7)
    slots = jnp.arange(length)
    filled = slots[None, :] <= jnp.reshape(index, (-1, 1))  # [rows or 1, length]
    mask = jnp.broadcast_to(filled[:, None, :], (rows, 1, length))
    return q, k, v, cache, index, mask


@pytest.mark.parametrize("per_row", [False, True])  # generate's one index / a server's index per row
def test_cpu_step_equals_write_then_attend(per_row):
    q, k, v, cache, index, mask = _step_inputs(3, 12, per_row)
    with flat_matmuls(True):
        out, (keys, values) = jax.jit(lambda *a: update_and_attend(*a, CONFIG))(q, k, v, cache, index, mask)
    want_keys = write_at(cache[0], k, index, length_axis=2)
    want_values = write_at(cache[1], v, index, length_axis=2)
    with flat_matmuls(False):  # the grouped einsum over the written cache: the reference
        want = attend_cached(q, want_keys, want_values, mask, CONFIG)
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_array_equal(keys, want_keys)
    np.testing.assert_array_equal(values, want_values)


@pytest.mark.parametrize("rows", [1, 4, 16])  # [inputs, outputs] kernels (with the decode kernel
def test_generate_loop_copies_no_cache_buffer(rows):  # where it is built) / [outputs, inputs] kernels
    """The compiled decode loop of `generate` (CPU form) holds no copy of a KV cache buffer. Before
    the step attended over the old cache, XLA:CPU copied each of them several times per step."""
    config = get_preset("tiny")
    params = init_params(config, rng=0)
    prompts = [[1, 2, 3, 4, 5]] * rows
    sampler, mesh, rules, dynamic, _ = generation._prepare(config, params, prompts, 20, 0.0, None, None, 0,
                                                           None, (), None, None, None)
    layout = generation.decode_kernel_layout(mesh, rows)
    thin = generation.uses_decode_kernels(mesh, rows)
    assert layout == ("in_out" if rows == 1 or thin else "out_in") and thin == (rows <= 8 and decode_kernels.available())
    with flat_matmuls(True), generation.sharding_context(mesh, rules):
        run = generation._compiled_generate(config, sampler, 20, mesh, rules, layout)
        hlo = run.lower(*dynamic).compile().as_text()
    length = generation.bucket_length(len(prompts[0])) + 20
    buffer = rf"f32\[{rows},{config.num_kv_heads},{length},{config.head_dim}\]"
    assert re.search(rf"= {buffer}\S* (?:get-tuple-element|dynamic-update-slice|fusion)", hlo), \
        "the cache buffer's shape was not found: the test no longer looks at the right program"
    copies = re.findall(rf"= {buffer}\S* copy\(", hlo)
    assert not copies, f"{len(copies)} copies of a cache buffer in the compiled decode loop"
