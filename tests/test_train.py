"""Train step on 8 fake CPU devices: sharded parity with a single-device reference, gradient
accumulation, loss masking, NaN guarding, learning, init sharding and throughput helpers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llamax.config import get_preset
from llamax.errors import ConfigError
from llamax.model import Llama, init_params
from llamax.sharding import MESH_PRESETS, make_mesh, param_partition_specs
from llamax.train import (TrainState, cross_entropy_sums, flops_per_token, init_train_state,
                          make_eval_step, make_loss_and_grads, make_train_step,
                          peak_flops_per_device, state_shardings, throughput)
from llamax.train.optim import OptimConfig

TINY = get_preset("tiny")  # 4 heads, 2 kv heads: divisible by tensor=2
BATCH, SEQ = 8, 16
CONSTANT_LR = OptimConfig(learning_rate=1e-2, warmup_steps=0, decay="constant")


def make_batch(seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> dict[str, np.ndarray]:
    """Two packed documents per row, then padding; targets are the next token within a document
    (-1 where there is none, as padding targets may be garbage); loss_mask scores the rest."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, (batch, seq)).astype(np.int32)
    segment_ids = np.zeros((batch, seq), np.int32)
    positions = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        split, end = sorted(rng.choice(np.arange(3, seq + 1), 2, replace=False))
        segment_ids[row, :split], segment_ids[row, split:end] = 1, 2
        positions[row, :split] = np.arange(split)
        positions[row, split:end] = np.arange(end - split)
    same_segment = np.zeros((batch, seq), bool)
    same_segment[:, :-1] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    targets = np.where(same_segment, np.roll(tokens, -1, axis=1), -1).astype(np.int32)
    return dict(tokens=tokens, targets=targets, segment_ids=segment_ids, positions=positions,
                loss_mask=same_segment.astype(np.float32))


@jax.jit
def reference_loss_and_grads(params, batch, z_loss_weight=0.0):
    """Single-device reference, written independently of llamax.train.step."""

    def objective(params):
        logits = Llama(TINY).apply({"params": params}, batch["tokens"], batch["positions"],
                                   batch["segment_ids"])
        mask = batch["loss_mask"]
        safe_targets = jnp.where(mask > 0, batch["targets"], 0)
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, safe_targets)
        z = jnp.square(jax.nn.logsumexp(logits, axis=-1))
        loss = jnp.sum(cross_entropy * mask) / jnp.sum(mask)
        return loss + z_loss_weight * jnp.sum(z * mask) / jnp.sum(mask), loss

    (_, loss), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return loss, grads


@pytest.fixture(scope="module")
def params():
    return jax.device_get(jax.jit(lambda: init_params(TINY, 0))())


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-7):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol,
                                                         atol=atol), actual, expected)


@pytest.mark.parametrize("preset", ["dp", "fsdp", "fsdp_tp"])
def test_sharded_loss_and_grads_match_single_device(preset, params):
    mesh = make_mesh(MESH_PRESETS[preset])
    batch = make_batch()
    metrics, grads = make_loss_and_grads(TINY, CONSTANT_LR, mesh)(params, batch)
    expected_loss, expected_grads = reference_loss_and_grads(params, batch)
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
    assert metrics["scored_tokens"] == batch["loss_mask"].sum()
    assert_trees_close(grads, expected_grads)
    specs = param_partition_specs(TINY, mesh)
    assert grads["lm_head"]["kernel"].sharding.spec == specs["lm_head"]["kernel"]


def test_grad_accumulation_equals_one_big_batch(params):
    # Micro-batches hold different numbers of scored tokens; the sum still equals the big batch.
    batch = make_batch(seed=1)
    batch["loss_mask"][:4:2] = 0.0  # rows 0 and 2: both land in micro-batch 0
    config = CONSTANT_LR.replace(grad_accum_steps=2, z_loss_weight=1e-3)
    metrics, grads = make_loss_and_grads(TINY, config, make_mesh(MESH_PRESETS["fsdp_tp"]))(params, batch)
    expected_loss, expected_grads = reference_loss_and_grads(params, batch, 1e-3)
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
    assert_trees_close(grads, expected_grads)


def test_unscored_targets_do_not_change_the_loss(params):
    eval_step = make_eval_step(TINY, make_mesh(MESH_PRESETS["fsdp"]))
    batch = make_batch(seed=2)
    first = eval_step(params, batch)
    changed = dict(batch, targets=np.where(batch["loss_mask"] > 0, batch["targets"], 7))
    second = eval_step(params, changed)
    assert float(first["loss_sum"]) == float(second["loss_sum"])
    assert float(first["scored_tokens"]) == batch["loss_mask"].sum()
    expected_loss, _ = reference_loss_and_grads(params, batch)
    np.testing.assert_allclose(first["loss_sum"] / first["scored_tokens"], expected_loss, rtol=1e-5)


# One compiled train step (bf16 compute, FSDP+TP) serves every train-step test: compiling a
# step takes ~10 s on 2 CPU cores.
BF16 = TINY.replace(dtype="bfloat16")


