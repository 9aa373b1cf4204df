"""LoRA: adapters that start as the identity, train alone (base bitwise frozen, optimizer state for
adapters only), shard like their kernels (FSDP+TP == one device), merge exactly into the base, and
export through the converters to weights that transformers loads with the same logits."""
import jax
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from finetune_fixtures import TINY, compilation_cache_dir, tiny_hf_dir  # noqa: F401 (fixtures)
from hf_models import hf_logits
from llamax.convert import save_hf
from llamax.convert.hub import load_any
from llamax.convert.meta import save_meta
from llamax.errors import CheckpointError, ConfigError
from llamax.model.lora import (LORA_TARGETS, LoraConfig, adapter_logical_axes, count_params, init_adapters,
                         merge_lora, model_variables)
from llamax.model import Llama, init_params
from llamax.train.optim import OptimConfig
from llamax.sharding import MESH_PRESETS, MeshConfig, make_mesh, param_shardings
from llamax.train import init_train_state, make_loss_and_grads, make_train_step, state_shardings

ALL_TARGETS = LoraConfig(rank=4, alpha=8.0, targets=LORA_TARGETS)
OPTIM = OptimConfig(learning_rate=1e-2, warmup_steps=0, decay="constant")
BATCH, SEQ, STEPS = 8, 32, 3


def make_batch(seed: int) -> dict[str, np.ndarray]:
    """Random next-token rows; the last position has no target."""
    tokens = np.random.default_rng(seed).integers(0, TINY.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
    loss_mask = np.ones((BATCH, SEQ), np.float32)
    return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=loss_mask)


def logits(params, tokens, adapters=None, lora=None, config=TINY) -> np.ndarray:
    variables = {"params": params} if adapters is None else model_variables(adapters, params, lora)
    return np.asarray(jax.jit(Llama(config).apply)(variables, tokens))


@pytest.fixture(scope="module")
def base_params(tiny_hf_dir):  # noqa: F811
    config, params = load_any(tiny_hf_dir)
    assert config.architecture() == TINY.architecture()
    return params


def train(mesh, initial_host_state, base_params, steps: int = STEPS):
    """(final state on the host, losses, base params on the host after training)."""
    state = jax.device_put(initial_host_state, state_shardings(TINY, OPTIM, mesh, lora_config=ALL_TARGETS))
    base = jax.device_put(base_params, param_shardings(TINY, mesh))
    train_step = make_train_step(TINY, OPTIM, mesh, lora_config=ALL_TARGETS)
    losses = []
    for _ in range(steps):  # one batch, again and again: the loss must fall
        state, metrics = train_step(state, make_batch(0), base)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses, jax.device_get(base)


@pytest.fixture(scope="module")
def trained(base_params):
    """LoRA on every projection, 3 steps on the FSDP+TP mesh (data=1, fsdp=4, tensor=2)."""
    mesh = make_mesh(MESH_PRESETS["fsdp_tp"])
    initial = jax.device_get(init_train_state(TINY, OPTIM, mesh, rng=0, lora_config=ALL_TARGETS))
    final, losses, base_after = train(mesh, initial, base_params)
    return dict(initial=initial, final=final, losses=losses, base_after=base_after)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_zero_initialized_b_leaves_the_model_unchanged(scan_layers):
    config = TINY.replace(scan_layers=scan_layers)
    params = init_params(config, 0)
    adapters = init_adapters(config, ALL_TARGETS, 1)
    assert all(np.all(np.asarray(b) == 0) for path, b in jax.tree_util.tree_leaves_with_path(adapters)
               if "lora_b" in jax.tree_util.keystr(path))
    tokens = make_batch(0)["tokens"]
    np.testing.assert_array_equal(logits(params, tokens, adapters, ALL_TARGETS, config),
                                  logits(params, tokens, config=config))


def test_adapters_take_their_kernels_input_and_output_axes():
    axes = adapter_logical_axes(TINY, ALL_TARGETS)["layers"]
    assert tuple(axes["self_attn"]["q_proj"]["lora_a"]) == ("layers", "embed", None)
    assert tuple(axes["self_attn"]["q_proj"]["lora_b"]) == ("layers", None, "heads", "head_dim")
    assert tuple(axes["self_attn"]["o_proj"]["lora_a"]) == ("layers", "heads", "head_dim", None)
    assert tuple(axes["mlp"]["down_proj"]["lora_b"]) == ("layers", None, "embed")


