"""Checkpoint formats and conversion between them: HF, Meta and llamax's orbax params.

  hf.py            HF `LlamaForCausalLM` folders: the tensor table, load_hf, save_hf
  meta.py          Meta `params.json` + `consolidated.NN.pth`: MetaReader/MetaWriter,
                   load_meta, save_meta (meta_config.py: params.json <-> ModelConfig)
  orbax.py         llamax params checkpoints (a ModelConfig + orbax params), streaming readers
  hub.py           any format -> any other, one tensor at a time; load_any/save_any (in memory)
  peft.py          PEFT-format LoRA adapters (adapter_config.json + safetensors), both ways
  weight_files.py  safetensors files and HF weight folders, read lazily
  pth.py           torch `.pth`/`.bin` archives, memory-mapped reads and streaming writes
  files.py         all-or-nothing output folders, contiguous bytes

Names are imported lazily, so `from llamax.convert import load_hf` does not load orbax or torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_hf": "hf", "save_hf": "hf", "read_hf_config": "hf", "hf_to_params": "hf",
    "params_to_hf": "hf", "expected_hf_shapes": "hf",
    "load_meta": "meta", "save_meta": "meta",
    "load_params": "orbax", "save_params": "orbax",
    "FORMATS": "hub", "convert": "hub", "detect_format": "hub", "load_any": "hub", "save_any": "hub",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"llamax.convert.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'llamax.convert' has no attribute {name!r}")
