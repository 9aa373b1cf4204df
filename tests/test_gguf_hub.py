"""GGUF in the conversion hub and CLI: gguf -> orbax/HF (tokenizer files travel along) -> gguf,
`load_any` on a .gguf (what INIT_FROM, eval and export_lora use), tokenizers found for runs."""
import json
import shutil

import jax
import numpy as np
import pytest
from gguf import GGUFReader
from transformers import AutoTokenizer, LlamaForCausalLM

from gguf_fixtures import byte_level_folder, llamax_logits, tiny_hf_folder  # noqa: F401
from experiments import convert as convert_cli
from hf_models import hf_logits
from llamax.convert import load_hf
from llamax.convert.gguf import load_gguf
from llamax.convert.gguf_write import save_gguf
from llamax.convert.hub import detect_format, load_any, save_any
from llamax.convert.identity import identity_of
from llamax.errors import ConfigError


def _cli(src, src_format, dst, dst_format, *extra):
    assert convert_cli.main(["--src", str(src), "--src_format", src_format, "--dst", str(dst),
                             "--dst_format", dst_format, "--no_progress", *extra]) == 0


def _metadata(path):
    return {key: field.contents() for key, field in GGUFReader(path).fields.items()
            if key.startswith(("tokenizer.", "llama."))}


def test_gguf_to_orbax_to_gguf_keeps_weights_and_tokenizer(tmp_path, byte_level_folder):  # noqa: F811
    config, params = load_hf(tiny_hf_folder(tmp_path / "hf", "llama32_tied", byte_level_folder))
    original = save_gguf(config, params, tmp_path / "original.gguf", dtype="f32", tokenizer=tmp_path / "hf")
    assert detect_format(original) == "gguf"
    _cli(original, "gguf", tmp_path / "orbax", "orbax")
    assert (tmp_path / "orbax" / "tokenizer" / "tokenizer.json").is_file()  # the tokenizer travels too
    loaded_config, loaded = load_any(tmp_path / "orbax")
    gguf_config, from_gguf = load_any(original)  # INIT_FROM=model.gguf
    assert loaded_config == gguf_config
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(from_gguf)):
        np.testing.assert_array_equal(a, b)
    _cli(tmp_path / "orbax", "orbax", tmp_path / "back.gguf", "gguf")  # tokenizer found beside the weights
    assert _metadata(tmp_path / "back.gguf") == _metadata(original)
    for a, b in zip(GGUFReader(tmp_path / "back.gguf").tensors, GGUFReader(original).tensors):
        assert a.name == b.name and np.array_equal(a.data, b.data)


def test_a_run_exports_with_the_tokenizer_of_its_init_from(tmp_path, byte_level_folder):  # noqa: F811
    config, params = load_hf(tiny_hf_folder(tmp_path / "hf", "llama3_gqa"))
    base = save_gguf(config, params, tmp_path / "base.gguf", dtype="bf16", tokenizer=byte_level_folder)
    run = tmp_path / "run"  # stands in for a fine-tuning run: weights + init_from.json, no tokenizer
    _cli(base, "gguf", run, "orbax")
    shutil.rmtree(run / "tokenizer")  # what it recorded: gone; what it started from: recorded
    (run / "special_ids.json").unlink(missing_ok=True)
    (run / "init_from.json").write_text(json.dumps({"path": str(base)}))
    _cli(run, "orbax", tmp_path / "tuned.gguf", "gguf", "--dtype", "q8_0")
    meta = _metadata(tmp_path / "tuned.gguf")
    assert meta["tokenizer.ggml.tokens"] == _metadata(base)["tokenizer.ggml.tokens"]
    assert {t.tensor_type.name for t in GGUFReader(tmp_path / "tuned.gguf").tensors} == {"Q8_0", "F32"}


def test_gguf_to_hf_folder_runs_in_transformers_with_its_tokenizer(tmp_path, byte_level_folder):  # noqa: F811
    config, params = load_hf(tiny_hf_folder(tmp_path / "hf", "llama31_scaled"))
    source = save_gguf(config, params, tmp_path / "m.gguf", dtype="f32", tokenizer=byte_level_folder)
    _cli(source, "gguf", tmp_path / "out", "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "<|im_start|>user\nROMEO: what light?<|im_end|>\n"
    tokens = np.asarray([tokenizer(text)["input_ids"]])
    assert tokens[0, 0] == 1 and tokens[0, -2] == 2  # <|im_start|> and <|im_end|> stay whole
    reloaded_config, reloaded = load_gguf(source)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "out")  # llama3 rope scaling in config.json
    np.testing.assert_allclose(hf_logits(model, tokens), llamax_logits(reloaded_config, reloaded, tokens), atol=1e-4)
    shutil.rmtree(tmp_path / "out")


def test_save_any_writes_gguf_with_the_tokenizer_it_is_given(tmp_path, byte_level_folder):  # noqa: F811
    config, params = load_hf(tiny_hf_folder(tmp_path / "hf", "llama3_gqa"))
    with pytest.raises(ConfigError, match="embeds the checkpoint's tokenizer"):
        save_any(config, params, tmp_path / "m.gguf", "gguf")
    path = save_any(config, params, tmp_path / "m.gguf", "gguf", dtype="bf16",
                    identity=identity_of(byte_level_folder))
    reloaded_config, reloaded = load_any(path, param_dtype="bfloat16")
    assert reloaded_config.architecture() == config.architecture()
    for a, b in zip(jax.tree.leaves(reloaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b.astype(a.dtype))
