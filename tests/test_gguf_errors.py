"""Bad GGUF input: one clear error each, naming what is wrong, and nothing left on disk."""
import json
import shutil

import numpy as np
import pytest
from gguf import GGUFReader

from gguf_fixtures import byte_level_folder, tiny_hf_folder  # noqa: F401
from experiments import convert as convert_cli
from llamax.convert import load_hf
from llamax.convert.gguf import load_gguf, rope_scaling_from_factors, llama3_rope_factors
from llamax.convert.gguf_write import save_gguf
from llamax.config import RopeScaling
from llamax.errors import CheckpointError, ConfigError, DataError
from llamax.tokenizer.gguf import tokenizer_from_gguf


@pytest.fixture(scope="module")
def exported(tmp_path_factory, byte_level_folder):  # noqa: F811
    folder = tmp_path_factory.mktemp("exported")
    config, params = load_hf(tiny_hf_folder(folder / "hf", "llama3_gqa", byte_level_folder))
    return save_gguf(config, params, folder / "tiny.gguf", dtype="f32", tokenizer=byte_level_folder)


def _copy(src, tmp_path, name="bad.gguf"):
    shutil.copy(src, tmp_path / name)
    return tmp_path / name


def _convert_fails(tmp_path, src, *extra):
    """Runs the CLI; returns its one-line error and checks that nothing was written."""
    before = set(tmp_path.iterdir())
    dst = tmp_path / "out"
    code = convert_cli.main(["--src", str(src), "--src_format", "gguf", "--dst", str(dst), "--dst_format", "orbax",
                             "--no_progress", *extra])
    assert code == 1 and not dst.exists() and set(tmp_path.iterdir()) == before
    return code


def test_truncated_file_names_the_tensor_it_cuts(tmp_path, exported, capsys):
    bad = _copy(exported, tmp_path)
    size = bad.stat().st_size
    with open(bad, "r+b") as f:
        f.truncate(size - 4096)
    with pytest.raises(CheckpointError, match=r"truncated: tensor '[a-z_.0-9]+' .* ends at byte"):
        load_gguf(bad)
    _convert_fails(tmp_path, bad)
    assert capsys.readouterr().err.count("\n") == 1
    with open(bad, "r+b") as f:  # cut inside the metadata
        f.truncate(200)
    with pytest.raises(CheckpointError, match="truncated or corrupt GGUF file"):
        load_gguf(bad)
    (tmp_path / "text.gguf").write_text("not a gguf")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(tmp_path / "text.gguf")


@pytest.mark.parametrize("type_id, message", [(99, "ggml type id 99, which is not a ggml type"),
                                              (16, "stored as IQ2_XXS, which llamax does not read")])
def test_unknown_or_unsupported_tensor_type_is_refused_by_name(tmp_path, exported, type_id, message):
    bad = _copy(exported, tmp_path)
    reader = GGUFReader(bad, "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    tensor.field.parts[4][0] = type_id  # the tensor's type, in the memory-mapped file
    reader.data.flush()
    del reader
    with pytest.raises(CheckpointError, match=f"tensor 'blk.1.attn_q.weight' .*{message}"):
        load_gguf(bad)
    _convert_fails(tmp_path, bad)


def test_non_llama_architecture_is_refused_by_name(tmp_path, exported):
    bad = _copy(exported, tmp_path)
    reader = GGUFReader(bad, "r+")
    reader.fields["general.architecture"].parts[-1][:] = np.frombuffer(b"gemma", np.uint8)  # same length
    reader.data.flush()
    del reader
    with pytest.raises(CheckpointError, match="holds a 'gemma' model .*reads 'llama' GGUFs only"):
        load_gguf(bad)
    _convert_fails(tmp_path, bad)


def test_tokenizer_without_merges_is_refused_both_ways(tmp_path, exported, byte_level_folder):  # noqa: F811
    folder = tmp_path / "tok"
    shutil.copytree(byte_level_folder, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["merges"] = []
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config, params = load_gguf(exported)
    with pytest.raises(DataError, match="without merges"):
        save_gguf(config, params, tmp_path / "out.gguf", tokenizer=folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no output, no staging file
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.pre": "gpt-2"}
    with pytest.raises(DataError, match="without tokenizer.ggml.merges"):
        tokenizer_from_gguf(meta)


def test_tokenizer_problems_name_the_fix(tmp_path, exported, byte_level_folder):  # noqa: F811
    config, params = load_gguf(exported)
    folder = tmp_path / "tok"
    shutil.copytree(byte_level_folder, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="pre-tokenizer .*Whitespace.* none llama.cpp names"):
        save_gguf(config, params, tmp_path / "out.gguf", tokenizer=folder)
    with pytest.raises(DataError, match="has 320 tokens but the model only 128"):
        save_gguf(config.replace(vocab_size=128), {**params, "embed_tokens": {"embedding": np.zeros((128, 64))},
                                                   "lm_head": {"kernel": np.zeros((64, 128))}},
                  tmp_path / "out.gguf", dtype="f32", tokenizer=byte_level_folder)
    with pytest.raises(DataError, match="tokenizer.ggml.pre='tekken' is not one llamax implements"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"],
                             "tokenizer.ggml.merges": ["a a"], "tokenizer.ggml.pre": "tekken"})
    with pytest.raises(ConfigError, match="unknown GGUF output type 'q4_k'"):
        save_gguf(config, params, tmp_path / "out.gguf", dtype="q4_k", tokenizer=byte_level_folder)
    no_tokenizer = tiny_hf_folder(tmp_path / "bare", "llama3_gqa")
    code = convert_cli.main(["--src", str(no_tokenizer), "--src_format", "hf", "--dst", str(tmp_path / "x.gguf"),
                             "--dst_format", "gguf", "--no_progress"])
    assert code == 1 and not (tmp_path / "x.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "tok"]


def test_rope_freqs_that_are_not_llama3_scaling_are_refused():
    scaling = RopeScaling(8.0, 1.0, 4.0, 8192)
    factors = llama3_rope_factors(128, 5e5, scaling)  # Llama 3.1 8B: recovered exactly
    assert rope_scaling_from_factors(factors, 128, 5e5) == scaling
    assert rope_scaling_from_factors(np.ones(64), 128, 5e5) is None
    with pytest.raises(CheckpointError, match="not Llama-3 rope scaling"):
        rope_scaling_from_factors(np.linspace(1, 4, 64), 128, 5e5)


def test_gguf_output_file_follows_the_umask_and_stale_staging_is_removed(tmp_path, exported):
    """The .gguf is staged as a sibling file: it gets the umask's permissions, and a staging file
    left by a writer that died (a pid that no longer exists) goes when the next export starts."""
    import os
    import socket
    config, params = load_gguf(exported)
    stale = tmp_path / f".m.gguf.tmp-{socket.gethostname()}-999999999-abc"  # no such process
    stale.write_bytes(b"GGUF half written")
    previous = os.umask(0o022)
    try:
        save_gguf(config, params, tmp_path / "m.gguf", dtype="bf16", tokenizer=exported)
    finally:
        os.umask(previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o644
