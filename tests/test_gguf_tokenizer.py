"""Tokenizers in GGUF metadata, both ways, against the tokenizers they came from (HF `tokenizers`,
sentencepiece) and transformers' tokenizer loaded from the same GGUF file."""
import importlib.util

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from data_fixtures import chat_tokenizer, small_tokenizer  # noqa: F401
from gguf_fixtures import CHATML, SHAKESPEARE_LINES, byte_level_folder, smollm2_path, tiny_hf_folder  # noqa: F401
from llamax.convert import load_hf
from llamax.convert.gguf_vocab import tokenizer_metadata
from llamax.convert.identity import find_tokenizer
from llamax.convert.gguf_write import save_gguf
from llamax.data import corpus
from llamax.errors import DataError
from llamax.tokenizer.gguf import read_tokenizer_metadata, tokenizer_from_gguf, write_hf_tokenizer

TEXTS = SHAKESPEARE_LINES + [
    "In 1594, 12345 men   walked\n\n  home.\t", "naïve café — 東京 🙂", " leading space", "x" * 40,
    "<|im_start|>user\nHi there!<|im_end|>\n<think>", "It's don't I'll we'd", "",
]


def _plain(values):
    return {key: value for key, (value, *_) in values.items()}


def _passages(count=6):
    return corpus.shakespeare_passages("validation", passage_chars=400)[:count]


def test_byte_level_tokenizer_survives_gguf_metadata(byte_level_folder):  # noqa: F811
    original = Tokenizer.from_file(str(byte_level_folder / "tokenizer.json"))
    values = tokenizer_metadata(byte_level_folder, 320)
    assert values["tokenizer.ggml.pre"][0] == "smollm" and values["tokenizer.ggml.token_type"][0][319] == 4
    rebuilt = tokenizer_from_gguf(_plain(values))
    for text in TEXTS + _passages():
        ids = rebuilt.tokenizer.encode(text).ids
        assert ids == original.encode(text).ids, text
        assert rebuilt.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert (rebuilt.bos_id, rebuilt.eos_id, rebuilt.pad_id, rebuilt.stop_ids) == (0, 2, 0, (2,))
    assert rebuilt.chat_template == CHATML and not rebuilt.add_bos


def test_transformers_reads_the_exported_byte_level_tokenizer(tmp_path, byte_level_folder):  # noqa: F811
    config, params = load_hf(tiny_hf_folder(tmp_path / "hf", "llama3_gqa", byte_level_folder))
    path = save_gguf(config, params, tmp_path / "m.gguf", dtype="f32", tokenizer=tmp_path / "hf")
    original = Tokenizer.from_file(str(byte_level_folder / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS + _passages():
        assert theirs(text, add_special_tokens=True)["input_ids"] == original.encode(text).ids, text
    assert theirs.chat_template == CHATML


@pytest.mark.parametrize("which", ["small", "chat"])
def test_sentencepiece_tokenizer_survives_gguf_metadata(tmp_path, small_tokenizer, chat_tokenizer, which):  # noqa: F811
    sentencepiece = small_tokenizer if which == "small" else chat_tokenizer
    values = tokenizer_metadata(sentencepiece.path, sentencepiece.vocab_size)
    assert values["tokenizer.ggml.model"][0] == "llama"
    rebuilt = tokenizer_from_gguf(_plain(values))
    assert (rebuilt.bos_id, rebuilt.eos_id, rebuilt.add_bos) == (sentencepiece.bos_id, sentencepiece.eos_id, True)
    texts = [t for t in TEXTS if "<|" not in t] + _passages()
    for text in texts:
        ids = rebuilt.tokenizer.encode(text).ids
        assert ids == sentencepiece.encode(text, bos=True), text
        assert rebuilt.tokenizer.decode(ids) == sentencepiece.decode(ids), text
    # transformers' tokenizer read from a GGUF written with it agrees too. (Not on text starting with
    # a space, nor around user-defined pieces: llama.cpp, whose rules llamax follows, restarts the
    # "▁" prefix after them; sentencepiece and transformers each do otherwise. See the llama.cpp test.)
    config, params = load_hf(tiny_hf_folder(tmp_path / "hf", "llama2_mha", vocab_size=sentencepiece.vocab_size))
    path = save_gguf(config, params, tmp_path / "m.gguf", dtype="f32", tokenizer=sentencepiece.path)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in texts:
        if text.strip() == text:
            assert theirs(text)["input_ids"] == rebuilt.tokenizer.encode(text).ids, text


@pytest.mark.slow
def test_smollm2_tokenizer_encodes_like_transformers(smollm2_path):  # noqa: F811
    ours = tokenizer_from_gguf(smollm2_path)
    theirs = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    chat = theirs.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                      add_generation_prompt=True)
    for text in TEXTS + _passages() + [chat]:
        ids = ours.tokenizer.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ours.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id, ours.stop_ids) == (1, 2, 2, 0, (2,))
    assert ours.chat_template == theirs.chat_template and ours.tokenizer.id_to_token(2) == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_tokenizer_round_trips_through_hf_files(tmp_path, smollm2_path):  # noqa: F811
    """GGUF -> tokenizer.json + tokenizer_config.json (what a GGUF -> HF/orbax conversion writes)
    -> GGUF metadata gives back the file's own tokenizer; transformers reads the folder alike."""
    from llamax.convert.gguf import open_gguf
    original = read_tokenizer_metadata(open_gguf(smollm2_path))
    write_hf_tokenizer(tokenizer_from_gguf(original), tmp_path)
    values = _plain(tokenizer_metadata(tmp_path, len(original["tokenizer.ggml.tokens"])))
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id",
                "padding_token_id", "unknown_token_id", "add_bos_token"):
        assert values[f"tokenizer.ggml.{key}"] == original[f"tokenizer.ggml.{key}"], key
    assert values["tokenizer.chat_template"] == original["tokenizer.chat_template"]
    folder_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ours = tokenizer_from_gguf(original)
    for text in TEXTS:
        assert folder_tokenizer(text)["input_ids"] == ours.tokenizer.encode(text).ids, text