def test_only_adapters_train_and_the_optimizer_holds_state_for_adapters_only(trained, base_params):
    assert trained["losses"][-1] < trained["losses"][0]
    # The base is an input, never an output: bit for bit what went in.
    for before, after in zip(jax.tree.leaves(base_params), jax.tree.leaves(trained["base_after"])):
        assert np.asarray(before).tobytes() == np.asarray(after).tobytes()
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), trained["initial"].params,
                           trained["final"].params)
    assert all(jax.tree.leaves(changed))
    assert int(trained["final"].step) == STEPS
    # Adam's two moments per adapter scalar, plus scalar step counters; nothing shaped like a kernel.
    adapter_shapes = {np.shape(x) for x in jax.tree.leaves(trained["final"].params)}
    tensors = [x for x in jax.tree.leaves(trained["final"].opt_state) if np.ndim(x) > 0]
    assert {np.shape(x) for x in tensors} == adapter_shapes
    assert count_params(tensors) == 2 * count_params(trained["final"].params)
    assert count_params(trained["final"].params) < count_params(base_params) / 5


def test_lora_step_on_fsdp_tp_equals_one_device(trained, base_params):
    one_device = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    final, losses, _ = train(one_device, trained["initial"], base_params)
    np.testing.assert_allclose(losses, trained["losses"], rtol=1e-5)
    # Adam's first steps move each weight by ~lr * g / (|g| + eps): for near-zero gradient entries
    # float-rounding differences between the layouts become differences of a fraction of a step
    # (lr = 1e-2), so the params agree to 1% of one step; the gradients agree tightly.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 final.params, trained["final"].params)
    adapters, batch = trained["final"].params, make_batch(1)
    sharded = make_loss_and_grads(TINY, OPTIM, make_mesh(MESH_PRESETS["fsdp_tp"]),
                                  lora_config=ALL_TARGETS)(adapters, batch, base_params)
    single = make_loss_and_grads(TINY, OPTIM, one_device, lora_config=ALL_TARGETS)(
        adapters, batch, base_params)
    np.testing.assert_allclose(sharded[0]["loss"], single[0]["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 jax.device_get(sharded[1]), jax.device_get(single[1]))


def test_merged_params_equal_the_adapter_forward(trained, base_params):
    adapters = trained["final"].params
    merged = merge_lora(TINY, base_params, adapters, ALL_TARGETS)
    tokens = make_batch(10)["tokens"]
    with_adapters = logits(base_params, tokens, adapters, ALL_TARGETS)
    assert np.abs(with_adapters - logits(base_params, tokens)).max() > 1e-3  # B moved off zero
    np.testing.assert_allclose(logits(merged, tokens), with_adapters, atol=1e-5, rtol=0)
    # Only targeted kernels change; norms and embeddings are the base's own arrays.
    assert merged["embed_tokens"]["embedding"] is base_params["embed_tokens"]["embedding"]


def test_merged_export_loads_in_transformers_and_meta_round_trips(trained, base_params, tmp_path):
    merged = merge_lora(TINY, base_params, trained["final"].params, ALL_TARGETS)
    tokens = make_batch(11)["tokens"]
    expected = logits(merged, tokens)
    save_hf(TINY, merged, tmp_path / "hf")
    hf_model = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(hf_model, tokens), expected, atol=1e-4, rtol=0)
    save_meta(TINY, merged, tmp_path / "meta")
    _, from_meta = load_any(tmp_path / "meta")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), from_meta, merged)


@pytest.mark.parametrize("fields, match", [
    (dict(targets=("q_proj", "qq_proj")), r"'qq_proj'.*did you mean 'q_proj'.*valid targets: q_proj"),
    (dict(targets=("attention",)), r"valid targets: q_proj, k_proj, v_proj, o_proj, gate_proj"),
    (dict(rank=0), "rank must be an integer >= 1, got 0"),
    (dict(rank=-4), "rank must be an integer >= 1, got -4"),
    (dict(rank=True), "rank must be an int, got True"),
    (dict(alpha=0.0), "alpha must be > 0"),
])
def test_bad_lora_config_is_a_config_error(fields, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**fields)


def test_adapters_of_another_shape_and_a_step_without_base_are_clear_errors(base_params):
    adapters = init_adapters(TINY, LoraConfig(rank=4), 0)
    with pytest.raises(CheckpointError, match=r"rank=8.*mis-shaped"):
        merge_lora(TINY, base_params, adapters, LoraConfig(rank=8))
    mesh = make_mesh(MESH_PRESETS["fsdp"])
    state = init_train_state(TINY, OPTIM, mesh, lora_config=LoraConfig(rank=4))
    with pytest.raises(ConfigError, match="needs the frozen base params"):
        make_train_step(TINY, OPTIM, mesh, lora_config=LoraConfig(rank=4))(state, make_batch(0))
