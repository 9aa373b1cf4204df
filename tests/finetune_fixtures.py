"""Shared helpers of the fine-tuning tests (SFT, LoRA, evaluation): a persistent compilation
cache, the tiny model and a tiny HF checkpoint of exactly that architecture.

Import into a test module with `from finetune_fixtures import compilation_cache_dir, tiny_hf_dir`
(plus `from data_fixtures import small_tokenizer` for the 512-piece tokenizer).
"""
from __future__ import annotations

from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from hf_models import make_hf_model
from llamax.config import get_preset

VOCAB = 512  # = data_fixtures.SMALL_VOCAB
TINY = get_preset("tiny", vocab_size=VOCAB)  # 4 heads, 2 kv heads: divisible by tensor=2
# transformers.LlamaConfig fields of TINY (check: ModelConfig.from_hf(...) == TINY).
TINY_HF_FIELDS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position_embeddings=512)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache_dir(tmp_path_factory):
    """A persistent JAX compilation cache shared by the fine-tuning test modules: every `fit`
    jits fresh steps, and the cache compiles each distinct program once per session."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    directory = tmp_path_factory.getbasetemp() / "finetune_jax_cache"
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield directory
    compilation_cache.reset_cache()
    for name, value in saved.items():
        jax.config.update(name, value)


def save_hf_model(out: Path, seed: int = 0, **overrides) -> Path:
    """Writes a random tiny `transformers.LlamaForCausalLM` (TINY's architecture unless
    overridden) with `save_pretrained`; returns the folder."""
    if not (out / "config.json").exists():
        make_hf_model("llama2_mha", seed=seed, **{**TINY_HF_FIELDS, **overrides}).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """An HF folder holding a random model of TINY's architecture (vocab 512 = the tokenizer's)."""
    return save_hf_model(tmp_path_factory.getbasetemp() / "tiny_hf")
