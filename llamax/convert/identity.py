"""A checkpoint's identity besides its weights: its tokenizer and its special ids, in every format.

Where each format keeps them:

  hf     tokenizer.json / tokenizer.model in the folder (or Meta's original/tokenizer.model);
         bos/eos/pad_token_id in generation_config.json and config.json
  meta   tokenizer.model (and any HF tokenizer files llamax copied) in the folder; the ids in a
         generation_config.json llamax writes beside params.json (Meta's format has no slot for
         them), else the tokenizer's own
  orbax  a params checkpoint or a training run: `<folder>/tokenizer/` and `special_ids.json`
         (`llamax.run_dir`); a run that recorded no tokenizer inherits its INIT_FROM's
  peft   a PEFT adapter folder: tokenizer files in it, else its local base_model_name_or_path's

Reading: `read_identity(checkpoint)`; `identity_of(path)` also takes a tokenizer file or folder;
`find_tokenizer(checkpoint)` is where its tokenizer is; `checkpoint_tokenizer(checkpoint,
tokenizer=None)` is the tokenizer every CLI (and the GGUF writer) uses by default.
Writing: `write_identity(fmt, folder, identity)` for Meta and orbax output (`HFWriter` writes HF's).
Ids a folder does not declare come from its tokenizer (`SpecialIds.from_tokenizer`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from llamax import run_dir
from llamax.errors import CheckpointError, ConfigError, DataError
from llamax.tokenizer.files import ORIGINAL_DIR, TOKENIZER_JSON, TOKENIZER_MODEL, copy_tokenizer_files
from llamax.tokenizer.special_ids import SpecialIds, special_ids_of_folder

logger = logging.getLogger(__name__)
MAX_INIT_FROM_HOPS = 8  # a run of a run of a run ... inherits its tokenizer; never loop forever


@dataclasses.dataclass(frozen=True)
class CheckpointIdentity:
    """What makes a checkpoint more than its weights.

    Attributes:
        tokenizer: a file or folder `llamax.tokenizer.load_tokenizer` reads, or None.
        special_ids: the BOS / EOS (stop) / PAD ids, or None when nothing says.
    """

    tokenizer: Path | None = None
    special_ids: SpecialIds | None = None


def _has_tokenizer(folder: Path) -> bool:
    return (folder / TOKENIZER_JSON).is_file() or (folder / TOKENIZER_MODEL).is_file()


def _llamax_folder(path: Path) -> Path | None:
    """The run or params checkpoint that `path` (it, `<run>/checkpoints` or a step folder) is part of."""
    for candidate in (path, path.parent, path.parent.parent):
        if run_dir.has_model_config(candidate):
            return candidate
    return None


def _detect(path: Path) -> str | None:
    from llamax.convert.hub import detect_format

    return detect_format(path)


def read_identity(checkpoint: str | os.PathLike, fmt: str | None = None, *,
                  _hops: int = 0) -> CheckpointIdentity:
    """The tokenizer and special ids of an HF, Meta or orbax checkpoint (see module docstring)."""
    from llamax.convert.peft import is_peft_folder, read_peft_config

    path = Path(checkpoint)
    fmt = fmt or _detect(path)
    if fmt is None and is_peft_folder(path) and not _has_tokenizer(path):
        base = read_peft_config(path)[1].get("base_model_name_or_path")
        if base and Path(base).exists() and _hops < MAX_INIT_FROM_HOPS:
            return read_identity(base, _hops=_hops + 1)
    tokenizer, declared = None, SpecialIds()
    if fmt in ("hf", "meta"):
        if _has_tokenizer(path):
            tokenizer = path
        elif (path / ORIGINAL_DIR / TOKENIZER_MODEL).is_file():
            tokenizer = path / ORIGINAL_DIR / TOKENIZER_MODEL
        declared = special_ids_of_folder(path)
    elif fmt == "gguf":
        tokenizer = _gguf_tokenizer(path)
    elif fmt is None and is_peft_folder(path) and _has_tokenizer(path):  # shipped with the adapter
        tokenizer, declared = path, special_ids_of_folder(path)
    elif fmt in ("orbax", None):  # None: also `<run>/checkpoints`, part of a run
        folder = _llamax_folder(path.absolute())
        if folder is not None:
            tokenizer = run_dir.tokenizer_dir(folder)
            declared = run_dir.read_special_ids(folder) or SpecialIds()
            init_from = run_dir.RunDir(folder).init_from()  # a run's (or a folder that recorded one)
            if tokenizer is None and init_from and _hops < MAX_INIT_FROM_HOPS and Path(init_from).exists():
                inherited = read_identity(init_from, _hops=_hops + 1)
                tokenizer = inherited.tokenizer
                declared = declared.filled_from(inherited.special_ids)
    return _complete(tokenizer, declared)


def _gguf_tokenizer(path: Path) -> Path | None:
    """The .gguf itself when llamax can rebuild the tokenizer it carries; a GGUF whose tokenizer
    it cannot read still has valid weights, so that is a warning, not an error."""
    from llamax.tokenizer import load_tokenizer

    try:
        load_tokenizer(path)
    except DataError as error:
        logger.warning("%s: its tokenizer is not carried over (%s)", path, error)
        return None
    return path


def _complete(tokenizer: Path | None, declared: SpecialIds) -> CheckpointIdentity:
    """`declared` ids, with BOS/EOS it lacks read from the tokenizer (loaded only then)."""
    if tokenizer is not None and (declared.bos_id is None or not declared.eos_ids):
        from llamax.tokenizer import load_tokenizer

        declared = declared.filled_from(SpecialIds.from_tokenizer(load_tokenizer(tokenizer)))
    return CheckpointIdentity(tokenizer, None if declared.empty else declared)


def identity_of(path: str | os.PathLike) -> CheckpointIdentity:
    """The identity a `--tokenizer` argument gives: a checkpoint's (any format) or, for a tokenizer
    file or folder, that tokenizer with the ids its folder declares or it defines itself."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"tokenizer {str(path)!r} does not exist; pass a tokenizer file "
                        "(tokenizer.model / tokenizer.json) or a checkpoint folder that has one")
    if (path.is_dir() and _detect(path) is not None) or path.suffix == ".gguf":
        identity = read_identity(path)
        if identity.tokenizer is None:
            raise DataError(f"{path} is a checkpoint without a tokenizer; pass the tokenizer's file or folder")
        return identity
    return _complete(path, special_ids_of_folder(path if path.is_dir() else path.parent))


