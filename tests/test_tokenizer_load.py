"""load_tokenizer: one entry point for every kind, and one clear DataError for each bad input."""
import base64
import json
import shutil

import pytest
import tokenizers

from data_fixtures import small_tokenizer  # noqa: F401  (session fixture)
from llama3_assets import BOS_ID, EOT_ID, VOCAB_SIZE, llama3_tokenizer_dir  # noqa: F401
from llamax.errors import DataError
from llamax.tokenizer import HFTokenizer, TiktokenTokenizer, Tokenizer, check_vocab, load_tokenizer


def _copy(llama3_tokenizer_dir, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(llama3_tokenizer_dir, folder)
    return folder


def test_every_kind_from_a_file_or_folder(small_tokenizer, llama3_tokenizer_dir, tmp_path):
    assert isinstance(load_tokenizer(small_tokenizer.path), Tokenizer)
    assert isinstance(load_tokenizer(small_tokenizer.path.parent), Tokenizer)
    assert isinstance(load_tokenizer(llama3_tokenizer_dir), HFTokenizer)
    assert isinstance(load_tokenizer(llama3_tokenizer_dir / "tokenizer.json"), HFTokenizer)
    assert isinstance(load_tokenizer(llama3_tokenizer_dir / "original"), TiktokenTokenizer)
    sp = load_tokenizer(small_tokenizer.path)
    assert (sp.stop_ids, sp.pad_id, sp.chat_template) == ((sp.eos_id,), 0, None)
    # A tokenizer.model beside HF metadata takes the folder's template and generation eos ids.
    folder = tmp_path / "sp"
    folder.mkdir()
    shutil.copy(small_tokenizer.path, folder / "tokenizer.model")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    sp = load_tokenizer(folder)
    assert sp.stop_ids == (2, 7)
    assert sp.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


def test_in_memory_hf_tokenizer_matches_the_folder(llama3_tokenizer_dir):
    backend = tokenizers.Tokenizer.from_file(str(llama3_tokenizer_dir / "tokenizer.json"))
    in_memory = HFTokenizer(backend, bos_id=BOS_ID, eos_id=EOT_ID, stop_ids=[1025])
    folder = load_tokenizer(llama3_tokenizer_dir)
    text = "Good night, sweet prince <|eot_id|> 😀"
    assert in_memory.encode(text) == folder.encode(text) and in_memory.add_bos
    assert in_memory.encode(text, allow_special=True) == folder.encode(text, allow_special=True)
    assert in_memory.stop_ids == (EOT_ID, 1025, 1032) and in_memory.path is None
    assert in_memory.template_variables() == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    assert HFTokenizer(backend, bos_id=BOS_ID, eos_id=EOT_ID, add_bos=False).encode("a") == [64]
    with pytest.raises(DataError, match="the tokenizer: pad_id 5000 is not an id"):
        HFTokenizer(backend, bos_id=BOS_ID, eos_id=EOT_ID, pad_id=5000)


def test_check_vocab_for_every_kind(small_tokenizer, llama3_tokenizer_dir):
    backend = tokenizers.Tokenizer.from_file(str(llama3_tokenizer_dir / "tokenizer.json"))
    for tokenizer, name in [(load_tokenizer(llama3_tokenizer_dir), "llama3_tokenizer"),
                            (load_tokenizer(llama3_tokenizer_dir / "original"), "tokenizer.model"),
                            (HFTokenizer(backend, bos_id=BOS_ID, eos_id=EOT_ID), "HFTokenizer")]:
        check_vocab(tokenizer, VOCAB_SIZE)
        with pytest.raises(DataError, match=rf"{name} has 1280 pieces but the model's vocab_size is "
                                            r"1024.*vocab_size >= 1280 \(e\.g\. 1280\)"):
            check_vocab(tokenizer, 1024)
    with pytest.raises(DataError, match="512 pieces but the model's vocab_size is 256"):
        check_vocab(small_tokenizer, 256)


@pytest.mark.parametrize("bad_ids", [[1, 1280], [-1], [1.0], [True], ["7"]])
def test_decode_refuses_ids_outside_the_vocabulary(llama3_tokenizer_dir, bad_ids):
    for tokenizer in (load_tokenizer(llama3_tokenizer_dir), load_tokenizer(llama3_tokenizer_dir / "original")):
        with pytest.raises(DataError, match=r"\.decode: id .* is not an integer in \[0, 1280\)"):
            tokenizer.decode(bad_ids)


def test_lone_surrogates_and_non_strings_are_refused(small_tokenizer, llama3_tokenizer_dir):
    for tokenizer in (small_tokenizer, load_tokenizer(llama3_tokenizer_dir),
                      load_tokenizer(llama3_tokenizer_dir / "original")):
        with pytest.raises(DataError, match="lone surrogate"):
            tokenizer.encode("bad \udc80 text")
        with pytest.raises(DataError, match=r"text 1: .*lone surrogate"):
            tokenizer.encode_batch(["fine", "bad \ud800"])
        with pytest.raises(DataError, match="expected str, got bytes"):
            tokenizer.encode(b"bytes")


def _tiktoken_lines(count=256):
    return [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(count)]


@pytest.mark.parametrize("lines, match", [
    (_tiktoken_lines()[:5] + ["!!notbase64!! 5"], r"tokenizer\.model:6: not a tiktoken BPE line"),
    (["QUJD x"] + _tiktoken_lines(), r"tokenizer\.model:1: not a tiktoken BPE line"),
    (_tiktoken_lines()[:5] + ["QUJD"], r":6: not a tiktoken BPE line"),
    (_tiktoken_lines()[:5] + ["QUJD five"], r":6: not a tiktoken BPE line"),
    (_tiktoken_lines()[:5] + ["QUJD 3"], r":6: rank 3 appears twice"),
    (_tiktoken_lines()[:5] + ["AA== 5"], r":6: token b'\\x00' appears twice"),
    (_tiktoken_lines() + ["QUJD 300"], r"ranks are not 0\.\.256"),
    (_tiktoken_lines(200), r"56 single bytes .* have no rank"),
])
def test_corrupt_tiktoken_files(tmp_path, lines, match):
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match):
        load_tokenizer(path)
    with pytest.raises(DataError, match="tiktoken BPE table"):  # the SentencePiece class says what it is
        Tokenizer(path)


