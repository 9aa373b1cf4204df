"""Learning-rate schedule values, the weight-decay mask, OptimConfig validation, and the CPU
AdamW kernel equal to optax."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kernel_marks import needs_kernel
from llamax.config import get_preset
from llamax.errors import ConfigError
from llamax.model import cpu_kernels, init_params
from llamax.train.optim import (OptimConfig, cpu_adamw_update, learning_rate_schedule, make_optimizer,
                                weight_decay_mask)

TINY = get_preset("tiny")


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_schedule_warmup_then_decay_to_min(decay):
    cfg = OptimConfig(learning_rate=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1, decay=decay)
    schedule = learning_rate_schedule(cfg)
    np.testing.assert_allclose(schedule(0), 0.0)
    np.testing.assert_allclose(schedule(5), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)  # warmup end: the peak
    np.testing.assert_allclose(schedule(60), 5.5e-4, rtol=1e-5)  # halfway: cosine == linear here
    np.testing.assert_allclose(schedule(110), 1e-4, rtol=1e-5)  # decay end: min_lr_ratio * peak
    np.testing.assert_allclose(schedule(500), 1e-4, rtol=1e-5)  # held afterwards


def test_cosine_differs_from_linear_between_ends():
    kwargs = dict(learning_rate=1.0, warmup_steps=0, total_steps=100, min_lr_ratio=0.0)
    cosine = learning_rate_schedule(OptimConfig(decay="cosine", **kwargs))
    linear = learning_rate_schedule(OptimConfig(decay="linear", **kwargs))
    np.testing.assert_allclose(cosine(25), (1 + np.cos(np.pi / 4)) / 2, rtol=1e-6)
    np.testing.assert_allclose(linear(25), 0.75, rtol=1e-6)


def test_constant_schedule_after_warmup():
    schedule = learning_rate_schedule(OptimConfig(learning_rate=2e-3, warmup_steps=4, decay="constant"))
    assert [float(schedule(s)) for s in (0, 2, 4, 10_000)] == pytest.approx([0, 1e-3, 2e-3, 2e-3])


def _flat(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_weight_decay_mask_excludes_norms_only_by_default():
    params = jax.eval_shape(lambda: init_params(TINY, 0))
    mask = _flat(weight_decay_mask(params, OptimConfig()))
    no_decay = {name for name, decays in mask.items() if not decays}
    assert no_decay == {"['layers']['input_layernorm']['weight']",
                        "['layers']['post_attention_layernorm']['weight']", "['norm']['weight']"}


def test_weight_decay_flag_also_excludes_embeddings():
    params = jax.eval_shape(lambda: init_params(TINY, 0))
    mask = _flat(weight_decay_mask(params, OptimConfig(no_decay_on_embeddings=True)))
    assert not mask["['embed_tokens']['embedding']"]
    assert mask["['lm_head']['kernel']"] and mask["['layers']['mlp']['up_proj']['kernel']"]
    assert not mask["['norm']['weight']"]


def test_optimizer_decays_kernels_but_not_norms():
    # With zero gradients Adam's step is 0, so the whole update is the decoupled decay -lr*wd*p.
    cfg = OptimConfig(learning_rate=0.1, warmup_steps=0, decay="constant", weight_decay=0.5)
    rows = jnp.arange(12.0).reshape(3, 4)
    params = {"norm": {"weight": rows[0]}, "layers": {"input_layernorm": {"weight": rows[:2]}},
              "lm_head": {"kernel": rows}}
    optimizer = make_optimizer(cfg)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
    np.testing.assert_array_equal(updates["norm"]["weight"], 0.0)
    np.testing.assert_array_equal(updates["layers"]["input_layernorm"]["weight"], 0.0)
    np.testing.assert_allclose(updates["lm_head"]["kernel"], -0.05 * params["lm_head"]["kernel"],
                               rtol=1e-6)


def test_clipping_limits_the_global_norm_and_keeps_state_structure():
    params = {"w": jnp.ones((4,))}
    clipped = make_optimizer(OptimConfig(clip_norm=1.0))
    unclipped = make_optimizer(OptimConfig(clip_norm=None))
    assert (jax.tree.structure(clipped.init(params)) == jax.tree.structure(unclipped.init(params)))
    clip_only = optax.clip_by_global_norm(1.0)
    grads, _ = clip_only.update({"w": jnp.full((4,), 10.0)}, clip_only.init(params))
    np.testing.assert_allclose(optax.global_norm(grads), 1.0, rtol=1e-6)


def test_opt_state_dtype_sets_first_moment_dtype():
    optimizer = make_optimizer(OptimConfig(opt_state_dtype="bfloat16"))
    state = optimizer.init({"w": jnp.ones((4,), jnp.float32)})
    adam_state = state[1][0]
    assert adam_state.mu["w"].dtype == jnp.bfloat16 and adam_state.nu["w"].dtype == jnp.float32


@pytest.mark.parametrize("fields, match", [
    (dict(decay="step"), "decay='step'"),
    (dict(warmup_steps=100, total_steps=100), "must exceed warmup_steps"),
    (dict(grad_accum_steps=0), "grad_accum_steps"),
    # bool is an int in Python: `True` from a gin/JSON typo must not mean 1 micro-batch.
    (dict(grad_accum_steps=True), "grad_accum_steps must be an int, got True"),
    (dict(warmup_steps=False), "warmup_steps must be an int, got False"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(opt_state_dtype="float33"), "not a dtype"),
    (dict(clip_norm=-1.0), "clip_norm"),
])
def test_bad_optim_config_raises(fields, match):
    with pytest.raises(ConfigError, match=match):
        OptimConfig(**fields)


@needs_kernel
@pytest.mark.parametrize("clip_norm", [1.0, 100.0, None])  # clipping, not reached, off
def test_cpu_adamw_kernel_equals_optax(clip_norm):
    """Four updates through warmup and decay: params and optimizer state (counts included) equal
    optax's update + apply_updates to float32 rounding, decay mask and an empty array included."""
    cfg = OptimConfig(learning_rate=1e-2, warmup_steps=2, total_steps=10, clip_norm=clip_norm)
    rng = np.random.RandomState(0)
    params = {"layers": {"kernel": jnp.asarray(rng.randn(3, 40, 50), jnp.float32),
                         "input_layernorm": {"weight": jnp.asarray(rng.randn(3, 40), jnp.float32)}},
              "embed_tokens": {"embedding": jnp.asarray(rng.randn(70, 8), jnp.float32)},
              "empty": jnp.zeros((0, 4), jnp.float32)}
    optimizer, fused = make_optimizer(cfg), cpu_adamw_update(cfg)

    @jax.jit
    def reference(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    theirs = ours = (params, optimizer.init(params))
    assert "llamax_adamw" in jax.jit(fused).lower(params, ours[1], params).as_text()
    for step in range(4):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape) * 0.3, jnp.float32), params)
        norm = optax.global_norm(grads) if step % 2 else None  # the train step passes its own
        theirs, ours = reference(*theirs, grads), jax.jit(fused)(grads, ours[1], ours[0], norm)
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        for mine, reference_leaf in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_allclose(mine, reference_leaf, rtol=1e-6, atol=1e-7)


@needs_kernel
def test_cpu_adamw_kernel_leaves_other_dtypes_and_the_switch_to_optax(monkeypatch):
    params = {"kernel": jnp.ones((4, 4), jnp.float32)}
    fused = cpu_adamw_update(OptimConfig(opt_state_dtype="bfloat16"))
    state = make_optimizer(OptimConfig(opt_state_dtype="bfloat16")).init(params)
    assert fused(params, state, params) is None  # a bfloat16 first moment
    cfg = OptimConfig()
    state = make_optimizer(cfg).init(params)
    monkeypatch.setenv(cpu_kernels.TRAIN_SWITCH_ENV, "0")
    assert cpu_adamw_update(cfg)(params, state, params) is None
