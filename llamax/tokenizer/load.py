"""`load_tokenizer(path)`: the right tokenizer for a file or checkpoint folder.

    a folder with tokenizer.json          -> HFTokenizer (HF checkpoint: Llama-3 hub folders, ...)
    a folder with tokenizer.model         -> by content, as for the file (Meta folders, LLaMA-1/2)
    tokenizer.json (any *.json)           -> HFTokenizer, with the metadata files beside it
    a tiktoken BPE file                   -> TiktokenTokenizer (Meta's Llama-3 tokenizer.model)
    a .gguf file                          -> HFTokenizer rebuilt from its tokenizer.ggml.* metadata
    any other file                        -> Tokenizer (SentencePiece; LLaMA-1/2, ours)

A tokenizer.model picks up the folder's chat template and generation_config.json stop ids too.
In a Meta folder, params.json tells Llama 3 from 3.1+: Meta's 3.1 params carry `use_scaled_rope`
and its tokenizer names `<|eom_id|>`, `<|python_tag|>`, `<|finetune_right_pad_id|>`; a bare
tiktoken file gets the 3.1 names (Meta's current code). Ids of the common tokens are the same.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from llamax.errors import DataError
from llamax.tokenizer import chat
from llamax.tokenizer.files import (META_PARAMS, TOKENIZER_JSON, TOKENIZER_MODEL, read_folder_metadata,
                                    read_json)
from llamax.tokenizer.hf import HFTokenizer
from llamax.tokenizer.sentencepiece import Tokenizer
from llamax.tokenizer.tiktoken_bpe import (LLAMA3_1_SPECIAL_TOKENS, LLAMA3_SPECIAL_TOKENS,
                                           TiktokenTokenizer, looks_like_tiktoken)

AnyTokenizer = Union[Tokenizer, TiktokenTokenizer, HFTokenizer]


def load_tokenizer(path: str | os.PathLike) -> AnyTokenizer:
    """The tokenizer stored at `path`: a tokenizer file or a checkpoint folder (see module doc).

    All three kinds share one interface (`llamax.tokenizer.base`).

    Raises:
        DataError: nothing readable at `path`, or the file is corrupt or of an unsupported kind.
    """
    path = Path(path)
    if path.is_dir():
        if (path / TOKENIZER_JSON).is_file():
            return HFTokenizer.from_pretrained(path)
        if (path / TOKENIZER_MODEL).is_file():
            return _load_model_file(path / TOKENIZER_MODEL)
        raise DataError(f"{path} holds neither {TOKENIZER_JSON} (Hugging Face) nor {TOKENIZER_MODEL} "
                        "(Meta / SentencePiece); pass the tokenizer file or the checkpoint folder that "
                        "has one")
    if not path.is_file():
        raise DataError(f"tokenizer path {str(path)!r} does not exist. Pass a checkpoint folder, a "
                        "tokenizer.json, a tokenizer.model, or train one with "
                        "`python -m experiments.tokenizer --shakespeare --output DIR`")
    if path.suffix == ".json":
        return HFTokenizer.from_pretrained(path)
    if path.suffix == ".gguf":
        from llamax.tokenizer.gguf import tokenizer_from_gguf

        rebuilt = tokenizer_from_gguf(path)
        return HFTokenizer(rebuilt.tokenizer, bos_id=rebuilt.bos_id, eos_id=rebuilt.eos_id,
                           pad_id=rebuilt.pad_id, stop_ids=rebuilt.stop_ids,
                           chat_template=rebuilt.chat_template, add_bos=rebuilt.add_bos, path=path)
    return _load_model_file(path)


def _load_model_file(path: Path) -> AnyTokenizer:
    """A tiktoken or SentencePiece `tokenizer.model`, with the metadata of its folder."""
    with open(path, "rb") as f:
        head = f.read(512)
    meta = read_folder_metadata(path.parent)
    if meta.chat_template is not None:
        try:
            chat.compile_template(meta.chat_template)
        except DataError as error:
            raise DataError(f"{path.parent}: {error}") from error
    if looks_like_tiktoken(head):
        special_tokens = LLAMA3_1_SPECIAL_TOKENS
        params_path = path.parent / META_PARAMS
        if params_path.is_file() and "use_scaled_rope" not in read_json(params_path):
            special_tokens = LLAMA3_SPECIAL_TOKENS
        return TiktokenTokenizer(path, special_tokens=special_tokens, chat_template=meta.chat_template,
                                 extra_stop_ids=meta.eos_ids)
    return Tokenizer(path, chat_template=meta.chat_template, extra_stop_ids=meta.eos_ids)
