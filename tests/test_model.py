"""llamax's forward pass against transformers' PyTorch LlamaForCausalLM, plus invariants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import HF_VARIANTS, hf_logits, make_hf_model
from llamax.config import REMAT_POLICIES, ModelConfig, get_preset
from llamax.convert import hf_to_params
from llamax.model import KVCache, Llama, init_params, param_logical_axes
from llamax.model.matmul import flat_matmuls


def _from_hf(model, **overrides):
    config = ModelConfig.from_hf(model.config.to_dict(), **overrides)
    state = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    return config, hf_to_params(config, state)


@pytest.fixture(scope="module", params=sorted(HF_VARIANTS))
def hf_model(request):
    return make_hf_model(request.param)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers(hf_model, scan_layers):
    config, params = _from_hf(hf_model, scan_layers=scan_layers)
    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 64))
    ours = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(tokens)))
    theirs = hf_logits(hf_model, tokens)
    diff = np.abs(ours - theirs).max()
    assert diff < 1e-4, f"max abs logit diff {diff:.3g} vs transformers"
    assert np.abs(theirs).max() > 0.1  # the comparison is not between two near-zero tensors


def test_remat_policies_do_not_change_logits():
    config = get_preset("tiny")
    params = init_params(config)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (2, 16)))
    reference = Llama(config).apply({"params": params}, tokens)
    for policy in ("full", "dots", "dots_with_no_batch_dims", "save_projections"):
        logits = Llama(config.replace(remat_policy=policy)).apply({"params": params}, tokens)
        np.testing.assert_allclose(logits, reference, atol=1e-6)


def test_remat_policies_do_not_change_gradients():
    """Remat only changes what the backward pass keeps (offload_*: in host memory) or recomputes;
    the gradients stay those of the plain model."""
    config = get_preset("tiny")
    params = init_params(config)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (2, 16)))

    def grads(remat_policy):
        model = Llama(config.replace(remat_policy=remat_policy))
        return jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)))(params)

    reference = grads("none")
    for policy in REMAT_POLICIES[1:]:
        jax.tree.map(lambda ours, plain: np.testing.assert_allclose(ours, plain, atol=1e-7, err_msg=policy),
                     grads(policy), reference)


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_cpu_programs_run_the_stacked_layers_unrolled(remat_policy):
    """Params stay stacked [layers, ...] (`nn.scan`); a program built for CPU runs the layers as
    straight-line code, one built for TPU/GPU keeps the rolled loop, and their gradients agree."""
    config = get_preset("tiny", remat_policy=remat_policy)
    assert config.scan_layers
    params = init_params(config)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (2, 16)))

    def program(for_cpu: bool):
        loss = lambda p: jnp.mean(Llama(config).apply({"params": p}, tokens) ** 2)  # noqa: E731
        with flat_matmuls(for_cpu):  # jit traces here, under the setting
            lowered = jax.jit(jax.grad(loss)).lower(params)
        return lowered.as_text(), lowered.compile()(params)

    cpu_text, cpu_grads = program(True)
    accelerator_text, accelerator_grads = program(False)
    assert "stablehlo.while" not in cpu_text and "stablehlo.while" in accelerator_text
    jax.tree.map(lambda ours, rolled: np.testing.assert_allclose(ours, rolled, rtol=1e-5, atol=1e-7),
                 cpu_grads, accelerator_grads)


def test_future_tokens_never_change_earlier_logits():
    config = get_preset("tiny")
    params = init_params(config)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (1, 24))
    changed = tokens.copy()
    changed[0, 12:] = (changed[0, 12:] + 7) % config.vocab_size
    apply = jax.jit(lambda t: Llama(config).apply({"params": params}, t))
    before, after = np.asarray(apply(tokens)), np.asarray(apply(changed))
    np.testing.assert_array_equal(before[0, :12], after[0, :12])
    assert np.abs(before[0, 12:] - after[0, 12:]).max() > 1e-3


def test_packed_segments_equal_separate_documents():
    config = get_preset("tiny")
    params = init_params(config)
    rng = np.random.RandomState(0)
    doc_a, doc_b = rng.randint(0, config.vocab_size, 10), rng.randint(0, config.vocab_size, 6)
    packed = np.concatenate([doc_a, doc_b])[None]
    segment_ids = np.array([[1] * 10 + [2] * 6])
    positions = np.array([list(range(10)) + list(range(6))])
    model = Llama(config)
    logits = model.apply({"params": params}, packed, positions=positions, segment_ids=segment_ids)
    alone_a = model.apply({"params": params}, doc_a[None])
    alone_b = model.apply({"params": params}, doc_b[None])
    np.testing.assert_allclose(logits[0, :10], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(logits[0, 10:], alone_b[0], atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_logits_equal_full_forward_at_every_position(scan_layers):
    config = get_preset("tiny", scan_layers=scan_layers)
    params = init_params(config)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (2, 12)))
    model = Llama(config)
    full = model.apply({"params": params}, tokens)
    cache = KVCache.create(config, batch_size=2, max_length=16)
    prefill, cache = model.apply({"params": params}, tokens[:, :5], cache=cache)
    steps = [prefill]
    for t in range(5, 12):
        logits, cache = model.apply({"params": params}, tokens[:, t:t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
    assert int(cache.index) == 12


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_with_a_write_index_per_row_equals_full_forward(scan_layers):
    """Rows at different lengths (a serving batch): each writes and attends at its own index;
    cache rows past the batch (idle serving slots) are neither read nor written, and an attention
    window (attend_length) shorter than the cache gives the same logits."""
    config = get_preset("tiny", scan_layers=scan_layers)
    params = init_params(config)
    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 12))
    model = Llama(config)
    full = model.apply({"params": params}, jnp.asarray(tokens))  # [2, 12, vocab]
    lengths = np.array([5, 8])
    cache = KVCache.create(config, batch_size=3, max_length=16, per_layer=not scan_layers)
    idle = lambda layers: tuple(layer.at[2].set(7.0) for layer in layers)  # noqa: E731
    cache = cache.replace(index=jnp.zeros((2,), jnp.int32), key=idle(cache.key), value=idle(cache.value))
    if scan_layers:
        cache = cache.replace(key=jnp.stack(cache.key), value=jnp.stack(cache.value))
    right_padded = (np.arange(8) < lengths[:, None]).astype(np.int32)  # row 0: 3 padding slots
    prefill, cache = model.apply({"params": params}, jnp.asarray(tokens[:, :8]),
                                 segment_ids=jnp.asarray(right_padded), cache=cache)
    for row, length in enumerate(lengths):
        np.testing.assert_allclose(prefill[row, :length], full[row, :length], atol=1e-5)
    # Decoding reads only slots [0, 12): every row's position stays below it.
    cache = cache.replace(index=jnp.asarray(lengths, jnp.int32), attend_length=12)
    for step in range(4):  # default positions continue from each row's own index
        fed = tokens[np.arange(2), lengths + step][:, None]
        logits, cache = model.apply({"params": params}, jnp.asarray(fed), cache=cache)
        np.testing.assert_allclose(logits[:, 0], full[np.arange(2), lengths + step], atol=1e-5)
    np.testing.assert_array_equal(cache.index, lengths + 4)
    for layer in range(config.num_layers):
        np.testing.assert_array_equal(cache.key[layer][2], 7.0)
        np.testing.assert_array_equal(cache.value[layer][2], 7.0)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_at_one_position_per_row_equal_the_full_forward_there(scan_layers):
    """`logits_at` (a prefill's last prompt token) computes only those rows' logits, with or
    without a cache, and the cache it fills is the one a full forward fills."""
    config = get_preset("tiny", scan_layers=scan_layers)
    params = init_params(config)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, config.vocab_size, (3, 10)))
    model = Llama(config)
    full = model.apply({"params": params}, tokens)  # [3, 10, vocab]
    at = jnp.asarray([9, 0, 4], jnp.int32)
    picked = model.apply({"params": params}, tokens, logits_at=at)
    assert picked.shape == (3, 1, config.vocab_size)
    np.testing.assert_allclose(picked[:, 0], full[np.arange(3), at], atol=1e-5)
    empty = KVCache.create(config, batch_size=3, max_length=16)
    cached, cache = model.apply({"params": params}, tokens, cache=empty, logits_at=at)
    np.testing.assert_allclose(cached[:, 0], full[np.arange(3), at], atol=1e-5)
    _, want = model.apply({"params": params}, tokens, cache=empty)
    np.testing.assert_array_equal(cache.key, want.key)


def test_bfloat16_compute_with_float32_params_tracks_float32():
    config = get_preset("tiny")
    params = init_params(config)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (2, 16)))
    full = Llama(config).apply({"params": params}, tokens)
    half = Llama(config.replace(dtype="bfloat16")).apply({"params": params}, tokens)
    assert half.dtype == jnp.float32 and params["norm"]["weight"].dtype == jnp.float32
    assert float(jnp.abs(half - full).max()) < 0.05


def test_every_param_has_logical_axes_matching_its_rank():
    for scan_layers in (True, False):
        config = get_preset("tiny", scan_layers=scan_layers, tie_word_embeddings=scan_layers)
        params = init_params(config)
        axes = param_logical_axes(config)
        flat_params = jax.tree_util.tree_leaves_with_path(params)
        flat_axes = dict(jax.tree_util.tree_leaves_with_path(
            axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
        for path, value in flat_params:
            spec = flat_axes[path]
            assert len(spec) == value.ndim and all(name is not None for name in spec), (path, spec)
            if scan_layers and path[0].key == "layers":
                assert spec[0] == "layers"
        assert ("lm_head" in params) != config.tie_word_embeddings


@pytest.mark.parametrize("weights", ["float32", "int8", "lora"])
def test_out_in_kernels_prefill_and_decode_like_the_trained_layout(weights):
    """kernel_layout 'out_in' (the serving engine's CPU layout: `decoding_params` transposes every
    projection kernel to [outputs, inputs]) gives the logits of the trained layout, for a
    prefill of many rows and a decode step of few (the two forms of `project_out_in`)."""
    from llamax.infer.generate import decoding_config, decoding_params
    from llamax.model.llama import kernels_out_in
    from llamax.model.lora import LoraConfig, init_adapters, model_variables as lora_variables
    from llamax.model.quantize import model_variables, quantize_weights

    config = get_preset("tiny")  # scanned: decoding_params unstacks the layers too
    params, quant, adapters = init_params(config, 0), None, None
    if weights == "int8":
        params, quant = quantize_weights(config, params, "int8")
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, config.vocab_size, (2, 40)))  # 80 rows
    results = {}
    for layout in ("in_out", "out_in"):
        decode = decoding_config(config, layout)
        variables = model_variables(decoding_params(config, params, layout), decoding_params(config, quant, layout))
        if weights == "lora":
            lora = LoraConfig(rank=4, targets=("q_proj", "o_proj", "down_proj"))
            adapters = jax.tree.map(lambda x: x + 0.05, init_adapters(config, lora, 0))  # B != 0
            variables = lora_variables(decoding_params(config, adapters), variables["params"], lora)
        model = Llama(decode)
        cache = KVCache.create(decode, batch_size=2, max_length=48, per_layer=True)
        prefill, cache = model.apply(variables, tokens[:, :39], cache=cache)
        step, _ = model.apply(variables, tokens[:, 39:], cache=cache)  # 2 rows
        results[layout] = (prefill, step)
        if layout == "out_in":
            q_proj = variables["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
            assert q_proj.shape == (config.num_heads * config.head_dim, config.hidden_size)
    for ours, trained in zip(results["out_in"], results["in_out"]):
        np.testing.assert_allclose(ours, trained, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scanned"):
        kernels_out_in(params)  # a scanned stack must be unstacked first
