"""Weight-only bf16/int8 (`llamax.model.quantize`): int8 scales and values equal torch's per-channel
symmetric observer + `quantize_per_channel`; quantized logits, greedy generation and perplexity
equal float32 runs of the dequantized weights; the sample/eval CLIs take `--weights`."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from data_fixtures import small_tokenizer  # noqa: F401 (fixture)
from finetune_fixtures import compilation_cache_dir, tiny_hf_dir  # noqa: F401 (fixtures)
from lm_eval_fixtures import lm_eval_hf_dir  # noqa: F401 (fixture)
from llamax.config import get_preset
from llamax.convert.hub import load_any
from llamax.errors import ConfigError
from llamax.infer.evaluate import evaluate_perplexity
from llamax.infer.generate import generate
from llamax.model.llama import Llama, init_params
from llamax.model.lora import LoraConfig, init_adapters, merge_lora, model_variables as lora_variables
from llamax.model.quantize import (dequantize_int8, dequantize_weights, model_variables, quantize_int8,
                                   quantize_weights, weight_bytes)

TOKENS = np.random.RandomState(0).randint(0, 256, (2, 24))


def _torch_per_channel(kernel: np.ndarray, num_inputs: int) -> tuple[np.ndarray, np.ndarray]:
    """(scales [outputs], int8 values [outputs, inputs]) from torch.ao's per-channel symmetric observer."""
    rows = torch.from_numpy(kernel.reshape(int(np.prod(kernel.shape[:num_inputs])), -1).T.copy())
    observer = torch.ao.quantization.PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127)
    observer(rows)
    scales, zero_points = observer.calculate_qparams()
    values = torch.quantize_per_channel(rows, scales.double(), zero_points, 0, torch.qint8).int_repr()
    return scales.numpy(), values.numpy()


@pytest.mark.parametrize("shape, num_inputs", [((64, 4, 16), 1), ((4, 16, 64), 2), ((176, 64), 1)])
def test_int8_equals_torch_per_channel_and_round_trips_within_half_a_scale(shape, num_inputs):
    kernel = np.random.RandomState(1).randn(*shape).astype(np.float32) * 0.02
    kernel[..., 0] = 0.0  # an all-zero output column (channel) must not divide by zero
    values, scale = quantize_int8(kernel, tuple(range(num_inputs)))
    assert values.dtype == jnp.int8 and values.shape == shape and scale.shape == shape[num_inputs:]
    torch_scales, torch_values = _torch_per_channel(kernel, num_inputs)
    # Equal up to one float32 rounding: XLA may divide by 127 as a multiply by its reciprocal.
    np.testing.assert_allclose(np.asarray(scale).reshape(-1), torch_scales, rtol=1.2e-7, atol=0)
    ours = np.asarray(values).reshape(torch_values.shape[::-1]).T  # [outputs, inputs]
    assert np.mean(ours != torch_values) < 1e-3 and np.max(np.abs(ours - torch_values.astype(int))) <= 1
    error = np.abs(np.asarray(dequantize_int8(values, scale, tuple(range(num_inputs)))) - kernel)
    assert np.all(error <= np.asarray(scale) / 2 * (1 + 1e-6))
    assert np.max(np.abs(np.asarray(values))) == 127


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_quantized_logits_equal_the_dequantized_float32_model(scan_layers, tied):
    config = get_preset("tiny", scan_layers=scan_layers, tie_word_embeddings=tied)
    params = init_params(config, 0)
    reference = Llama(config).apply({"params": params}, TOKENS)  # [batch, seq, vocab]
    bf16_params, quant = quantize_weights(config, params, "bfloat16")
    assert quant is None
    by_hand = jax.tree_util.tree_map_with_path(  # kernels (and a tied table) rounded to bf16 by hand
        lambda path, x: x.astype(jnp.bfloat16).astype(jnp.float32)
        if path[-1].key == "kernel" or (tied and path[-1].key == "embedding") else x, params)
    bf16 = Llama(config).apply({"params": bf16_params}, TOKENS)
    np.testing.assert_array_equal(bf16, Llama(config).apply({"params": by_hand}, TOKENS))
    int8_params, quant = quantize_weights(config, params, "int8")
    int8 = Llama(config).apply(model_variables(int8_params, quant), TOKENS)
    dequantized = Llama(config).apply({"params": dequantize_weights(config, int8_params, quant)}, TOKENS)
    np.testing.assert_allclose(int8, dequantized, atol=2e-6)
    # Measured on this random model: bf16 0.3%, int8 ~1% of max |logit| (bounds with 3x slack).
    scale = float(jnp.max(jnp.abs(reference)))
    assert float(jnp.max(jnp.abs(bf16 - reference))) < 0.01 * scale
    assert 0 < float(jnp.max(jnp.abs(int8 - reference))) < 0.03 * scale
    embedding = ("embed_tokens", "embedding")
    assert (int8_params[embedding[0]][embedding[1]].dtype == jnp.int8) == tied  # untied: stays f32
    assert weight_bytes(int8_params, quant) < 0.45 * weight_bytes(params)


