"""Data: from a named source to packed `[batch, seq_len]` batches.

  pipeline.py        DataConfig (what a run reads), the train loader and eval batches
  sources.py         where documents come from: Parquet/Arrow data, local files or a tfds dataset
  tables.py          Parquet files and saved HF datasets, read lazily row group by row group
  shuffle.py         block shuffle: a random order that reads storage blocks one after another
  mixture.py         weighted mixtures of sources at fixed token shares, exact resume
  preference.py      DPO preference records -> (chosen, rejected) pairs packed whole into rows
  documents.py       local .txt / .jsonl files -> documents (strict or skipping bad lines)
  corpus.py          the bundled Shakespeare plays (train / validation split by play)
  shakespeare_sft.py prompt/response exchanges built from the plays, for SFT demos
  sft.py             SFT records -> tokens with per-token "is a response token" weights
  chat_templates.py  built-in chat renderings and the checkpoint-template path for SFT
  packing.py         documents -> rows with segment ids, positions and loss masks (numpy)
  loader.py          the grain loader: shuffle, tokenize, pack, exact resumable state
  text_files/        a tfds builder for local text (array_record, read without TensorFlow)

Batch contract: every batch is a dict of numpy arrays, all `[batch, seq_len]`:
  tokens      int32    input token ids (0 on padding)
  targets     int32    next token within the same segment; 0 where there is none
  segment_ids int32    1, 2, 3, ... per packed segment within a row; 0 = padding
  positions   int32    position within the segment, restarting at 0
  loss_mask   float32  1.0 where `targets` is scored: not on padding, not on the last token of a
                       segment, and (SFT) only where the target is a response token
Documents are encoded as BOS ... EOS; a document longer than seq_len is split into seq_len
chunks, each its own segment. See `llamax.data.packing` and `llamax.data.loader`.
"""
from llamax.data.packing import BATCH_DTYPES, BATCH_KEYS

__all__ = ["BATCH_DTYPES", "BATCH_KEYS"]
