"""Reading a checkpoint folder's tokenizer metadata: special tokens, chat template, stop ids.

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