def test_find_tokenizer_follows_a_run_to_its_init_from(tmp_path, byte_level_folder):  # noqa: F811
    from llamax.run_dir import RunDir

    config, params = load_hf(tiny_hf_folder(tmp_path / "hf", "llama3_gqa", byte_level_folder))
    gguf_file = save_gguf(config, params, tmp_path / "base.gguf", dtype="f32", tokenizer=tmp_path / "hf")
    run = tmp_path / "run"  # a run that recorded where it started, but no tokenizer of its own
    RunDir(run).commit(config, init_from=str(gguf_file))
    (run / "checkpoints" / "100" / "state").mkdir(parents=True)  # a step folder
    assert find_tokenizer(gguf_file) == gguf_file
    assert find_tokenizer(run) == gguf_file
    assert find_tokenizer(run / "checkpoints" / "100") == gguf_file
    assert find_tokenizer(byte_level_folder) == byte_level_folder
    RunDir(run).commit(config, init_from=str(tmp_path / "hf"))
    assert find_tokenizer(run) == tmp_path / "hf"
    RunDir(run).commit(config, tokenizer=byte_level_folder, resuming=True)  # kept its own copy
    assert find_tokenizer(run / "checkpoints") == run / "tokenizer"
    with pytest.raises(DataError, match="--tokenizer"):
        find_tokenizer(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (docs/conversion.md: GGUF)")
def test_llama_cpp_tokenizes_exports_like_llamax(tmp_path, byte_level_folder, chat_tokenizer):  # noqa: F811
    """llama.cpp's own tokenizer on llamax's exports, SentencePiece (with user-defined pieces) and
    byte-level alike, equals the tokenizer llamax rebuilds from the same file."""
    import llama_cpp
    for name, tokenizer, vocab in (("spm", chat_tokenizer.path, chat_tokenizer.vocab_size),
                                   ("bpe", byte_level_folder, 320)):
        config, params = load_hf(tiny_hf_folder(tmp_path / name, "llama2_mha", vocab_size=vocab))
        path = save_gguf(config, params, tmp_path / f"{name}.gguf", dtype="f32", tokenizer=tokenizer)
        ours = tokenizer_from_gguf(path)
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        for text in TEXTS + _passages() + ["<|start_header_id|>user<|end_header_id|>\n\nHi there"]:
            theirs = llm.tokenize(text.encode(), add_bos=ours.add_bos, special=True)
            assert theirs == ours.tokenizer.encode(text).ids, (name, text)


def test_load_tokenizer_reads_a_gguf_and_a_run_keeps_it_as_tokenizer_json(tmp_path, byte_level_folder):  # noqa: F811
    """`load_tokenizer(model.gguf)` is the one loader every CLI uses; a run started on a .gguf
    tokenizer records tokenizer.json files (not a copy of the whole weights file)."""
    from llamax.run_dir import RunDir
    from llamax.tokenizer import load_tokenizer

    config, params = load_hf(tiny_hf_folder(tmp_path / "hf", "llama3_gqa", byte_level_folder))
    path = save_gguf(config, params, tmp_path / "m.gguf", dtype="f32", tokenizer=tmp_path / "hf")
    original = Tokenizer.from_file(str(byte_level_folder / "tokenizer.json"))
    loaded = load_tokenizer(path)
    for text in TEXTS + _passages()[:3]:
        assert loaded.encode(text, bos=False, allow_special=True) == original.encode(text, add_special_tokens=False).ids, text
    assert loaded.chat_template == CHATML and 2 in loaded.stop_ids
    run = RunDir(tmp_path / "run")
    run.commit(config, tokenizer=path)
    copied = run.tokenizer()
    assert sorted(p.name for p in copied.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert load_tokenizer(copied).encode(TEXTS[0], bos=False) == loaded.encode(TEXTS[0], bos=False)
