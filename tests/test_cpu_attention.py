"""`llamax.model.cpu_attention`'s C++ kernels (`train_attention.cc`): values and gradients equal
XLA's form of the same blocks for every grouping, odd lengths and head sizes, packed and padded
rows (float32); they are used only inside `attention_kernel(True)`, never for bfloat16 or when
switched off; the train setup turns them on for one CPU device only; and a train step with the
train kernels (this attention and the AdamW update of `llamax.train.optim.cpu_adamw_update`)
equals one without."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_marks import needs_kernel
from llamax.config import get_preset
from llamax.model import cpu_attention
from llamax.model.cpu_attention import attention_kernel, blocked_causal_attention
from llamax.sharding import MeshConfig, make_mesh
from llamax.train import init_train_state, make_train_step
from llamax.train.optim import OptimConfig


def _inputs(batch, seq, heads, kv_heads, head_dim, seed=0):
    """q, k, v and a causal mask over two packed documents per row, the last row padded (its
    padding rows see no key at all: their softmax is uniform over the block's keys, as XLA's)."""
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(batch, seq, heads, head_dim), jnp.float32)
    k = jnp.asarray(rng.randn(batch, seq, kv_heads, head_dim), jnp.float32)
    v = jnp.asarray(rng.randn(batch, seq, kv_heads, head_dim), jnp.float32)
    segments = np.ones((batch, seq), np.int32)
    segments[:, seq // 2:] = 2
    segments[-1, seq - seq // 5:] = 0
    slots = np.arange(seq)
    mask = (slots[None, None, :] <= slots[None, :, None]) & (segments[:, :, None] == segments[:, None, :])
    mask[-1, seq - seq // 5:] = False
    return q, k, v, jnp.asarray(mask)


def _value_and_grads(q, k, v, mask, block, kernel):
    weights = jnp.asarray(np.random.RandomState(9).randn(*q.shape), jnp.float32)

    def loss(q, k, v):
        with attention_kernel(kernel):
            out = blocked_causal_attention(q, k, v, mask, block)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@needs_kernel
@pytest.mark.parametrize("batch, seq, heads, kv_heads, head_dim, block", [
    (2, 80, 4, 2, 16, 24),  # GQA; blocks that do not divide the length
    (1, 100, 4, 4, 32, 32),  # one query head per kv head
    (3, 70, 6, 1, 48, 16),  # MQA, three vectors per head
    (2, 160, 8, 4, 64, 64),  # the bench preset's head size: tiles of 64 columns
    (1, 40, 2, 1, 16, 128),  # one block longer than the sequence
])
def test_kernels_equal_xla(batch, seq, heads, kv_heads, head_dim, block):
    q, k, v, mask = _inputs(batch, seq, heads, kv_heads, head_dim)
    ours, our_grads = _value_and_grads(q, k, v, mask, block, kernel=True)
    theirs, their_grads = _value_and_grads(q, k, v, mask, block, kernel=False)
    np.testing.assert_allclose(ours, theirs, atol=2e-6, rtol=1e-5)
    for name, mine, reference in zip("qkv", our_grads, their_grads):
        scale = float(jnp.max(jnp.abs(reference)))
        np.testing.assert_allclose(mine, reference, atol=1e-5 * scale, err_msg=f"d{name}")


def _kernel_calls(fn, *args) -> int:
    text = jax.jit(fn).lower(*args).as_text()
    return text.count(cpu_attention.FORWARD) + text.count(cpu_attention.BACKWARD)


@needs_kernel
def test_used_only_when_turned_on_in_float32_and_not_switched_off(monkeypatch):
    q, k, v, mask = _inputs(1, 48, 4, 2, 16)

    def attention(q, k, v, kernel):
        with attention_kernel(kernel):
            return blocked_causal_attention(q, k, v, mask, 16)

    assert _kernel_calls(lambda q, k, v: attention(q, k, v, True), q, k, v) == 1
    assert _kernel_calls(lambda q, k, v: attention(q, k, v, False), q, k, v) == 0
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    assert _kernel_calls(lambda q, k, v: attention(q, k, v, True), *bf16) == 0
    odd = [x[..., :12] for x in (q, k, v)]  # head_dim not a multiple of 16
    assert _kernel_calls(lambda q, k, v: attention(q, k, v, True), *odd) == 0
    monkeypatch.setenv(cpu_attention.SWITCH_ENV, "0")
    assert _kernel_calls(lambda q, k, v: attention(q, k, v, True), q, k, v) == 0


def _train_step(config, mesh_config, devices):
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0, decay="constant")
    mesh = make_mesh(mesh_config, devices=devices)
    state = init_train_state(config, optim, mesh)
    return state, make_train_step(config, optim, mesh)


@needs_kernel
def test_train_step_with_the_kernels_equals_xla(monkeypatch):
    """The setup turns them on for one CPU device; the step's loss, grad norm and params match
    the step built with them switched off."""
    config = get_preset("tiny", attention_block_size=16, dtype="float32")
    rng = np.random.RandomState(0)
    batch = {"tokens": jnp.asarray(rng.randint(0, config.vocab_size, (2, 48)), jnp.int32),
             "targets": jnp.asarray(rng.randint(0, config.vocab_size, (2, 48)), jnp.int32),
             "loss_mask": jnp.ones((2, 48), jnp.float32)}
    one = MeshConfig(data=1, fsdp=1, tensor=1)
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(cpu_attention.SWITCH_ENV, switch)
        state, step = _train_step(config, one, jax.devices()[:1])
        text = step.jitted.lower(state, batch).as_text()
        assert (cpu_attention.FORWARD in text) == (switch == "1") == ("llamax_adamw" in text)
        results[switch] = step(state, batch)
    (ours, our_metrics), (theirs, their_metrics) = results["1"], results["0"]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(our_metrics[key], their_metrics[key], rtol=1e-5)
    # Adam divides by the gradients' own scale: float32 rounding in a tiny gradient moves its
    # update by a fraction of the learning rate (1e-3)
    for mine, reference in zip(jax.tree.leaves(ours.params), jax.tree.leaves(theirs.params)):
        np.testing.assert_allclose(mine, reference, atol=1e-5)


@needs_kernel
def test_not_used_on_a_mesh_of_several_devices():
    """XLA cannot split a custom call across devices: a two-device mesh keeps XLA's form."""
    if len(jax.devices()) < 2:
        pytest.skip("needs two CPU devices")
    config = get_preset("tiny", attention_block_size=16, dtype="float32")
    state, step = _train_step(config, MeshConfig(data=2, fsdp=1, tensor=1), jax.devices()[:2])
    batch = {"tokens": jnp.zeros((2, 48), jnp.int32), "targets": jnp.zeros((2, 48), jnp.int32),
             "loss_mask": jnp.ones((2, 48), jnp.float32)}
    assert cpu_attention.FORWARD not in step.jitted.lower(state, batch).as_text()
