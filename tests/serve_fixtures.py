"""Shared helpers of the serving tests: a served checkpoint folder, the reference outputs that
`llamax.sample.generate` gives, and a uvicorn server running in a thread.

Import into a test module with
`from serve_fixtures import served_checkpoint, served_model, small_tokenizer, tiny_hf_dir`.
"""
from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from data_fixtures import small_tokenizer  # noqa: F401  (a fixture served_checkpoint needs)
from finetune_fixtures import tiny_hf_dir  # noqa: F401
from llamax.sample import generate

REPLY_TOKENS = 12  # one max_new_tokens for reference calls: generate compiles once per bucket


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory, tiny_hf_dir, small_tokenizer) -> Path:  # noqa: F811
    """An HF folder (a random tiny transformers model, vocab 512) with its own tokenizer.model,
    as a served checkpoint looks: `--tokenizer` is not needed."""
    folder = tmp_path_factory.getbasetemp() / "served_model"
    if not folder.exists():
        shutil.copytree(tiny_hf_dir, folder)
        shutil.copy(small_tokenizer.path, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="session")
def served_model(served_checkpoint):
    """(config, params, ChatFormat with the plain template) of `served_checkpoint`."""
    from llamax.convert.hub import load_any
    from llamax.infer.chat_format import load_serving_tokenizer

    config, params = load_any(served_checkpoint)
    return config, params, load_serving_tokenizer(served_checkpoint, template="plain")


def greedy_reply(model, prompt_ids: list[int], max_tokens: int = REPLY_TOKENS,
                 chat: bool = False) -> tuple[list[int], str]:
    """generate()'s greedy new tokens (stopping at the stop id) and their text as the API
    returns it: decoded after the prompt; stripped of leading space for a chat reply."""
    config, params, chat_format = model
    (eos,) = chat_format.stop_ids
    new = generate(config, params, [prompt_ids], REPLY_TOKENS, eos_id=eos)[0][:max_tokens]
    visible = [t for t in new if t != eos]
    text = chat_format.decode(prompt_ids + visible)[len(chat_format.decode(prompt_ids)):]
    return new, text.lstrip() if chat else text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:
    """Serves `app` with uvicorn on 127.0.0.1 in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)