def test_greedy_generate_with_int8_matches_a_float32_forward_of_the_dequantized_weights():
    config = get_preset("tiny")
    assert config.scan_layers  # the scales are unstacked with the layers
    params, quant = quantize_weights(config, init_params(config, 3), "int8")
    prompts = [[1, 5, 9], [1] + list(range(20, 40))]
    new = 10
    tokens = generate(config, params, prompts, new, quant=quant)
    dequantized = dequantize_weights(config, params, quant)
    forward = jax.jit(lambda p, t: Llama(config).apply({"params": p}, t))
    for prompt, produced in zip(prompts, tokens):
        sequence = list(prompt)
        for _ in range(new):  # greedy, full forward each step, right-padded to one length
            padded = np.array([sequence + [0] * (64 - len(sequence))])
            sequence.append(int(jnp.argmax(forward(dequantized, padded)[0, len(sequence) - 1])))
        assert produced == sequence[len(prompt):]
    assert generate(config, dequantized, prompts, new) == tokens


def test_lora_adapters_combine_with_int8_weights():
    config = get_preset("tiny")
    lora = LoraConfig(rank=4, targets=("q_proj", "o_proj", "down_proj"))
    adapters = jax.tree.map(lambda x: x + 0.05, init_adapters(config, lora, 0))  # B != 0: a real delta
    params, quant = quantize_weights(config, init_params(config, 0), "int8")
    variables = lora_variables(adapters, params, lora)  # {'params', 'lora' (B scaled)}
    ours = Llama(config).apply({**variables, **model_variables(params, quant)}, TOKENS)
    merged = merge_lora(config, dequantize_weights(config, params, quant), adapters, lora)
    np.testing.assert_allclose(ours, Llama(config).apply({"params": merged}, TOKENS), atol=1e-5)


def test_bad_weights_and_double_quantization_are_one_line_errors():
    config = get_preset("tiny")
    params = init_params(config, 0)
    with pytest.raises(ConfigError, match="weights must be one of float32, bfloat16, int8; got 'int4'"):
        quantize_weights(config, params, "int4")
    int8_params, _ = quantize_weights(config, params, "int8")
    with pytest.raises(ConfigError, match="is int8, not float32"):
        quantize_weights(config, int8_params, "bfloat16")


