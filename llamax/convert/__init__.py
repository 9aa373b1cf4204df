"""Checkpoint formats and conversion between them: HF, Meta, llamax's orbax params and GGUF.

  hf.py            HF `LlamaForCausalLM` folders: the tensor table, load_hf, save_hf
  meta.py          Meta `params.json` + `consolidated.NN.pth`: MetaReader/MetaWriter,
                   load_meta, save_meta (meta_config.py: params.json <-> ModelConfig)
  orbax.py         llamax params checkpoints (a ModelConfig + orbax params), streaming readers
  gguf.py          GGUF files (llama.cpp) -> llamax: GGUFSource, load_gguf, llama3 rope_freqs
  gguf_write.py    llamax -> GGUF: GGUFSink, save_gguf (f32/f16/bf16/q8_0 + tokenizer metadata)
  gguf_quant.py    ggml tensor types read and written, block (de)quantization
  gguf_vocab.py    a checkpoint's tokenizer (tokenizer.json / .model / .gguf) -> GGUF metadata
  hub.py           any format -> any other, one tensor at a time; load_any/save_any (in memory),
                   read_config (no weights read)
  peft.py          PEFT-format LoRA adapters (adapter_config.json + safetensors), both ways
  identity.py      a checkpoint's tokenizer and special ids in every format: read_identity,
                   checkpoint_tokenizer (what CLIs use without --tokenizer), write_identity
  weight_files.py  safetensors files and HF weight folders, read lazily
  pth.py           torch `.pth`/`.bin` archives, memory-mapped reads and streaming writes
  files.py         all-or-nothing output folders, contiguous bytes

Names are imported lazily, so `from llamax.convert import load_hf` does not load orbax or torch.
The tokenizer a GGUF carries is rebuilt by `llamax.tokenizer.gguf`.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_hf": "hf", "save_hf": "hf", "read_hf_config": "hf", "hf_to_params": "hf",
    "params_to_hf": "hf", "expected_hf_shapes": "hf",
    "load_meta": "meta", "save_meta": "meta",
    "load_params": "orbax", "save_params": "orbax",
    "load_gguf": "gguf", "save_gguf": "gguf_write",
    "FORMATS": "hub", "convert": "hub", "detect_format": "hub", "load_any": "hub", "save_any": "hub",
    "read_config": "hub", "CheckpointIdentity": "identity", "read_identity": "identity",
    "identity_of": "identity", "checkpoint_tokenizer": "identity",
    "save_peft": "peft", "load_peft": "peft",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"llamax.convert.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'llamax.convert' has no attribute {name!r}")
