"""The LLaMA decoder: the forward pass and what plugs into it.

  llama.py      the linen modules (Llama, DecoderLayer, Attention, MLP, RMSNorm, Projection,
                EmbedTokens), `init_params`, `abstract_params`
  kv_cache.py   the KV cache: KVCache, how a step writes it and attends over it
  attention.py  softmax attention arithmetic: GQA, masks, causal query blocks, cuDNN
  splash.py     the Pallas TPU splash-attention kernel behind attention_impl='splash'
  rope.py       rotary embeddings in HF's half-split layout, with llama3 frequency scaling
  lora.py       LoRA adapters: LoraConfig, init, the forward's variables, merge for export
  matmul.py     projection products: einsums, or 2-D matmuls in programs built for CPU
  quantize.py   weight-only bf16 / int8 (per-output-channel scales in the `quant` collection)
  cpu_attention.py  CPU training's causal attention (its own backward; C++ kernels on one device)
  decode_kernels.py the CPU decode step's C++ projections and attention
  cpu_kernels.py    builds and registers the C++ kernels (decode_kernels.cc, train_attention.cc,
                    adamw.cc: the AdamW update of `llamax.train.optim.cpu_adamw_update`)
"""
from llamax.model.attention import attend
from llamax.model.llama import (LORA_COLLECTION, QUANT_COLLECTION, KVCache, Llama, abstract_params,
                                init_params, param_logical_axes)
from llamax.model.quantize import WEIGHT_FORMATS, quantize_weights

__all__ = ["LORA_COLLECTION", "QUANT_COLLECTION", "WEIGHT_FORMATS", "KVCache", "Llama", "abstract_params",
           "attend", "init_params", "param_logical_axes", "quantize_weights"]
