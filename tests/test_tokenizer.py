"""SentencePiece tokenizer: training, LLaMA conventions, byte-fallback round trips, errors."""
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_fixtures import small_tokenizer  # noqa: F401  (session fixture)
from experiments import tokenizer as tokenizer_cli
from llamax.data import corpus
from llamax.errors import DataError
from llamax.tokenizer import Tokenizer, check_vocab, train_tokenizer

META_SPACE = "\u2581"  # SentencePiece's space symbol; as input text it decodes to " "


def test_llama_conventions(small_tokenizer):
    tok = small_tokenizer
    assert tok.vocab_size == 512
    assert (tok.id_to_piece(0), tok.bos_id, tok.eos_id, tok.pad_id) == ("<unk>", 1, 2, 0)
    assert tok.id_to_piece(3) == "<0x00>"  # byte pieces follow the control pieces, as in LLaMA


def test_encode_flags_and_batch(small_tokenizer):
    tok = small_tokenizer
    plain = tok.encode("To be, or not to be", bos=False)
    assert tok.encode("To be, or not to be") == [tok.bos_id] + plain
    assert tok.encode("To be, or not to be", bos=True, eos=True) == [tok.bos_id] + plain + [tok.eos_id]
    texts = ["Now is the winter", "", "of our discontent\n"]
    assert tok.encode_batch(texts, bos=True, eos=True) == [tok.encode(t, True, True) for t in texts]


@pytest.mark.parametrize("text", ["Héllo wörld", "emoji 😀🎭 and 世界", "tabs\tand\n\nnewlines  ",
                                  "  leading spaces", "digits 0123456789", ""])
def test_round_trip_with_byte_fallback(small_tokenizer, text):
    ids = small_tokenizer.encode(text, bos=True, eos=True)
    assert all(0 <= i < small_tokenizer.vocab_size for i in ids)
    assert small_tokenizer.decode(ids) == text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=META_SPACE),
               max_size=40))
def test_round_trip_any_unicode(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_train_on_full_train_split_is_fast(tmp_path):
    start = time.perf_counter()
    path = corpus.write_corpus(tmp_path / "corpus", fmt="txt")["train"]
    tok = train_tokenizer([path], tmp_path / "tok" / "tokenizer.model", vocab_size=2048)
    assert time.perf_counter() - start < 20
    assert tok.vocab_size == 2048 and (tmp_path / "tok" / "tokenizer.vocab").exists()
    # A real vocabulary: common words are single pieces.
    assert len(tok.encode("the king", bos=False)) == 2


def test_training_is_deterministic(tmp_path):
    source = tmp_path / "a.txt"
    source.write_text(corpus.read_play(corpus.shakespeare_files("validation")[0]))
    first = train_tokenizer([source], tmp_path / "1.model", 400)
    second = train_tokenizer([source], tmp_path / "2.model", 400)
    assert (tmp_path / "1.model").read_bytes() == (tmp_path / "2.model").read_bytes()
    assert first.vocab_size == second.vocab_size == 400


def test_user_defined_symbols_are_single_pieces(tmp_path):
    source = tmp_path / "a.txt"
    source.write_text(corpus.read_play(corpus.shakespeare_files("validation")[0]))
    tok = train_tokenizer([source], tmp_path / "t.model", 400, user_defined_symbols=["<|eot_id|>"])
    ids = tok.encode("done<|eot_id|>", bos=False)
    assert tok.id_to_piece(ids[-1]) == "<|eot_id|>"


def test_cli_writes_model(tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text(corpus.read_play(corpus.shakespeare_files("validation")[1]))
    assert tokenizer_cli.main(["--input", str(source), "--output", str(tmp_path / "o"),
                               "--vocab_size", "400"]) == 0
    assert Tokenizer(tmp_path / "o" / "tokenizer.model").vocab_size == 400
    assert "wrote" in capsys.readouterr().out


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert tokenizer_cli.main(["--input", str(tmp_path / "empty.txt"), "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "o" / "tokenizer.model").exists()


def test_check_vocab(small_tokenizer):
    check_vocab(small_tokenizer, 512)
    check_vocab(small_tokenizer, 640)
    with pytest.raises(DataError, match=r"512 pieces but the model's vocab_size is 256"):
        check_vocab(small_tokenizer, 256)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*experiments\.tokenizer"):
        Tokenizer(tmp_path / "nope.model")


def test_corrupt_tokenizer_file(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x08\x96\x01not a model at all")
    with pytest.raises(DataError, match="could not load"):
        Tokenizer(bad)


def test_llama3_tiktoken_file_is_recognised(tmp_path):
    tiktoken = tmp_path / "tokenizer.model"
    tiktoken.write_text("IQ== 0\nIg== 1\nIw== 2\n")
    with pytest.raises(DataError, match="tiktoken"):
        Tokenizer(tiktoken)


@pytest.mark.parametrize("vocab_size, files, match", [
    (100, ["ok"], "too small"), (512, [], "no input files"), (512, ["missing"], "does not exist")])
def test_train_tokenizer_bad_input(tmp_path, vocab_size, files, match):
    (tmp_path / "ok").write_text("some text\n")
    with pytest.raises(DataError, match=match):
        train_tokenizer([tmp_path / f for f in files], tmp_path / "t.model", vocab_size)


def test_train_tokenizer_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        train_tokenizer([tmp_path / "empty.txt"], tmp_path / "t.model", 512)
