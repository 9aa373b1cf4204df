"""Shared data-test helpers: one small tokenizer trained per test session, toy documents.

Import the fixture into a test module with `from data_fixtures import small_tokenizer`.
"""
from __future__ import annotations

import pytest

from llamax.data import corpus
from llamax.tokenizer import Tokenizer, train_tokenizer

SMALL_VOCAB = 512
LLAMA3_MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _train_once(tmp_path_factory, name: str, **kwargs) -> Tokenizer:
    # Session-wide cache on disk: every test module that imports the fixture reuses the file.
    out = tmp_path_factory.getbasetemp() / f"data_tokenizer_{name}" / "tokenizer.model"
    if out.exists():
        return Tokenizer(out)
    text = "".join(corpus.read_play(p) for p in corpus.shakespeare_files("train")[:3])
    source = out.parent / "train.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(text, encoding="utf-8")
    return train_tokenizer([source], out, SMALL_VOCAB, **kwargs)


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Tokenizer:
    """A 512-piece BPE tokenizer trained on three plays (well under a second)."""
    return _train_once(tmp_path_factory, "plain")


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory) -> Tokenizer:
    """Like `small_tokenizer`, with the Llama-3 header markers as single pieces."""
    return _train_once(tmp_path_factory, "chat", user_defined_symbols=LLAMA3_MARKERS)
