"""A checkpoint folder's tokenizer files: reading their metadata (special tokens, chat template,
stop ids) and copying a tokenizer's files together (`copy_tokenizer_files`).

Hugging Face folders spread it over several files, all optional:
  tokenizer_config.json    bos_token / eos_token / pad_token / unk_token (a string or
                           {"content": ...}), add_bos_token, chat_template (a string, or a list
                           of {"name", "template"} of which "default" is used)
  special_tokens_map.json  older spelling of the same *_token entries (used when the config lacks them)
  chat_template.jinja      where transformers 5 writes the template (wins over tokenizer_config's)
  generation_config.json   eos_token_id (an int or a list: every id that ends a generation),
                           bos_token_id, pad_token_id
  config.json              the model's bos/eos/pad_token_id (used when the above lack them)
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from llamax.errors import DataError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"
META_PARAMS = "params.json"
TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


@dataclasses.dataclass(frozen=True)
class FolderMetadata:
    """What a folder says about its tokenizer besides the vocabulary.

    Attributes:
        tokens: special-token strings by name (`bos_token`, ...), where the folder names them.
        add_bos: tokenizer_config's `add_bos_token`, or None when it does not say.
        chat_template: the Jinja template, or None.
        token_ids: `bos_token_id` / `pad_token_id` from generation_config.json or config.json.
        eos_ids: every `eos_token_id` of generation_config.json and config.json, in order.
    """

    tokens: dict[str, str] = dataclasses.field(default_factory=dict)
    add_bos: bool | None = None
    chat_template: str | None = None
    token_ids: dict[str, int] = dataclasses.field(default_factory=dict)
    eos_ids: tuple[int, ...] = ()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; DataError naming the file if it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"could not read {path} as JSON: {error}") from error
    if not isinstance(value, dict):
        raise DataError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _token_string(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if isinstance(value, str):
        return value
    raise DataError(f"{where} must be a string or {{'content': ...}}, got {value!r:.80}")


def _chat_template(value: Any, where: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and "name" in t and "template" in t
                                       for t in value):
        named = {t["name"]: t["template"] for t in value}
        if "default" not in named:
            raise DataError(f"{where} has chat templates {sorted(named)} but none named 'default'; "
                            "llamax renders the default template")
        return named["default"]
    raise DataError(f"{where}: chat_template must be a string or a list of {{name, template}}, got "
                    f"{type(value).__name__}")


def _ids(value: Any, where: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise DataError(f"{where} must be a non-negative integer or a list of them, got {value!r:.80}")
    return values


def read_folder_metadata(folder: Path) -> FolderMetadata:
    """Special tokens, chat template and generation ids from the optional files in `folder`."""
    tokens: dict[str, str] = {}
    add_bos = chat_template = None
    config_path = folder / TOKENIZER_CONFIG
    if config_path.is_file():
        config = read_json(config_path)
        for name in TOKEN_NAMES:
            token = _token_string(config.get(name), f"{config_path} {name}")
            if token is not None:
                tokens[name] = token
        if isinstance(config.get("add_bos_token"), bool):
            add_bos = config["add_bos_token"]
        chat_template = _chat_template(config.get("chat_template"), config_path)
    map_path = folder / SPECIAL_TOKENS_MAP
    if map_path.is_file():
        special_map = read_json(map_path)
        for name in TOKEN_NAMES:
            token = _token_string(special_map.get(name), f"{map_path} {name}")
            if token is not None:
                tokens.setdefault(name, token)
    template_path = folder / CHAT_TEMPLATE_FILE
    if template_path.is_file():
        chat_template = template_path.read_text(encoding="utf-8")
    token_ids: dict[str, int] = {}
    eos_ids: list[int] = []
    for name in (GENERATION_CONFIG, MODEL_CONFIG):
        path = folder / name
        if not path.is_file():
            continue
        values = read_json(path)
        eos_ids += _ids(values.get("eos_token_id"), f"{path} eos_token_id")
        for key in ("bos_token_id", "pad_token_id"):
            found = _ids(values.get(key), f"{path} {key}")
            if found:
                token_ids.setdefault(key, found[0])
    return FolderMetadata(tokens, add_bos, chat_template, token_ids, tuple(dict.fromkeys(eos_ids)))


# ---- the files of a tokenizer, copied together ------------------------------------------------

# Every file that belongs to a checkpoint's tokenizer; any that exist travel together.
TOKENIZER_FILES = (TOKENIZER_MODEL, TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP,
                   CHAT_TEMPLATE_FILE, GENERATION_CONFIG)
# Hub Llama-3 repositories keep Meta's tiktoken file (and its params.json) under original/.
ORIGINAL_DIR = "original"


def _metadata_names(folder: Path, with_vocab: bool) -> list[str]:
    names = [name for name in TOKENIZER_FILES if (folder / name).is_file()
             and (with_vocab or name not in (TOKENIZER_MODEL, TOKENIZER_JSON))]
    # The tiktoken reader tells Llama 3 from 3.1 special-token names by the params.json beside it.
    if (folder / TOKENIZER_MODEL).is_file() and (folder / META_PARAMS).is_file():
        names.append(META_PARAMS)
    return names


def tokenizer_files(source: str | Path) -> dict[str, Path]:
    """{name in a copy: file} for the tokenizer at `source`, so the copy loads as the original.

    A folder gives its tokenizer files (and `original/tokenizer.model` of hub Llama-3 folders);
    a file gives itself, named `tokenizer.json` / `tokenizer.model` as loaders expect, and the
    metadata files beside it (not the other kind of vocabulary: the copy must load the file given).
    """
    source = Path(source)
    if source.is_dir():
        files = {name: source / name for name in _metadata_names(source, with_vocab=True)}
        original = source / ORIGINAL_DIR
        if (original / TOKENIZER_MODEL).is_file():
            files.update({f"{ORIGINAL_DIR}/{name}": original / name
                          for name in _metadata_names(original, with_vocab=True)})
        return files
    if not source.is_file():
        raise DataError(f"tokenizer {str(source)!r} does not exist")
    own_name = TOKENIZER_JSON if source.suffix == ".json" else TOKENIZER_MODEL
    files = {name: source.parent / name for name in _metadata_names(source.parent, with_vocab=False)
             if name != META_PARAMS or own_name == TOKENIZER_MODEL}
    files[own_name] = source
    return files


def copy_tokenizer_files(source: str | Path, folder: str | Path, *, meta_layout: bool = False) -> list[str]:
    """Copies the tokenizer at `source` into `folder` (see `tokenizer_files`); returns the names.

    `meta_layout`: `folder` is a Meta checkpoint: `original/tokenizer.model` goes to the top as
    `tokenizer.model`, and no params.json is copied (the checkpoint has its own).
    """
    folder = Path(folder)
    if Path(source).suffix == ".gguf":  # the tokenizer it carries, as tokenizer.json: not the weights
        from llamax.tokenizer.gguf import tokenizer_from_gguf, write_hf_tokenizer

        write_hf_tokenizer(tokenizer_from_gguf(source), folder)
        return sorted(p.name for p in folder.iterdir())
    written = []
    for name, path in tokenizer_files(source).items():
        if meta_layout:
            if Path(name).name == META_PARAMS:
                continue
            if name.startswith(f"{ORIGINAL_DIR}/"):
                name = Path(name).name
                if name in written:
                    continue
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        written.append(name)
    return written
