"""Llama-3-format tokenizers (tiktoken file and HF tokenizer.json) against tiktoken and transformers.

The references are built here from the files alone, the way their owners build them: tiktoken's
`load_tiktoken_bpe` + Meta's pattern and special-token list (Meta's llama-models tokenizer.py),
transformers' `AutoTokenizer.from_pretrained(folder)` and its `TikTokenConverter`.
"""
import json

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiktoken.load import load_tiktoken_bpe

from experiments import tokenizer as tokenizer_cli
from llama3_assets import BOS_ID, END_OF_TEXT_ID, EOT_ID, VOCAB_SIZE, llama3_tokenizer_dir  # noqa: F401
from llamax.data import corpus
from llamax.tokenizer import HFTokenizer, TiktokenTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

# Meta's llama-models `Tokenizer.pat_str` and special tokens, spelled out independently of llamax.
META_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
META_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
              "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
              "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
              "<|image|>"]
META_SPECIAL = META_NAMED + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(META_NAMED))]


@pytest.fixture(scope="module")
def references(llama3_tokenizer_dir):
    ranks = load_tiktoken_bpe(str(llama3_tokenizer_dir / "original" / "tokenizer.model"))
    meta = tiktoken.Encoding("llama3", pat_str=META_PATTERN, mergeable_ranks=ranks,
                             special_tokens={t: len(ranks) + i for i, t in enumerate(META_SPECIAL)})
    hub = transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    return meta, hub


@pytest.fixture(scope="module")
def ours(llama3_tokenizer_dir):
    return (load_tokenizer(llama3_tokenizer_dir / "original" / "tokenizer.model"),
            load_tokenizer(llama3_tokenizer_dir))


def test_load_picks_the_kind_and_numbers_special_tokens_like_meta(ours):
    meta_file, hf_folder = ours
    assert isinstance(meta_file, TiktokenTokenizer) and isinstance(hf_folder, HFTokenizer)
    assert meta_file.special_tokens == {t: 1024 + i for i, t in enumerate(META_SPECIAL)}
    assert all(hf_folder.token_to_id(t) == i for t, i in meta_file.special_tokens.items())
    assert meta_file.vocab_size == hf_folder.vocab_size == VOCAB_SIZE
    assert (meta_file.bos_id, meta_file.eos_id, meta_file.pad_id) == (BOS_ID, END_OF_TEXT_ID, 1028)
    assert (hf_folder.bos_id, hf_folder.eos_id, hf_folder.pad_id) == (BOS_ID, EOT_ID, None)
    # Meta: <|end_of_text|>, <|eom_id|>, <|eot_id|>; HF: eos <|eot_id|> + generation_config's two.
    assert set(meta_file.stop_ids) == set(hf_folder.stop_ids) == {END_OF_TEXT_ID, EOT_ID, 1032}
    assert hf_folder.stop_ids[0] == EOT_ID and meta_file.stop_ids[0] == END_OF_TEXT_ID


def test_hf_files_are_what_transformers_converts_the_tiktoken_file_to(llama3_tokenizer_dir):
    from transformers.convert_slow_tokenizer import TikTokenConverter
    vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(
        str(llama3_tokenizer_dir / "original" / "tokenizer.model"))
    model = json.loads((llama3_tokenizer_dir / "tokenizer.json").read_text())["model"]
    assert model["vocab"] == vocab
    assert [tuple(m) for m in model["merges"]] == merges
    assert model["ignore_merges"] is True


@pytest.mark.slow  # ~20 s on 2 shared cores: 4.5 MB through four tokenizers
def test_whole_corpus_encodes_identically(ours, references):
    meta, hub = references
    meta_file, hf_folder = ours
    plays = [corpus.read_play(p) for split in ("train", "validation") for p in corpus.shakespeare_files(split)]
    expected = meta.encode_ordinary_batch(plays)
    assert [meta_file.encode(p, bos=False) for p in plays] == expected
    assert hf_folder.encode_batch(plays, bos=False) == expected
    assert hub(plays, add_special_tokens=False)["input_ids"] == expected
    compared = sum(map(len, expected))
    assert compared > 1_900_000  # ~2.0M tokens per reference on 42 plays
    assert [hf_folder.decode(ids) for ids in expected] == plays
    assert [meta_file.decode(ids) for ids in expected] == [meta.decode(ids) for ids in expected]
    print(f"\ncorpus: {compared} tokens equal to tiktoken, to transformers, and in both llamax tokenizers")


SPECIAL_SPELLINGS = ["<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>user<|end_header_id|>",
                     "<|reserved_special_token_7|>", "<|eot_id", "|>", "<|"]