def find_tokenizer(checkpoint: str | os.PathLike) -> Path:
    """The tokenizer file or folder that belongs to `checkpoint` (any format; a run's recorded copy,
    else its INIT_FROM's; a tokenizer file or folder is its own); DataError asking for --tokenizer
    when it has none."""
    path = Path(checkpoint)
    if _detect(path) is None and (path.is_file() or _has_tokenizer(path)):
        return path
    location = read_identity(path).tokenizer
    if location is None:
        raise DataError(f"{checkpoint} has no tokenizer of its own (no tokenizer.json / tokenizer.model, "
                        "no recorded tokenizer/ for a llamax folder or its INIT_FROM); pass the "
                        "tokenizer the model was trained with (--tokenizer PATH)")
    return location


def checkpoint_tokenizer(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                         *, vocab_size: int | None = None):
    """The tokenizer to use with `checkpoint`: `tokenizer` when given (a file, folder or another
    checkpoint), else the checkpoint's own. `vocab_size`: the model's, checked (`check_vocab`).

    Raises:
        DataError: the checkpoint has no tokenizer and none was given, or it does not fit the model.
        CheckpointError: `checkpoint` does not exist.
    """
    from llamax.tokenizer import check_vocab, load_tokenizer

    if not Path(checkpoint).exists():
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} does not exist")
    location = identity_of(tokenizer).tokenizer if tokenizer is not None else find_tokenizer(checkpoint)
    loaded = load_tokenizer(location)
    if vocab_size is not None:
        check_vocab(loaded, vocab_size)
    return loaded


def write_identity(fmt: str, folder: str | os.PathLike, identity: CheckpointIdentity | None) -> None:
    """Writes `identity` into a Meta or orbax output `folder` (see module docstring)."""
    if identity is None:
        return
    folder = Path(folder)
    if fmt == "orbax":
        run_dir.write_tokenizer(folder, identity.tokenizer, identity.special_ids)
    elif fmt == "meta":
        from llamax.convert.hf import write_generation_config

        if identity.tokenizer is not None:
            copy_tokenizer_files(identity.tokenizer, folder, meta_layout=True)
        if identity.special_ids is not None:
            write_generation_config(folder, identity.special_ids)
    else:
        raise ValueError(f"write_identity: {fmt!r} output writes its own (HFWriter for 'hf')")


def training_identity(tokenizer: str | os.PathLike | None, init_from) -> CheckpointIdentity:
    """The tokenizer (and special ids) a training run uses: `tokenizer` when set, else the one of
    the checkpoint it starts from (`init_from`), so fine-tuning a folder needs no tokenizer flag.

    Raises:
        ConfigError: no tokenizer is set and `init_from` is not a checkpoint that has one.
    """
    if tokenizer is not None:
        return identity_of(tokenizer)
    if not isinstance(init_from, (str, os.PathLike)):
        raise ConfigError("DataConfig.tokenizer (the TOKENIZER macro) is unset and there is no INIT_FROM "
                          "checkpoint to take the tokenizer from; set TOKENIZER to a tokenizer file or folder")
    if not Path(init_from).exists():
        raise ConfigError(f"INIT_FROM {str(init_from)!r} does not exist; pass an HF, Meta or llamax checkpoint")
    identity = read_identity(init_from)
    if identity.tokenizer is None:
        raise ConfigError(f"TOKENIZER is unset and INIT_FROM={init_from} has no tokenizer of its own; set "
                          "TOKENIZER to the tokenizer the model was trained with")
    return identity
