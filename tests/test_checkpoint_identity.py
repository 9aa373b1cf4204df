"""A checkpoint's tokenizer and special ids (`llamax.convert.identity`, `llamax.run_dir`,
`llamax.tokenizer.SpecialIds`): every kind of tokenizer a run can record loads back as the
original, ids read from every place HF keeps them, and bad input fails with one clear error."""
import json
import shutil

import pytest

from hf_models import make_hf_model
from llama3_assets import BOS_ID, END_OF_TEXT_ID, EOT_ID, llama3_tokenizer_dir  # noqa: F401
from llamax.config import ModelConfig
from llamax.convert.hub import convert
from llamax.convert.identity import CheckpointIdentity, checkpoint_tokenizer, read_identity, training_identity
from llamax.errors import CheckpointError, ConfigError, DataError
from llamax.run_dir import RunDir, read_special_ids
from llamax.tokenizer import SpecialIds, TiktokenTokenizer, Tokenizer, load_tokenizer, train_tokenizer
from llamax.tokenizer.files import tokenizer_files

TEXT = "ROMEO. But soft! what light <|eot_id|> through yonder window breaks? 1234 naïve"
CONFIG = ModelConfig(vocab_size=1280, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                     num_kv_heads=2)


def _sentencepiece(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"But soft, what light {i} through yonder window breaks" for i in range(300)))
    return train_tokenizer([text], tmp_path / "sp" / "shakespeare.model", vocab_size=300).path


