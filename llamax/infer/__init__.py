"""Using a trained model: generation and evaluation.

  generate.py        prefill + jitted decode loop over a KV cache (greedy, top-k/top-p, ragged
                     prompts, stop at any of several ids, host stop callbacks)
  checks.py          what generation accepts (settings, prompts, stop ids), checked without weights
  sampling.py        next-token choice: greedy, temperature, top-k, top-p
  evaluate.py        perplexity over packed batches
  scoring.py         `SequenceScorer`: loglikelihood + is_greedy of continuations, batched, sharded
  lm_eval_backend.py `LlamaxLM`: the lm-evaluation-harness model (registered by `llamax.lm_eval`)
  lm_eval_tasks.py   running lm-eval tasks: flat metrics, table, plot, the training `TaskEvaluator`
  slots.py           slot-based KV cache for serving: per-slot prefill and one decode step for all
  row_sampling.py    per-row temperature / top-k / top-p for a batch of independent requests
  engine.py          continuous batching: a thread owns the device, requests stream TokenEvents
  chat_format.py     a served model's tokenizer and chat template -> prompt ids, stop ids/strings
  text_stream.py     token ids -> text incrementally, with stop strings
  openai_api.py      OpenAI request checks and response shapes
  server.py          the FastAPI app (completions, chat completions, models, health, chat page)
  static/            chat.html, the chat page
"""
from __future__ import annotations

import importlib

_EXPORTS = {"generate": "generate", "generate_stream": "generate",
            "evaluate_perplexity": "evaluate", "SequenceScorer": "scoring",
            "LlamaxLM": "lm_eval_backend", "run_tasks": "lm_eval_tasks", "Engine": "engine",
            "SamplingParams": "engine", "create_app": "server"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"llamax.infer.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'llamax.infer' has no attribute {name!r}")
