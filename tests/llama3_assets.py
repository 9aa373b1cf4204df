"""A genuine Llama-3-format tokenizer, trained once per test session on the Shakespeare corpus.

    from llama3_assets import llama3_tokenizer_dir  # noqa: F401  (session fixture)

`llama3_tokenizer_dir` is a folder laid out like a hub Llama-3.1-Instruct repository
(`llamax.tokenizer.train_llama3`): tokenizer.json, tokenizer_config.json (Llama-3 chat template,
bos `<|begin_of_text|>`, eos `<|eot_id|>`), special_tokens_map.json, generation_config.json
(eos ids [`<|end_of_text|>`, `<|eot_id|>`]) and Meta's tiktoken file original/tokenizer.model.
1024 base tokens + 256 special tokens: `<|begin_of_text|>` = 1024, `<|end_of_text|>` = 1025,
`<|eot_id|>` = 1033; vocab_size 1280. Copy it into a model folder to make a Llama-3 checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from llamax.data import corpus
from llamax.tokenizer.train_llama3 import train_llama3_tokenizer

BASE_VOCAB = 1024
VOCAB_SIZE = BASE_VOCAB + 256
BOS_ID, END_OF_TEXT_ID, EOT_ID = 1024, 1025, 1033


def build_llama3_tokenizer(out: Path) -> Path:
    """Trains the tokenizer on the Shakespeare train split into `out` (about 2 s)."""
    text = out / "train.txt"
    out.mkdir(parents=True, exist_ok=True)
    text.write_text("".join(corpus.read_play(p) for p in corpus.shakespeare_files("train")),
                    encoding="utf-8")
    train_llama3_tokenizer([text], out, BASE_VOCAB)
    text.unlink()
    return out


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory) -> Path:
    """The Llama-3-format tokenizer folder (see module doc); built once per session."""
    out = tmp_path_factory.getbasetemp() / "llama3_tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    return build_llama3_tokenizer(out)