def _meta_llama3_folder(tmp_path, tokenizer_dir):
    """Meta's Llama-3 (not 3.1) layout: tiktoken tokenizer.model + a params.json without
    use_scaled_rope, which names ids 1028.. <|reserved_special_token_N|> instead of 3.1's names."""
    folder = tmp_path / "meta"
    folder.mkdir()
    shutil.copyfile(tokenizer_dir / "original" / "tokenizer.model", folder / "tokenizer.model")
    (folder / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    return folder


@pytest.mark.parametrize("kind", ["sentencepiece_file", "meta_tiktoken_folder", "hf_folder", "tiktoken_file"])
def test_a_run_records_every_kind_of_tokenizer_so_it_loads_as_the_original(kind, tmp_path,
                                                                           llama3_tokenizer_dir):  # noqa: F811
    source = {"sentencepiece_file": lambda: _sentencepiece(tmp_path),
              "meta_tiktoken_folder": lambda: _meta_llama3_folder(tmp_path, llama3_tokenizer_dir),
              "hf_folder": lambda: llama3_tokenizer_dir,
              "tiktoken_file": lambda: llama3_tokenizer_dir / "original" / "tokenizer.model"}[kind]()
    identity = training_identity(str(source), None)
    run = RunDir(tmp_path / "run")
    run.commit(CONFIG, tokenizer=identity.tokenizer, special_ids=identity.special_ids)
    original, copy = load_tokenizer(source), load_tokenizer(run.tokenizer())
    assert type(copy) is type(original)
    assert copy.encode(TEXT) == original.encode(TEXT)
    assert copy.encode(TEXT, allow_special=True) == original.encode(TEXT, allow_special=True)
    assert (copy.bos_id, copy.eos_id, copy.stop_ids, copy.vocab_size) == \
        (original.bos_id, original.eos_id, original.stop_ids, original.vocab_size)
    assert copy.decode(range(copy.vocab_size)) == original.decode(range(original.vocab_size))
    assert copy.apply_chat_template([{"role": "user", "content": "Hi"}], True) == \
        original.apply_chat_template([{"role": "user", "content": "Hi"}], True)
    assert read_identity(run.path).special_ids == read_special_ids(run.path) == identity.special_ids
    if kind == "hf_folder":  # generation_config.json's eos list, in its order
        assert identity.special_ids == SpecialIds(BOS_ID, (END_OF_TEXT_ID, EOT_ID), None)
    elif kind == "sentencepiece_file":  # LLaMA's ids, and no pad piece (not the <unk> fallback)
        assert isinstance(copy, Tokenizer) and identity.special_ids == SpecialIds(1, (2,), None)
    else:
        assert isinstance(copy, TiktokenTokenizer) and identity.special_ids.bos_id == BOS_ID
    # Recording again (a resumed run) replaces the copy as a whole.
    run.commit(CONFIG, tokenizer=identity.tokenizer, special_ids=identity.special_ids, resuming=True)
    assert load_tokenizer(run.tokenizer()).encode(TEXT) == original.encode(TEXT)


def test_a_tokenizer_file_is_copied_without_the_other_vocabulary_beside_it(llama3_tokenizer_dir):  # noqa: F811
    # tokenizer.json and a tokenizer.model side by side: the file given is the one that loads.
    files = tokenizer_files(llama3_tokenizer_dir / "original" / "tokenizer.model")
    assert set(files) == {"tokenizer.model"}
    assert "tokenizer.model" not in tokenizer_files(llama3_tokenizer_dir / "tokenizer.json")
    assert "original/tokenizer.model" in tokenizer_files(llama3_tokenizer_dir)


def test_special_ids_read_and_write_hf_fields():
    ids = SpecialIds.from_hf_fields({"bos_token_id": 1024, "eos_token_id": [1025, 1033, 1025]})
    assert ids == SpecialIds(1024, (1025, 1033), None)
    assert ids.hf_fields() == {"bos_token_id": 1024, "eos_token_id": [1025, 1033], "pad_token_id": None}
    assert SpecialIds(1, (2,), 0).hf_fields()["eos_token_id"] == 2  # one id: an int, as transformers writes
    assert SpecialIds.from_dict(ids.to_dict()) == ids
    assert SpecialIds(pad_id=3).filled_from(ids) == SpecialIds(1024, (1025, 1033), 3)
    with pytest.raises(DataError, match="config.json: eos_token_id must be a non-negative integer"):
        SpecialIds.from_hf_fields({"eos_token_id": ["</s>"]}, "config.json")
    with pytest.raises(DataError, match="pad_token_id must be a non-negative integer or null"):
        SpecialIds.from_hf_fields({"pad_token_id": -1})
    with pytest.raises(DataError, match="eos id 1033 is outside the model vocabulary"):
        ids.check_vocab(1030, "export")


def test_ids_come_from_generation_config_then_config_then_the_tokenizer(tmp_path, llama3_tokenizer_dir):  # noqa: F811
    folder = tmp_path / "hf"
    make_hf_model("llama3_gqa", vocab_size=1280, bos_token_id=7, eos_token_id=8, pad_token_id=9
                  ).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [8, 10]}))
    assert read_identity(folder) == CheckpointIdentity(None, SpecialIds(7, (8, 10), 9))
    (folder / "generation_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config.pop(key)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # then the tokenizer's own
        shutil.copyfile(llama3_tokenizer_dir / name, folder / name)
    tokenizer = load_tokenizer(folder)
    assert read_identity(folder).special_ids == SpecialIds(BOS_ID, tokenizer.stop_ids, None)


def test_missing_tokenizers_are_one_clear_error(tmp_path):
    folder = tmp_path / "hf"
    make_hf_model("llama3_gqa").save_pretrained(folder)
    with pytest.raises(DataError, match="has no tokenizer of its own .* pass the tokenizer .*--tokenizer"):
        checkpoint_tokenizer(folder)
    with pytest.raises(ConfigError, match="TOKENIZER macro. is unset and there is no INIT_FROM"):
        training_identity(None, None)
    with pytest.raises(ConfigError, match="TOKENIZER macro. is unset and there is no INIT_FROM"):
        training_identity(None, {"embed_tokens": {}})  # params in memory carry no tokenizer
    with pytest.raises(ConfigError, match=f"INIT_FROM={folder} has no tokenizer of its own"):
        training_identity(None, str(folder))
    with pytest.raises(ConfigError, match="INIT_FROM '/no/such' does not exist"):
        training_identity(None, "/no/such")
    with pytest.raises(DataError, match="is a checkpoint without a tokenizer"):
        training_identity(str(folder), None)


def test_an_export_ships_a_given_tokenizer_or_refuses_ids_the_model_lacks(tmp_path, llama3_tokenizer_dir):  # noqa: F811
    source = tmp_path / "hf"
    make_hf_model("llama3_gqa", vocab_size=1280).save_pretrained(source)  # ids 1/2/0, no tokenizer
    convert(source, "hf", tmp_path / "out", "hf", progress=False, tokenizer=llama3_tokenizer_dir)
    assert read_identity(tmp_path / "out").special_ids == SpecialIds(BOS_ID, (END_OF_TEXT_ID, EOT_ID), None)
    assert load_tokenizer(tmp_path / "out").encode(TEXT) == load_tokenizer(llama3_tokenizer_dir).encode(TEXT)
    small = tmp_path / "small"
    make_hf_model("llama3_gqa", vocab_size=512).save_pretrained(small)
    with pytest.raises(DataError, match="bos_id 1024 is outside the model vocabulary .0, 512."):
        convert(small, "hf", tmp_path / "bad", "orbax", progress=False, tokenizer=llama3_tokenizer_dir)
    assert not (tmp_path / "bad").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_corrupt_special_ids_file_is_named(tmp_path):
    run = RunDir(tmp_path / "run")
    run.commit(CONFIG)
    (run.path / "special_ids.json").write_text('{"bos": 1}')
    with pytest.raises(DataError, match="special_ids.json: unknown field"):
        read_special_ids(run.path)
    (run.path / "special_ids.json").write_text("{")
    with pytest.raises((ConfigError, CheckpointError), match="special_ids.json is not valid JSON"):
        read_special_ids(run.path)
