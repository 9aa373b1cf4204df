"""Tokenizers: SentencePiece (LLaMA-1/2), tiktoken (Meta's Llama-3), Hugging Face tokenizer.json.

Modules:
  load          `load_tokenizer(path)`: picks the kind from a file or checkpoint folder
  sentencepiece `Tokenizer` (a SentencePiece `.model`) and `train_tokenizer`
  tiktoken_bpe  `TiktokenTokenizer`: Meta's Llama-3 `tokenizer.model` + Llama-3 special tokens
  hf            `HFTokenizer`: a `tokenizer.json` (+ tokenizer_config/generation_config) or an
                in-memory `tokenizers.Tokenizer`
  files         the metadata files of a checkpoint folder (special tokens, chat template, stop ids);
                `copy_tokenizer_files` copies a tokenizer so the copy loads as the original
  special_ids   `SpecialIds`: a checkpoint's BOS / EOS (stop) / PAD ids, carried through exports
  gguf          the tokenizer a GGUF file carries (`tokenizer.ggml.*`) rebuilt as a
                `tokenizers.Tokenizer` (GGUFTokenizer), and written back as tokenizer.json
  chat          Jinja chat templates rendered as transformers renders them; built-in Llama-2/3
  base          the shared interface (`ChatMixin`), `check_vocab`
  train_llama3  `train_llama3_tokenizer`: a small Llama-3-format tokenizer (tiktoken file and HF
                folder) trained on text files, e.g. the bundled Shakespeare corpus

Every tokenizer has `encode(text, bos, eos, allow_special)`, `encode_batch`, `decode`, `vocab_size`,
`bos_id`, `eos_id`, `pad_id`, `stop_ids`, `chat_template` and `apply_chat_template`.
"""
from llamax.tokenizer.base import check_vocab
from llamax.tokenizer.chat import render_chat
from llamax.tokenizer.hf import HFTokenizer
from llamax.tokenizer.load import AnyTokenizer, load_tokenizer
from llamax.tokenizer.sentencepiece import Tokenizer, train_tokenizer
from llamax.tokenizer.special_ids import SpecialIds
from llamax.tokenizer.tiktoken_bpe import (LLAMA3_1_SPECIAL_TOKENS, LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS,
                                           TiktokenTokenizer)

__all__ = ["AnyTokenizer", "HFTokenizer", "LLAMA3_1_SPECIAL_TOKENS", "LLAMA3_PATTERN",
           "LLAMA3_SPECIAL_TOKENS", "SpecialIds", "TiktokenTokenizer", "Tokenizer", "check_vocab", "load_tokenizer",
           "render_chat", "train_tokenizer"]
