"""`attention_impl='splash'`: Pallas' TPU splash-attention kernel, run here in Pallas interpret
mode, equals the XLA attention path (values and gradients) for causal attention over packed
segments with padding, GQA, MHA and MQA, fp32 and bf16, unsharded and inside the sharded train
step (fsdp x tensor over 8 CPU devices). The kernel is JAX's, not ours: these tests pin our
wrapper (scaling, head grouping, segment ids, padding to whole tiles, shard_map specs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llamax.config import get_preset
from llamax.model import KVCache, Llama, attend, init_params
from llamax.sharding import MeshConfig, make_mesh
from llamax.train import init_train_state, make_loss_and_grads
from llamax.train.optim import OptimConfig

BATCH, HEADS, HEAD_DIM = 2, 4, 64


def _inputs(seq: int, kv_heads: int, dtype, seed: int = 0):
    """q, k, v, segment ids (two packed documents per row, the second row padded at the end)
    and the mask the model builds from them for the XLA path."""
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(BATCH, seq, HEADS, HEAD_DIM), dtype)
    k = jnp.asarray(rng.randn(BATCH, seq, kv_heads, HEAD_DIM), dtype)
    v = jnp.asarray(rng.randn(BATCH, seq, kv_heads, HEAD_DIM), dtype)
    segments = np.ones((BATCH, seq), np.int32)
    segments[:, seq * 2 // 5:] = 2
    segments[1, seq * 4 // 5:] = 0  # padding attends only to padding, in both paths
    segments = jnp.asarray(segments)
    slots = jnp.arange(seq)
    mask = (slots[None, None, :] <= slots[None, :, None]) & (segments[:, :, None] == segments[:, None, :])
    return q, k, v, segments, mask


def _attend_and_grads(impl: str, q, k, v, segments, mask):
    config = get_preset("tiny", attention_impl=impl)

    def loss(q, k, v):
        out = attend(q, k, v, mask, config, causal=True, segment_ids=segments)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *grads)]


@pytest.mark.parametrize("kv_heads", [2, 4, 1])  # GQA, MHA, MQA
def test_splash_equals_xla_fp32(kv_heads):
    inputs = _inputs(256, kv_heads, jnp.float32)
    splash = _attend_and_grads("splash", *inputs)
    xla = _attend_and_grads("xla", *inputs)
    for name, ours, reference in zip(("out", "dq", "dk", "dv"), splash, xla):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=2e-5, err_msg=name)
    assert np.abs(xla[2]).max() > 1.0  # the gradients compared are not near zero


def test_splash_bf16_is_as_close_to_fp32_as_xla_bf16():
    """bf16 rounds differently inside the kernel than in XLA; both must be equally close to the
    fp32 reference, output and gradients."""
    reference = _attend_and_grads("xla", *_inputs(256, 2, jnp.float32))
    for name, ours, theirs, exact in zip(("out", "dq", "dk", "dv"),
                                         _attend_and_grads("splash", *_inputs(256, 2, jnp.bfloat16)),
                                         _attend_and_grads("xla", *_inputs(256, 2, jnp.bfloat16)),
                                         reference):
        scale = np.abs(exact).max()
        splash_error, xla_error = np.abs(ours - exact).max(), np.abs(theirs - exact).max()
        assert splash_error <= 2 * xla_error + 1e-2 * scale, (name, splash_error, xla_error)


def test_any_length_is_padded_to_whole_tiles():
    """80 tokens: padded to one 128-token tile whose padding no real token sees."""
    inputs = _inputs(80, 2, jnp.float32, seed=1)
    for ours, reference in zip(_attend_and_grads("splash", *inputs), _attend_and_grads("xla", *inputs)):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=2e-5)


@pytest.mark.slow
def test_sharded_train_step_gradients_equal_xla():
    """The model's loss and every parameter gradient, fsdp 4 x tensor 2 over 8 CPU devices:
    shard_map hands each device its rows and its heads."""
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    config = get_preset("tiny")
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, config.vocab_size, (4, 256)).astype(np.int32)
    segments = np.ones((4, 256), np.int32)
    segments[:, 90:] = 2
    segments[2, 180:] = 0
    positions = np.concatenate([np.arange(90), np.arange(166)])[None].repeat(4, 0).astype(np.int32)
    batch = dict(tokens=tokens, targets=np.roll(tokens, -1, 1), segment_ids=segments,
                 positions=positions, loss_mask=(segments > 0).astype(np.float32))
    params = init_train_state(config, OptimConfig(), mesh).params
    results = {impl: make_loss_and_grads(config.replace(attention_impl=impl), OptimConfig(), mesh)(params, batch)
               for impl in ("xla", "splash")}
    (xla_metrics, xla_grads), (splash_metrics, splash_grads) = results["xla"], results["splash"]
    np.testing.assert_allclose(splash_metrics["loss"], xla_metrics["loss"], rtol=1e-6)
    jax.tree.map(lambda ours, reference: np.testing.assert_allclose(ours, reference, atol=1e-6),
                 splash_grads, xla_grads)


def test_generation_with_a_cache_uses_the_xla_path():
    """A KV cache makes attention non-causal in slot order; splash then defers to XLA, so cached
    prefill still equals the uncached (splash) forward pass."""
    config = get_preset("tiny", attention_impl="splash")
    params = init_params(config)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, config.vocab_size, (1, 20)))
    model = Llama(config)
    uncached = jax.jit(model.apply)({"params": params}, tokens)
    cached, _ = jax.jit(model.apply)({"params": params}, tokens, cache=KVCache.create(config, 1, 32))
    np.testing.assert_allclose(cached, uncached, atol=1e-5)
