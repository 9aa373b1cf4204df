"""llamax: LLaMA-family pretraining, fine-tuning, conversion and evaluation in JAX/Flax (linen).

The packages, in the order data flows through a run:

  config.py     ModelConfig (frozen dataclass), presets, HF config.json both spellings
  model/        the decoder: linen modules, attention, rotary embeddings, LoRA adapters
  sharding.py   the mesh (data, fsdp, tensor), the logical-axis rules table, shardings
  data/         corpus, documents, packing, SFT rendering, the grain loader, DataConfig
  tokenizer/    SentencePiece, Meta tiktoken and HF tokenizers behind one interface
  train/        TrainSetup (built once), step functions, optimizer, the fit loop, checkpoints
  run_dir.py    the layout of a run directory and a params checkpoint folder (one owner)
  convert/      checkpoint formats: HF, Meta, orbax params, and conversion between them
  infer/        generation (KV cache, sampling) and evaluation (perplexity)
  aot/          compiling a run for a TPU slice on any host: per-chip memory, fit, knobs

Shared pieces: errors.py (one error class per kind of mistake), dtypes.py (one dtype parser),
files.py (atomic writes), tree_paths.py (key paths), distributed.py (jax.distributed; with
peer_watch.py, the processes of a run stop together when one fails or vanishes), backends.py
(CPU-only hosts with libtpu installed stay on the CPU).
llamax never imports gin or `experiments/`: the CLIs there configure these plain objects.
"""