def test_wordpiece_tokenizer_json_is_refused(tmp_path):
    wordpiece = tokenizers.Tokenizer(tokenizers.models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match=r"tokenizer\.json holds a WordPiece tokenizer; llamax reads BPE"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="is a WordPiece model"):
        HFTokenizer(wordpiece, bos_id=None, eos_id=0)


@pytest.mark.parametrize("edit, match", [
    (lambda f: (f / "tokenizer.json").write_text("{not json"), r"is not a Hugging Face tokenizer\.json"),
    (lambda f: (f / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}'),
     "tokenizers could not load"),
    (lambda f: _edit_json(f / "tokenizer_config.json", eos_token="<|im_end|>"),
     r"eos_token '<\|im_end\|>' is not in tokenizer\.json's vocabulary"),
    (lambda f: _edit_json(f / "tokenizer_config.json", bos_token=7), "bos_token must be a string"),
    (lambda f: _edit_json(f / "generation_config.json", eos_token_id=[1025, 99999]),
     r"stop_ids 99999 is not an id in \[0, 1280\)"),
    (lambda f: _edit_json(f / "generation_config.json", eos_token_id="eot"), "must be a non-negative integer"),
    (lambda f: (f / "special_tokens_map.json").write_text("[]"), "must hold a JSON object"),
])
def test_bad_hf_folders_get_one_clear_error(llama3_tokenizer_dir, tmp_path, edit, match):
    folder = _copy(llama3_tokenizer_dir, tmp_path)
    edit(folder)
    with pytest.raises(DataError, match=match):
        load_tokenizer(folder)


def test_eos_from_generation_config_when_the_config_names_none(llama3_tokenizer_dir, tmp_path):
    folder = _copy(llama3_tokenizer_dir, tmp_path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    tokenizer = load_tokenizer(folder)
    assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.chat_template) == (1025, BOS_ID, None)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]).startswith(
        "<|begin_of_text|><|start_header_id|>user")  # built-in Llama-3 template
    (folder / "generation_config.json").unlink()
    with pytest.raises(DataError, match="names no EOS token"):
        load_tokenizer(folder)


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, r"holds neither tokenizer\.json .* nor tokenizer\.model"),
])
def test_missing_tokenizers(tmp_path, make, match):
    with pytest.raises(DataError, match=match):
        load_tokenizer(make(tmp_path))


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_llama2_style_hf_folder_matches_transformers(small_tokenizer, tmp_path):
    # transformers converts a SentencePiece model to a Llama-2-style tokenizer.json (Metaspace,
    # byte-fallback BPE, a <s> post-processor): the layout of meta-llama/Llama-2-7b-hf.
    transformers = pytest.importorskip("transformers")
    source = tmp_path / "slow"
    source.mkdir()
    shutil.copy(small_tokenizer.path, source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "legacy": False}))
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "fast")
    hub = transformers.AutoTokenizer.from_pretrained(tmp_path / "fast")
    ours = load_tokenizer(tmp_path / "fast")
    assert isinstance(ours, HFTokenizer) and ours.add_bos
    assert (ours.bos_id, ours.eos_id, ours.stop_ids) == (1, 2, (2,))
    for text in ["Hello world", "  two  spaces\n\nnew", "emoji 😀 東京", "", "<s> x </s>", " lead"]:
        assert ours.encode(text) == hub(text, split_special_tokens=True)["input_ids"]
        assert ours.encode(text, bos=False, allow_special=True) == hub(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ours.encode(text)) == hub.decode(hub(text, split_special_tokens=True)["input_ids"])
    conversation = [{"role": "user", "content": "Who art thou?"}, {"role": "assistant", "content": "Horatio."}]
    text = ours.apply_chat_template(conversation)  # no template in the folder: the built-in Llama-2 one
    assert text == "<s>[INST] Who art thou? [/INST] Horatio. </s>"
    ids = ours.encode(text, bos=False, allow_special=True)
    assert ids == hub(text, add_special_tokens=False)["input_ids"] and ids[0] == 1 and ids[-1] == 2
