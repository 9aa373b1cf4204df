"""Tiny random `transformers.LlamaForCausalLM` models: the reference nobody here wrote.

Each variant reproduces one LLaMA generation's architecture at toy size. Shared by the parity
tests of the model, the converters and generation.
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

HF_VARIANTS = {
    # Llama-2: multi-head attention, theta 1e4.
    "llama2_mha": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-5),
    # Llama-3: grouped-query attention, theta 5e5.
    "llama3_gqa": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0),
    # Llama-3.1: llama3 rope scaling (original context 32 so the scaled band matters at seq ~64).
    "llama31_scaled": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
                           rope_scaling=_LLAMA3_SCALING),
    # Llama-3.2: tied input/output embeddings, explicit head_dim != hidden / heads.
    "llama32_tied": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=500000.0,
                         tie_word_embeddings=True, rope_scaling=dict(_LLAMA3_SCALING, factor=32.0)),
}


def make_hf_model(variant: str, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random-initialized tiny HF Llama in float32, eval mode, with non-trivial norm weights."""
    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    fields.update(HF_VARIANTS[variant])
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    with torch.no_grad():  # HF initializes norms to 1; random scales test that they are applied
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def hf_logits(model: LlamaForCausalLM, tokens) -> "torch.Tensor":
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()