PIECES = st.sampled_from([
    *SPECIAL_SPELLINGS, "😀", "👨‍👩‍👧", "🏳️‍🌈", "東京の空", "中文", "한국어", "e\u0301", "\u0301\u0308a",
    "  ", "\t\n", "\n\n\n", "   \n ", " \r\n", "\u00a0", "\u3000", "0123456789", "12345", "3.14",
    "'s", "'LL", "I'm", "KING HENRY.", " to be", "—", "x" * 30])
TEXT = st.lists(st.one_of(PIECES, st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)),
                max_size=14).map("".join)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEXT)
def test_any_text_encodes_like_tiktoken_and_transformers(ours, references, text):
    meta, hub = references
    meta_file, hf_folder = ours
    plain = meta.encode_ordinary(text)  # tiktoken's disallowed_special=(): specials stay text
    assert meta_file.encode(text, bos=False) == plain
    assert hf_folder.encode(text, bos=False) == plain
    assert hub(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == plain
    assert hub(text, split_special_tokens=True)["input_ids"] == hf_folder.encode(text) == [BOS_ID] + plain
    special = meta.encode(text, allowed_special="all")
    assert meta_file.encode(text, bos=False, allow_special=True) == special
    assert hf_folder.encode(text, bos=False, allow_special=True) == special
    assert hub(text, add_special_tokens=False)["input_ids"] == special
    assert meta_file.decode(plain) == hf_folder.decode(plain) == hub.decode(plain) == text
    assert meta_file.decode(special) == hf_folder.decode(special) == text


def test_bos_eos_batch_and_skip_special(ours):
    for tokenizer in ours:
        ids = tokenizer.encode("To be, or not to be", bos=False)
        assert tokenizer.encode("To be, or not to be", bos=True, eos=True) == [BOS_ID] + ids + [tokenizer.eos_id]
        texts = ["Now is the winter", "", "of our <|eot_id|> discontent\n"]
        assert tokenizer.encode_batch(texts, bos=True, eos=True) == [tokenizer.encode(t, True, True) for t in texts]
        assert tokenizer.encode_batch(texts, allow_special=True) == [
            tokenizer.encode(t, allow_special=True) for t in texts]
        marked = tokenizer.encode("Hamlet<|eot_id|>", allow_special=True)
        assert marked[-1] == EOT_ID
        assert tokenizer.decode(marked) == "<|begin_of_text|>Hamlet<|eot_id|>"
        assert tokenizer.decode(marked, skip_special=True) == "Hamlet"


def test_long_runs_are_cut_like_metas_encode(ours, references):
    # Meta's encode splits runs of > 25k non-whitespace characters (tiktoken's regex would
    # overflow); llamax's TiktokenTokenizer does the same and still round-trips.
    meta_file, _ = ours
    text = "ab" * 20_000 + " tail"
    ids = meta_file.encode(text, bos=False)
    meta, _ = references
    assert ids == meta.encode_ordinary(text[:25_000]) + meta.encode_ordinary(text[25_000:])
    assert meta_file.decode(ids) == text


def test_llama3_0_folder_gets_llama3_0_names(llama3_tokenizer_dir, tmp_path):
    meta_dir = tmp_path / "Meta-Llama-3-8B"
    meta_dir.mkdir()
    (meta_dir / "tokenizer.model").write_bytes(
        (llama3_tokenizer_dir / "original" / "tokenizer.model").read_bytes())
    (meta_dir / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    llama3_0 = load_tokenizer(meta_dir)
    assert llama3_0.pad_id is None and "<|eom_id|>" not in llama3_0.special_tokens
    assert llama3_0.special_tokens["<|reserved_special_token_4|>"] == 1032
    assert set(llama3_0.stop_ids) == {END_OF_TEXT_ID, EOT_ID}
    (meta_dir / "params.json").write_text(json.dumps({"dim": 64, "use_scaled_rope": True}))
    assert load_tokenizer(meta_dir).special_tokens["<|eom_id|>"] == 1032


def test_cli_writes_a_llama3_folder(tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text(corpus.read_play(corpus.shakespeare_files("validation")[1]))
    out = tmp_path / "tok"
    assert tokenizer_cli.main(["--format", "llama3", "--input", str(source), "--output", str(out),
                               "--vocab_size", "400"]) == 0
    folder, meta_file = load_tokenizer(out), load_tokenizer(out / "original" / "tokenizer.model")
    assert folder.vocab_size == meta_file.vocab_size == 656 and folder.bos_id == 400
    text = "Thou art a villain <|eot_id|>"
    assert folder.encode(text) == meta_file.encode(text)
    assert sorted(p.name for p in out.iterdir()) == [
        "generation_config.json", "original", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]
    assert tokenizer_cli.main(["--format", "llama3", "--input", str(tmp_path / "missing.txt"),
                               "--output", str(tmp_path / "bad")]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "bad" / "tokenizer.json").exists()