def test_int8_perplexity_is_the_dequantized_models_and_the_eval_cli_reports_it(  # noqa: F811
        tiny_hf_dir, small_tokenizer, capsys):
    from experiments import eval as eval_cli
    from test_evaluate import validation_batches

    config, params = load_any(tiny_hf_dir)
    batches = validation_batches(small_tokenizer, 1)
    int8_params, quant = quantize_weights(config, params, "int8")
    int8 = evaluate_perplexity(config, int8_params, batches, quant=quant)
    reference = evaluate_perplexity(config, dequantize_weights(config, int8_params, quant), batches)
    assert int8["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    argv = ["--checkpoint", str(tiny_hf_dir), "--tokenizer", str(small_tokenizer.path), "--seq_len", "64",
            "--batch_size", "8", "--max_batches", "1"]
    results = {}
    for weights in ("float32", "bfloat16", "int8"):
        assert eval_cli.main(argv + ["--weights", weights]) == 0
        results[weights] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert results[weights]["weights"] == weights
    assert results["int8"]["loss"] == pytest.approx(int8["loss"], rel=1e-6)
    assert results["float32"]["loss"] != results["int8"]["loss"]
    for weights in ("bfloat16", "int8"):  # a random tiny model: well under 1% either way
        assert results[weights]["perplexity"] == pytest.approx(results["float32"]["perplexity"], rel=0.01)
    with pytest.raises(SystemExit):
        eval_cli.main(argv + ["--weights", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_sample_cli_decodes_with_int8_weights(tiny_hf_dir, small_tokenizer, capsys):  # noqa: F811
    from experiments import sample as cli

    config, params = load_any(tiny_hf_dir)
    argv = ["--checkpoint", str(tiny_hf_dir), "--tokenizer", str(small_tokenizer.path),
            "--max_new_tokens", "8", "--prompt", "To be, or not"]
    prompt = small_tokenizer.encode("To be, or not", bos=True)
    int8_params, quant = quantize_weights(config, params, "int8")
    (expected,) = generate(config, int8_params, [prompt], 8, quant=quant, stop_ids=small_tokenizer.stop_ids)
    assert cli.main(argv + ["--weights", "int8"]) == 0
    assert capsys.readouterr().out == small_tokenizer.decode(prompt + expected, skip_special=True) + "\n"
    with pytest.raises(SystemExit):
        cli.main(argv + ["--weights", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.slow
def test_lm_eval_backend_with_int8_weights_equals_the_dequantized_model(lm_eval_hf_dir):  # noqa: F811
    from lm_eval.api.instance import Instance

    from llamax.infer.lm_eval_backend import LlamaxLM
    from llamax.tokenizer import load_tokenizer

    ours = LlamaxLM(checkpoint=str(lm_eval_hf_dir), max_length=64, batch_size=2, weights="int8")
    config, params = load_any(lm_eval_hf_dir)
    int8_params, quant = quantize_weights(config, params, "int8")
    reference = LlamaxLM.from_params(config, dequantize_weights(config, int8_params, quant),
                                     load_tokenizer(lm_eval_hf_dir), max_length=64, batch_size=2)
    scored = [Instance("loglikelihood", {}, pair, i) for i, pair in
              enumerate([("ROMEO:", " O, she doth teach"), ("To be, or not", " to be"), ("KING", ":")])]
    generated = [Instance("generate_until", {}, ("ROMEO:\n", {"until": ["\n\n"], "max_gen_toks": 8}), 0)]
    for got, want in zip(ours.loglikelihood(scored), reference.loglikelihood(scored), strict=True):
        assert got[0] == pytest.approx(want[0], rel=1e-5) and got[1] == want[1]
    assert ours.generate_until(generated) == reference.generate_until(generated)
    with pytest.raises(ConfigError, match="weights must be one of"):
        LlamaxLM(checkpoint=str(lm_eval_hf_dir), weights="int4")


def test_quantized_eval_step_takes_neither_lora_nor_a_reference():
    """The int8 scales take the eval step's frozen argument, which LoRA (its base) and DPO (its
    reference) would need too: asking for both is one clear error, not a wrong program."""
    from llamax.sharding import MeshConfig, make_mesh
    from llamax.train.setup import make_eval_step

    with pytest.raises(ConfigError, match="int8 .quantized. evaluation takes neither LoRA"):
        make_eval_step(get_preset("tiny"), make_mesh(MeshConfig()), lora_config=LoraConfig(), quantized=True)
