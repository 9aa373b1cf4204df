"""The special token ids that belong to a checkpoint: BOS, every EOS (stop) id, PAD.

`ModelConfig` is architecture only, but a model is also *which ids start and end its text*: an HF
Llama-3.1-Instruct folder says `bos_token_id` 128000 and `eos_token_id` [128001, 128008, 128009]
in config.json and generation_config.json, and transformers' `generate` stops at those ids.
`SpecialIds` carries them beside the config through every conversion, so an exported model stops
where the original did (and where llamax stops: `tokenizer.stop_ids`).

    SpecialIds.from_hf_fields(dict)   from config.json / generation_config.json fields
    SpecialIds.from_tokenizer(tok)    from a loaded tokenizer (bos_id, stop_ids, pad_id)
    special_ids_of_folder(folder)     what a folder's config.json / generation_config.json declare
    ids.hf_fields()                   {"bos_token_id", "eos_token_id" (a list when several), "pad_token_id"}
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from llamax.errors import DataError
from llamax.tokenizer.files import GENERATION_CONFIG, MODEL_CONFIG, read_json

HF_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """BOS, the ids that end a generation (EOS first) and PAD of a checkpoint; None/() = unknown.

    Attributes:
        bos_id: the id a document starts with, or None (ChatML models such as SmolLM2 add none).
        eos_ids: every id that ends a generation, in the checkpoint's order.
        pad_id: the padding id, or None (Llama-3 defines none).
    """

    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None

    def __post_init__(self):
        eos_ids = self.eos_ids
        if isinstance(eos_ids, int) and not isinstance(eos_ids, bool):
            eos_ids = (eos_ids,)
        if not isinstance(eos_ids, (tuple, list)) or not all(_is_id(i) for i in eos_ids):
            raise DataError(f"SpecialIds.eos_ids must be non-negative token ids, got {self.eos_ids!r}")
        object.__setattr__(self, "eos_ids", tuple(dict.fromkeys(eos_ids)))
        for name in ("bos_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and not _is_id(value):
                raise DataError(f"SpecialIds.{name} must be a non-negative token id or None, got {value!r}")

    @property
    def empty(self) -> bool:
        return self.bos_id is None and not self.eos_ids and self.pad_id is None

    @classmethod
    def from_hf_fields(cls, fields: Mapping[str, Any], where: str = "config") -> "SpecialIds":
        """From `bos_token_id` / `eos_token_id` (an int or a list) / `pad_token_id` of an HF
        config.json or generation_config.json dict; absent or null fields stay unknown."""
        def one(name: str) -> int | None:
            value = fields.get(name)
            if value is None or _is_id(value):
                return value
            raise DataError(f"{where}: {name} must be a non-negative integer or null, got {value!r:.80}")

        eos = fields.get("eos_token_id")
        eos_ids = [] if eos is None else (eos if isinstance(eos, list) else [eos])
        if not all(_is_id(i) for i in eos_ids):
            raise DataError(f"{where}: eos_token_id must be a non-negative integer or a list of them, "
                            f"got {eos!r:.80}")
        return cls(one("bos_token_id"), tuple(eos_ids), one("pad_token_id"))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "SpecialIds":
        """`bos_id`, `stop_ids` (EOS first) and the pad id the tokenizer itself defines."""
        pad_id = getattr(tokenizer, "declared_pad_id", tokenizer.pad_id)
        return cls(tokenizer.bos_id, tuple(tokenizer.stop_ids), pad_id)

    def filled_from(self, other: "SpecialIds | None") -> "SpecialIds":
        """These ids, with the ones this lacks taken from `other`."""
        if other is None:
            return self
        return SpecialIds(self.bos_id if self.bos_id is not None else other.bos_id,
                          self.eos_ids or other.eos_ids,
                          self.pad_id if self.pad_id is not None else other.pad_id)

    def hf_fields(self) -> dict[str, Any]:
        """The config.json / generation_config.json fields (an int EOS when there is one, a list
        when several, null when unknown), as transformers writes them."""
        eos: Any = None
        if len(self.eos_ids) == 1:
            eos = self.eos_ids[0]
        elif self.eos_ids:
            eos = list(self.eos_ids)
        return {"bos_token_id": self.bos_id, "eos_token_id": eos, "pad_token_id": self.pad_id}

    def to_dict(self) -> dict[str, Any]:
        return {"bos_id": self.bos_id, "eos_ids": list(self.eos_ids), "pad_id": self.pad_id}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "special ids") -> "SpecialIds":
        unknown = set(values) - {"bos_id", "eos_ids", "pad_id"}
        if unknown:
            raise DataError(f"{where}: unknown field(s) {sorted(unknown)}; expected bos_id, eos_ids, pad_id")
        return cls(values.get("bos_id"), tuple(values.get("eos_ids") or ()), values.get("pad_id"))

    def check_vocab(self, vocab_size: int, where: str) -> None:
        """DataError naming the first id outside `[0, vocab_size)`."""
        for name, token_id in (("bos_id", self.bos_id), ("pad_id", self.pad_id),
                               *(("eos id", i) for i in self.eos_ids)):
            if token_id is not None and token_id >= vocab_size:
                raise DataError(f"{where}: {name} {token_id} is outside the model vocabulary "
                                f"[0, {vocab_size}); the ids belong to another model or tokenizer")


def special_ids_of_folder(folder: str | Path) -> SpecialIds:
    """What `folder`'s generation_config.json and config.json declare (generation_config.json
    wins, as in transformers' `generate`; EOS ids only from the first file that has any)."""
    folder = Path(folder)
    declared = SpecialIds()
    for name in (GENERATION_CONFIG, MODEL_CONFIG):
        path = folder / name
        if path.is_file():
            declared = declared.filled_from(SpecialIds.from_hf_fields(read_json(path), str(path)))
    return declared