@pytest.fixture(scope="module")
def stepper():
    """(mesh, train_step, initial_state, fresh_state) where fresh_state() returns a copy of the
    sharded initial state (train_step donates its input, so every test needs its own)."""
    mesh = make_mesh(MESH_PRESETS["fsdp_tp"])
    shardings = state_shardings(BF16, CONSTANT_LR, mesh)
    initial = init_train_state(BF16, CONSTANT_LR, mesh, rng=0)
    on_host = jax.device_get(initial)
    return (mesh, make_train_step(BF16, CONSTANT_LR, mesh), initial,
            lambda: jax.device_put(on_host, shardings))


def test_init_train_state_is_sharded_and_matches_init_params(params, stepper):
    mesh, _, state, _ = stepper
    # Sharded init draws the same numbers; XLA may fuse the sampler differently (1 ulp).
    assert_trees_close(state.params, params, rtol=1e-6, atol=0)
    actual = jax.tree.map(lambda x: x.sharding.spec, state)
    assert actual == jax.tree.map(lambda s: s.spec, state_shardings(BF16, CONSTANT_LR, mesh))
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    assert state.rng.dtype == jnp.uint32
    adam = state.opt_state[1][0]
    up_proj = actual.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert adam.mu["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == up_proj
    assert adam.count.sharding.is_fully_replicated


def test_train_steps_decrease_loss_with_bf16_compute_and_fp32_params(stepper):
    _, train_step, _, fresh_state = stepper
    state, batch = fresh_state(), make_batch(seed=3)
    losses = []
    for _ in range(6):
        state, metrics = train_step(state, batch)
        assert bool(metrics["finite"])
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5, losses
    assert int(state.step) == 6
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(metrics["learning_rate"], 1e-2, rtol=1e-6)
    assert metrics["grad_norm"] > 0 and metrics["scored_tokens"] == batch["loss_mask"].sum()


def _poison(array: jax.Array) -> jax.Array:
    return jax.device_put(array.at[0, 0].set(jnp.nan), array.sharding)


@pytest.mark.parametrize("poison", ["params", "loss_mask_nan", "loss_mask_inf"])
def test_non_finite_step_leaves_state_unchanged(poison, stepper):
    _, train_step, _, fresh_state = stepper
    state, batch = fresh_state(), make_batch(seed=4)
    if poison == "params":
        params = dict(state.params, lm_head={"kernel": _poison(state.params["lm_head"]["kernel"])})
        state = state.replace(params=params)
    else:
        batch["loss_mask"][0, 0] = np.nan if poison == "loss_mask_nan" else np.inf
    before = jax.device_get(state)
    state, metrics = train_step(state, batch)  # donates the old state
    assert not bool(metrics["finite"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), before)
    if poison != "params":  # the state is still usable: a clean batch then trains
        state, metrics = train_step(state, make_batch(seed=4))
        assert bool(metrics["finite"]) and int(state.step) == 1


def test_bad_batches_raise_config_errors(stepper):
    mesh, train_step, _, _ = stepper
    with pytest.raises(ConfigError, match="batch size 6 is not divisible by the data-parallel size 4"):
        train_step(None, make_batch(batch=6))
    with pytest.raises(ConfigError, match="missing \\['loss_mask'\\]"):
        train_step(None, {k: v for k, v in make_batch().items() if k != "loss_mask"})
    accumulate = make_train_step(BF16, CONSTANT_LR.replace(grad_accum_steps=4), mesh)
    with pytest.raises(ConfigError, match="multiple of 16"):
        accumulate(None, make_batch())


def _dot_flops(jaxpr) -> int:
    """FLOPs of every matmul (dot_general) in a jaxpr, nested jaxprs included: 2 x output size x
    contracted size. An independent count of what the model computes."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _dot_flops(inner)
    return total


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_equals_the_matmuls_of_the_gradient(tied):
    # Dense attention (no causal blocks): the model FLOPs convention counts the full seq x seq
    # matrix. Unscanned layers: every matmul appears in the jaxpr once.
    config = TINY.replace(scan_layers=False, attention_block_size=0, tie_word_embeddings=tied)
    tokens = jnp.zeros((BATCH, SEQ), jnp.int32)

    def loss(params):
        logits = Llama(config).apply({"params": params}, tokens)
        return cross_entropy_sums(logits, tokens, jnp.ones((BATCH, SEQ)))[0]

    counted = _dot_flops(jax.make_jaxpr(jax.grad(loss))(init_params(config, 0)).jaxpr)
    assert flops_per_token(config, SEQ) * BATCH * SEQ == counted


def test_throughput():
    metrics = throughput(TINY, BATCH, SEQ, step_time_s=0.5, num_devices=8, peak_flops=1e12)
    assert metrics["tokens_per_s"] == BATCH * SEQ / 0.5
    assert metrics["tokens_per_s_per_device"] == BATCH * SEQ / 0.5 / 8
    np.testing.assert_allclose(metrics["mfu"], 256 * flops_per_token(TINY, SEQ) / 8e12)
    assert "mfu" not in throughput(TINY, BATCH, SEQ, step_time_s=0.5, num_devices=8)
    assert peak_flops_per_device(jax.devices()[0]) is None  # CPU: unknown peak, no MFU


def test_train_state_is_a_pytree_of_arrays():
    state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones(2)}, opt_state=(),
                       rng=jax.random.key_data(jax.random.key(0)))
    assert len(jax.tree.leaves(state)) == 3
