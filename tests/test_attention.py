"""`llamax.model.llama.attend`: causal query blocks equal dense attention (values and gradients,
in both the CPU form of `llamax.model.cpu_attention` and JAX's autodiff of the blocks), the
model with small blocks still matches transformers, and the mask semantics equal
`jax.nn.dot_product_attention` (the call the cuDNN path makes) for GQA + causal + segments, as do
`attend_cached`'s two forms over a heads-major KV cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import hf_logits, make_hf_model
from llamax.config import ModelConfig, get_preset
from llamax.convert import hf_to_params
from llamax.model import Llama, attend, init_params
from llamax.model.attention import attend_cached
from llamax.model.matmul import flat_matmuls

BATCH, SEQ, HEADS, KV_HEADS, HEAD_DIM = 2, 80, 4, 2, 16


def _inputs(seed: int = 0):
    """q, k, v and a causal mask over two packed documents per row, the second row padded."""
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(BATCH, SEQ, HEADS, HEAD_DIM), jnp.float32)
    k = jnp.asarray(rng.randn(BATCH, SEQ, KV_HEADS, HEAD_DIM), jnp.float32)
    v = jnp.asarray(rng.randn(BATCH, SEQ, KV_HEADS, HEAD_DIM), jnp.float32)
    segments = np.ones((BATCH, SEQ), np.int32)
    segments[:, 37:] = 2
    segments[1, 70:] = 0  # padding attends only to padding
    segments = jnp.asarray(segments)
    slots = jnp.arange(SEQ)
    mask = (slots[None, None, :] <= slots[None, :, None]) & (segments[:, :, None] == segments[:, None, :])
    return q, k, v, mask


@pytest.mark.parametrize("cpu_form", [True, False])  # llamax.model.cpu_attention / autodiff blocks
@pytest.mark.parametrize("block", [16, 24, 79])  # divides SEQ, does not, one short of SEQ
def test_causal_blocks_equal_dense_attention(block, cpu_form):
    q, k, v, mask = _inputs()
    config = get_preset("tiny")

    def loss(block_size, q, k, v):
        with flat_matmuls(cpu_form):
            out = attend(q, k, v, mask, config.replace(attention_block_size=block_size), causal=True)
        return jnp.sum(jnp.sin(out)), out

    (_, dense), dense_grads = jax.value_and_grad(
        lambda *a: loss(0, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, blocked), blocked_grads = jax.jit(jax.value_and_grad(
        lambda *a: loss(block, *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(blocked, dense, atol=1e-5)
    for ours, reference in zip(blocked_grads, dense_grads):
        np.testing.assert_allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [KV_HEADS, HEADS, 1])  # GQA, one query head per kv head, MQA
def test_cpu_blocked_attention_in_bfloat16_and_every_grouping(kv_heads):
    """The CPU form's own backward pass against JAX's autodiff of the same blocks: bfloat16
    inputs (float32 scores and softmax, bfloat16 products) and every query-head grouping."""
    from llamax.model.cpu_attention import blocked_causal_attention
    q, k, v, mask = _inputs(5)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k[:, :, :kv_heads], v[:, :, :kv_heads]))
    config = get_preset("tiny", attention_block_size=24)

    def loss(form, q, k, v):
        if form == "cpu":
            out = blocked_causal_attention(q, k, v, mask, 24)
        else:
            with flat_matmuls(False):
                out = attend(q, k, v, mask, config, causal=True)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    (_, ours), our_grads = jax.value_and_grad(lambda *a: loss("cpu", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, theirs), their_grads = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert ours.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in our_grads)
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), atol=2e-2)
    for mine, reference in zip(our_grads, their_grads):
        scale = float(jnp.max(jnp.abs(reference.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(mine, np.float32), np.asarray(reference, np.float32),
                                   atol=2e-2 * scale)


def test_mask_semantics_match_jax_dot_product_attention():
    """Same query-head -> kv-head grouping and masking as jax.nn.dot_product_attention, whose
    cuDNN implementation `attention_impl='cudnn'` calls with exactly these arguments."""
    q, k, v, mask = _inputs(1)
    ours = attend(q, k, v, mask, get_preset("tiny"), causal=True)
    theirs = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=True,
                                          implementation="xla")
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_small_blocks_match_transformers():
    model = make_hf_model("llama3_gqa")
    config = ModelConfig.from_hf(model.config.to_dict(), attention_block_size=16)
    params = hf_to_params(config, {name: t.numpy() for name, t in model.state_dict().items()})
    tokens = np.random.RandomState(2).randint(0, config.vocab_size, (2, 72))
    ours = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=1e-4)


def test_blocks_do_not_change_cached_prefill():
    """With a KV cache the mask is not slot-causal in general, so `attend` stays dense there:
    prefill logits equal the uncached forward pass whatever the block size."""
    from llamax.model import KVCache
    config = get_preset("tiny", attention_block_size=8)
    params = init_params(config)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, config.vocab_size, (1, 20)))
    model = Llama(config)
    uncached = model.apply({"params": params}, tokens)
    cached, _ = model.apply({"params": params}, tokens, cache=KVCache.create(config, 1, 32))
    np.testing.assert_allclose(cached, uncached, atol=1e-5)


@pytest.mark.parametrize("cpu_form", [True, False])  # one matrix-vector product per group / grouped einsum
@pytest.mark.parametrize("q_len", [1, 3])
def test_attend_cached_over_heads_major_keys_matches_jax(cpu_form, q_len):
    """Queries at the end of a padded cache (the last q_len slots): keys/values given
    heads-major equal jax.nn.dot_product_attention on the same keys in [batch, seq, heads, dim]."""
    q, k, v, mask = _inputs(4)
    q, mask = q[:, -q_len:], mask[:, -q_len:]  # [batch, q_len, heads, dim], [batch, q_len, seq]
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [batch, kv_heads, seq, dim]
    with flat_matmuls(cpu_form):
        ours = jax.jit(lambda *a: attend_cached(*a, get_preset("tiny")))(q, heads_major(k), heads_major(v), mask)
    theirs = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
