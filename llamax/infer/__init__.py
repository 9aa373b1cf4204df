"""Using a trained model: generation and evaluation.

  generate.py  prefill + jitted decode loop over a KV cache (greedy, top-k/top-p, ragged prompts,
               stop at any of several ids)
  checks.py    what generation accepts (settings, prompts, stop ids), checked without weights
  evaluate.py  perplexity over packed batches
"""
from __future__ import annotations

import importlib

_EXPORTS = {"generate": "generate", "generate_stream": "generate",
            "evaluate_perplexity": "evaluate"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"llamax.infer.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'llamax.infer' has no attribute {name!r}")
